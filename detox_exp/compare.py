"""``detox-exp-compare``: compare finished runs (run dirs, sweep dirs, W&B runs) side by side.

Prints a markdown table, one row per run: the config keys whose values differ (what was
varied), the key metrics (the reference's value before PPO, after, and the held-out optimum
of the objective where the run has ``eval/optimum/*``), then the config that differs in shape
(a group or subtree one run lacks, e.g. ``logger: wandb | none``). Where the runs' baselines
differ (each seed evaluates, or trains, its own reference), the change relative to each run's
own baseline (``eval/delta/<metric>_rel`` = after / before - 1) is shown, sorts the rows and
is what the plots show. Writes pareto.png (toxicity vs ROUGE-L, Pareto front marked; each
run's reference and optimum beside it), pareto_distinct2.png (toxicity vs distinct-2) and
curves.png (PPO reward and KL per step) to --out; ``--max-kl 1`` keeps runs further than
1 nat from the reference off the fronts. Examples:

  detox-exp-compare outputs/tune/a outputs/tune/b     # run dirs
  detox-exp-compare outputs/demo/multiruns/<time> --sort eval/after/rouge_l --desc
  detox-exp-compare my-entity/detox/abc123 --no-plots # a W&B run (needs W&B credentials)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detox_exp import metric_names as M
from detox_exp.compare_plots import DISTINCT2, OPT, ROUGE, TOXICITY, plot_curves, plot_pareto
from detox_exp.compare_runs import (
    CompareError,
    RunRecord,
    baselines_differ,
    load_runs,
    number,
)

PROG = "detox-exp-compare"
DELTA_PHASE = M.DELTA_PHASE
# after / before - 1, each run's own baseline
TOXICITY_REL = M.eval_key(DELTA_PHASE, "toxicity_mean_rel")
# the default columns; those no run has, and the relative changes (``_rel``) where every run
# has the same baseline, are left out
DEFAULT_METRICS = tuple(
    M.eval_key(phase, name)
    for phase, name in (
        ("before", "toxicity_mean"),
        ("after", "toxicity_mean"),
        (OPT, "toxicity_mean"),
        (DELTA_PHASE, "toxicity_mean"),
        (DELTA_PHASE, "toxicity_mean_rel"),
        ("before", "rouge_l"),
        ("after", "rouge_l"),
        (OPT, "rouge_l"),
        (DELTA_PHASE, "rouge_l_rel"),
        ("after", "distinct_2"),
        (DELTA_PHASE, "distinct_2"),
        (DELTA_PHASE, "distinct_2_rel"),
        ("after", "unique_fraction"),
        ("after", "kl_to_reference"),
        (OPT, "kl_to_reference"),
        ("after", "response_len_mean"),
        # algorithm=guided: its teacher, the guided reference the policy was distilled from
        (M.TEACHER_PHASE, "toxicity_mean"),
        (M.TEACHER_PHASE, "rouge_l"),
        (M.TEACHER_PHASE, "distinct_2"),
        (M.TEACHER_PHASE, "kl_to_reference"),
    )
) + (M.OPTIMUM_DROP_ACHIEVED, M.OPTIMUM_KL_RATIO, M.TEACHER_DROP_ACHIEVED, M.TEACHER_KL_RATIO)
DELTA = re.compile(re.escape(M.eval_key(DELTA_PHASE, "")) + r"(?P<name>.+?)(?P<rel>_rel)?")
SKIP_PREFIXES = ("paths.", "hydra.", "_wandb")
SKIP = frozenset({"logger.wandb.dir"})


def _normalise(value: Any, run_dirs: Sequence[str]) -> str:
    """A comparable form of a config value, with the run's own dir replaced by a marker."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    for run_dir in sorted(filter(None, run_dirs), key=len, reverse=True):
        text = re.sub(r"(?<![\w.-])" + re.escape(run_dir) + r"(?![\w.-])", "<run_dir>", text)
    return text


def differing_keys(runs: Sequence[RunRecord | Mapping[str, Any]]) -> list[str]:
    """Config keys whose values differ between runs (missing counts as a value), one per
    difference: the keys under a subtree that some run lacks (no keys under it, or a leaf
    such as ``logger.wandb: null``) give that subtree's key once, and where the runs chose
    different options of an enclosing Hydra config group, that group's (``logger``, whose
    cell is the option: ``wandb`` | ``none``).

    Skips ``paths.*``, ``hydra.*``, ``logger.wandb.dir`` and values that differ only by the
    run's own dir. Accepts RunRecords or plain flat config dicts; keeps first-seen key order.
    """
    records = [r if isinstance(r, RunRecord) else RunRecord("", {}, dict(r), []) for r in runs]
    configs = [r.config for r in records]
    keys = list(dict.fromkeys(k for config in configs for k in config))

    def differs(key: str) -> bool:
        values = {(key in r.config, _normalise(r.config.get(key), r.run_dirs)) for r in records}
        return len(values) > 1

    found = [k for k in keys if not k.startswith(SKIP_PREFIXES) and k not in SKIP and differs(k)]
    subtrees = [
        {k.rsplit(".", n)[0] for k in c for n in range(1, k.count(".") + 1)} for c in configs
    ]
    options = {g for r in records for g in r.choices}
    groups = [
        g.replace("/", ".") for g in options if len({str(r.choices.get(g)) for r in records}) > 1
    ]
    columns = []
    for key in found:
        if all(key in config for config in configs):  # a value that differs: its own column
            columns.append(key)
            continue
        parts = key.split(".")
        prefixes = (".".join(parts[:n]) for n in range(1, len(parts)))
        column = next((p for p in prefixes if any(p not in s for s in subtrees)), key)
        enclosing = [g for g in groups if column == g or column.startswith(f"{g}.")]
        columns.append(max(enclosing, key=len, default=column))
    return list(dict.fromkeys(columns))


def split_keys(runs: Sequence[RunRecord], keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the keys every run has a value of: what was varied, shown before the metrics; the
    rest: config that differs in shape, a group or subtree some run lacks, shown after)."""
    varied = [k for k in keys if all(k in r.config for r in runs)]
    return varied, [k for k in keys if k not in varied]


def config_cell(run: RunRecord, key: str) -> str:
    """The run's value of config ``key``: a value, a Hydra group's option, ``{n keys}`` for
    a subtree, or ``-`` when the run lacks it."""
    if key in run.config:
        return _format_config(run.config[key])
    group = key.replace(".", "/")
    if group in run.choices:
        return _format_config(run.choices[group])
    size = sum(k.startswith(f"{key}.") for k in run.config)
    return f"{{{size} keys}}" if size else "-"


def metric_value(summary: Mapping[str, Any], metric: str) -> Any:
    """``summary[metric]``; else, from the run's own before and after values,
    ``eval/delta/<m>`` = after - before and ``eval/delta/<m>_rel`` = after / before - 1."""
    if metric in summary:
        return summary[metric]
    match = DELTA.fullmatch(metric)
    if match is None:
        return None
    before, after = (number(summary.get(M.eval_key(p, match["name"]))) for p in M.EVAL_PHASES)
    if before is None or after is None or (match["rel"] and not before):
        return None
    return after / before - 1.0 if match["rel"] else after - before


def table_metrics(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[str]:
    """``metrics`` less those no run has and the relative changes (``eval/delta/<m>_rel``)
    of metrics whose baseline is the same in every run."""

    def shown(metric: str) -> bool:
        match = DELTA.fullmatch(metric)
        if match and match["rel"] and not baselines_differ(runs, match["name"]):
            return False
        return any(number(metric_value(r.summary, metric)) is not None for r in runs)

    return [m for m in metrics if shown(m)]


def format_metric(summary: Mapping[str, Any], metric: str) -> str:
    """Value with 3 decimals (a relative change ``_rel`` in percent), plus the "[lo, hi]" CI
    when ``<metric>_ci_low/high`` exist."""
    raw = metric_value(summary, metric)
    value = number(raw)
    if value is None:
        return "-"
    fmt = _percent if metric.endswith("_rel") else _f3
    text = fmt(value) if isinstance(raw, float) else str(raw)
    lo, hi = number(summary.get(f"{metric}_ci_low")), number(summary.get(f"{metric}_ci_high"))
    return text + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else "")


def _f3(value: float) -> str:
    return f"{round(value, 3) + 0.0:.3f}"  # + 0.0: no "-0.000"


def _percent(value: float) -> str:
    return f"{round(100 * value, 1) + 0.0:+.1f}%"


def _format_config(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, (bool, list, dict)):  # YAML / override spelling
        return json.dumps(value, default=str)
    return str(value)


def markdown_table(
    runs: Sequence[RunRecord],
    keys: Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    sort: str = TOXICITY,
    desc: bool = False,
    trailing: Sequence[str] = (),
) -> str:
    """One row per run: name, config ``keys``, ``metrics``, config ``trailing``; sorted by
    ``sort``.

    ``sort`` is a summary metric (see :func:`metric_value`; or else a config key); runs
    without it come last.
    """

    def value(run: RunRecord) -> Any:
        found = metric_value(run.summary, sort)
        return run.config.get(sort) if found is None else found

    def sort_key(run: RunRecord) -> tuple[bool, float, str]:  # numbers, then text
        x = number(value(run))
        return x is None, 0.0 if x is None else x, str(value(run))

    present = sorted((r for r in runs if value(r) is not None), key=sort_key, reverse=desc)
    absent = [r for r in runs if value(r) is None]

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    header = ["run", *keys, *metrics, *trailing]
    lines = [row(header), row(["---"] * len(header))]
    for run in present + absent:
        values = [format_metric(run.summary, m) for m in metrics]
        config = [config_cell(run, k) for k in keys], [config_cell(run, k) for k in trailing]
        lines.append(row([run.name, *config[0], *values, *config[1]]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dir, sweep dir or W&B run")
    parser.add_argument(
        "--sort",
        default=None,
        metavar="METRIC",
        help=f"sort rows by this (default: {TOXICITY}, or where the runs' baselines differ "
        f"its change from each run's own baseline, {TOXICITY_REL})",
    )
    parser.add_argument("--desc", action="store_true", help="sort descending")
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated summary keys (default: the key metrics before, after and at the "
        "optimum, those no run has left out)",
    )
    parser.add_argument("--out", default="compare", help="folder for the PNGs")
    parser.add_argument("--no-plots", action="store_true", help="only print the table")
    parser.add_argument(
        "--max-kl",
        type=float,
        default=None,
        help="keep runs with eval/after/kl_to_reference above this out of the Pareto fronts",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script; exits 2 with one line on stderr for bad input."""
    args = parse_args(argv)
    try:
        runs = load_runs(args.paths)
    except CompareError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.metrics is None:
        metrics = table_metrics(runs, DEFAULT_METRICS)
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    toxicity = TOXICITY.split("/")[-1]
    sort = args.sort or (TOXICITY_REL if baselines_differ(runs, toxicity) else TOXICITY)
    if sort == TOXICITY_REL and args.sort is None:
        plots = "" if args.no_plots else ", and so do the plots"
        print(
            f"The runs' baselines ({M.eval_key('before', toxicity)}) differ: rows are sorted by "
            "the change "
            f"from each run's own baseline ({TOXICITY_REL}){plots}.\n"
        )
    if not any(metric_value(r.summary, sort) is not None or sort in r.config for r in runs):
        print(f"{PROG}: warning: no run has {sort!r}; rows are unsorted", file=sys.stderr)
    varied, shape = split_keys(runs, differing_keys(runs))
    print(markdown_table(runs, varied, metrics, sort, args.desc, trailing=shape))
    if not args.no_plots:
        out = Path(args.out)
        written = [
            plot_pareto(runs, out / "pareto.png", ROUGE, args.max_kl),
            plot_pareto(runs, out / "pareto_distinct2.png", DISTINCT2, args.max_kl),
            plot_curves(runs, out / "curves.png"),
        ]
        print("", *(f"wrote {path}" for path in written), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
