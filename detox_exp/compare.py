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
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detox_exp import metric_names as M
from detox_exp.compare_runs import CURVES, CompareError, RunRecord, load_runs

PROG = "detox-exp-compare"
OPT, DELTA_PHASE = M.OPTIMUM_PHASE, M.DELTA_PHASE
TOXICITY, ROUGE = M.eval_key("after", "toxicity_mean"), M.eval_key("after", "rouge_l")
DISTINCT2, KL_AFTER = M.eval_key("after", "distinct_2"), M.eval_key("after", "kl_to_reference")
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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, minimising x and maximising y.

    A point is dominated when another is at least as good in both and strictly better in one;
    equal points do not dominate each other (all are kept). NaN / None points are never on it.
    """
    ok = [all(v is not None and not math.isnan(v) for v in p) for p in points]
    valid = [p for p, good in zip(points, ok) if good]

    def dominated(x: float, y: float) -> bool:
        return any(xo <= x and yo >= y and (xo < x or yo > y) for xo, yo in valid)

    return [i for i, (x, y) in enumerate(points) if ok[i] and not dominated(x, y)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def metric_value(summary: Mapping[str, Any], metric: str) -> Any:
    """``summary[metric]``; else, from the run's own before and after values,
    ``eval/delta/<m>`` = after - before and ``eval/delta/<m>_rel`` = after / before - 1."""
    if metric in summary:
        return summary[metric]
    match = DELTA.fullmatch(metric)
    if match is None:
        return None
    before, after = (_number(summary.get(M.eval_key(p, match["name"]))) for p in M.EVAL_PHASES)
    if before is None or after is None or (match["rel"] and not before):
        return None
    return after / before - 1.0 if match["rel"] else after - before


def relative_change(summary: Mapping[str, Any], phase: str, name: str) -> float | None:
    """``eval/<phase>/<name>`` / ``eval/before/<name>`` - 1: the change from the run's own
    baseline (None without both, or with a zero baseline)."""
    value, before = (_number(summary.get(M.eval_key(p, name))) for p in (phase, "before"))
    return value / before - 1.0 if value is not None and before else None


def baselines_differ(runs: Sequence[RunRecord], name: str) -> bool:
    """Whether the runs' ``eval/before/<name>`` (their reference's value) differ."""
    values = {_number(r.summary.get(M.eval_key("before", name))) for r in runs} - {None}
    return len({round(v, 9) for v in values}) > 1


def table_metrics(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[str]:
    """``metrics`` less those no run has and the relative changes (``eval/delta/<m>_rel``)
    of metrics whose baseline is the same in every run."""

    def shown(metric: str) -> bool:
        match = DELTA.fullmatch(metric)
        if match and match["rel"] and not baselines_differ(runs, match["name"]):
            return False
        return any(_number(metric_value(r.summary, metric)) is not None for r in runs)

    return [m for m in metrics if shown(m)]


def format_metric(summary: Mapping[str, Any], metric: str) -> str:
    """Value with 3 decimals (a relative change ``_rel`` in percent), plus the "[lo, hi]" CI
    when ``<metric>_ci_low/high`` exist."""
    raw = metric_value(summary, metric)
    value = _number(raw)
    if value is None:
        return "-"
    fmt = _percent if metric.endswith("_rel") else _f3
    text = fmt(value) if isinstance(raw, float) else str(raw)
    lo, hi = _number(summary.get(f"{metric}_ci_low")), _number(summary.get(f"{metric}_ci_high"))
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
        number = _number(value(run))
        return number is None, 0.0 if number is None else number, str(value(run))

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


def _figure(**kwargs: Any) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    return Figure(**kwargs)


def _save(fig: Any, path: str | Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_pareto(
    runs: Sequence[RunRecord],
    path: str | Path,
    y_metric: str = ROUGE,
    max_kl: float | None = None,
) -> Path:
    """Toxicity (x, lower is better) vs ``y_metric`` (higher is better) after PPO; Pareto
    runs marked. Each run's reference (before PPO), with ``eval/optimum/*`` the objective's
    optimum and, for ``algorithm=guided``, its teacher (``eval/teacher/*``) are small markers
    joined to its point. Where the runs' baselines
    differ, both axes are the change from each run's own baseline (after / before - 1).
    With ``max_kl``, runs whose eval/after/kl_to_reference exceeds it are drawn as crosses and
    kept out of the front."""
    fig = _figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    names = (TOXICITY.split("/")[-1], y_metric.split("/")[-1])
    relative = any(baselines_differ(runs, name) for name in names)

    def point(run: RunRecord, phase: str) -> tuple[float, float] | None:
        if relative:
            xy = [relative_change(run.summary, phase, name) for name in names]
            xy = [None if v is None else 100 * v for v in xy]
        else:
            xy = [_number(run.summary.get(M.eval_key(phase, name))) for name in names]
        return None if None in xy else (xy[0], xy[1])

    shown = [r for r in runs if point(r, "after") is not None]
    points = [point(r, "after") for r in shown]
    kl = [_number(r.summary.get(KL_AFTER)) for r in shown]
    over = {i for i, v in enumerate(kl) if max_kl is not None and v is not None and v > max_kl}
    allowed = [i for i in range(len(points)) if i not in over]
    front = {allowed[j] for j in pareto_front([points[i] for i in allowed])}
    _plot_reference_and_optimum(
        ax, [(point(r, "before"), p, point(r, OPT)) for r, p in zip(shown, points)]
    )
    teachers = [(point(r, M.TEACHER_PHASE), p) for r, p in zip(shown, points)]
    for teacher, after in teachers:
        if teacher is not None:
            ax.plot(*zip(teacher, after), ls="--", c="tab:purple", lw=0.8, alpha=0.6, zorder=1)
    if any(t is not None for t, _ in teachers):
        xy = [t for t, _ in teachers if t is not None]
        ax.scatter(*zip(*xy), s=40, marker="D", c="tab:purple", zorder=2, label="guided teacher")
    for on, label, colour in ((True, "Pareto-optimal", "tab:red"), (False, "dominated", "gray")):
        xy = [p for i, p in enumerate(points) if (i in front) == on and i not in over]
        if xy:
            ax.scatter(*zip(*xy), s=70 if on else 35, c=colour, zorder=3, label=label)
    if over:
        xy = [points[i] for i in sorted(over)]
        ax.scatter(*zip(*xy), s=35, c="tab:blue", marker="x", zorder=3, label=f"KL > {max_kl}")
    for (x, y), run in zip(points, shown):
        ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        ax.step(*zip(*sorted(points[i] for i in front)), where="post", ls="--", c="tab:red", lw=1)
    if points:
        ax.legend(loc="best", fontsize=8)
        ax.margins(0.12)
    else:
        ax.text(0.5, 0.5, "no run has both metrics", ha="center", transform=ax.transAxes)
    if relative:
        ax.set(xlabel=f"{names[0]} change from the run's own baseline, % (lower is better)")
        ax.set(ylabel=f"{names[1]} change from the run's own baseline, % (higher is better)")
        ax.set(title=f"toxicity vs {names[1]} after PPO, relative to each run's baseline")
    else:
        ax.set(xlabel=f"{TOXICITY} (lower is better)", ylabel=f"{y_metric} (higher is better)")
        ax.set(title=f"toxicity vs {names[1]} after PPO")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_reference_and_optimum(ax: Any, triples: Sequence[tuple[Any, Any, Any]]) -> None:
    """Per run (reference, after, optimum) points, each None if unknown: the reference and
    the optimum as small markers, joined to the run's point by thin lines."""
    for reference, after, optimum in triples:
        for other, style in ((reference, "-"), (optimum, ":")):
            if other is not None:
                ax.plot(*zip(other, after), ls=style, c="gray", lw=0.8, alpha=0.6, zorder=1)
    references = sorted({reference for reference, _, _ in triples} - {None})
    optima = sorted({optimum for _, _, optimum in triples} - {None})
    if references:
        ax.scatter(
            *zip(*references),
            s=24,
            facecolors="none",
            edgecolors="black",
            zorder=2,
            label="reference (before PPO)",
        )
    if optima:
        ax.scatter(
            *zip(*optima),
            s=60,
            marker="*",
            c="tab:green",
            zorder=2,
            label="optimum at the run's beta",
        )


def plot_curves(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """Two panels: env/reward_mean and objective/kl vs step, one line per run."""
    fig = _figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, CURVES):
        for i, run in enumerate(runs):
            xy = [(r.get("step"), _number(r.get(metric))) for r in run.history]
            xy = sorted((s, v) for s, v in xy if s is not None and v is not None)
            if xy:  # 10 colours per line style, then the next style
                marker = "." if len(xy) < 30 else None
                ax.plot(*zip(*xy), ls="-:-"[i // 10 % 2], marker=marker, label=run.name)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        ax.set(xlabel="PPO step", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
    legend = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if legend:  # one entry per run, from whichever panel has it
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    return _save(fig, path)


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
