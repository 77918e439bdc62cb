"""The evaluation's report: before -> after changes with paired bootstrap confidence
intervals, the side-by-side table, the printed before / after / optimum table and the model
card's table, every metric named in :mod:`detox_exp.metric_names`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from detox_exp import metric_names as M
from detox_exp.evaluation.bootstrap import paired_bootstrap_ci, paired_bootstrap_corpus
from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.metrics import distinct_of_grams, ngrams, response_collapse
from detox_exp.tracking import Tracker

# how each of metric_names.PAIRED_METRICS is read from an evaluation: per prompt (the mean over
# its k samples; the bootstrap resamples these values), or recomputed on the corpus of the
# resampled prompts' responses
PER_PROMPT = {
    "toxicity_mean": lambda r, threshold: r.toxicity.mean(1),
    "toxic_fraction": lambda r, threshold: (r.toxicity > threshold).mean(1),
    "rouge_l": lambda r, threshold: r.rouge_l.mean(1),
    "response_len_mean": lambda r, threshold: r.lengths.mean(1),
}


def _grams(n: int) -> Callable[[EvalResult], list[list[tuple[str, ...]]]]:
    """Each prompt's n-grams over its k responses (computed once, not per resample)."""
    return lambda r: [[g for t in texts for g in ngrams(t, n)] for texts in r.responses()]


def _unique_fraction(items: list[list[str]]) -> float:
    return response_collapse([t for texts in items for t in texts])["unique_fraction"]


# (each prompt's items, the corpus statistic over a resample of them)
CORPUS = {
    "distinct_1": (_grams(1), distinct_of_grams),
    "distinct_2": (_grams(2), distinct_of_grams),
    "unique_fraction": (EvalResult.responses, _unique_fraction),
}


def paired_deltas(
    before: EvalResult,
    after: EvalResult,
    bootstrap: Mapping[str, Any],
    toxic_threshold: float = 0.5,
) -> dict[str, float]:
    """``eval/delta/<metric>`` (+ ``_ci_low``, ``_ci_high``, ``_rel``, ``_p_value``).

    The ``metric_names.PAIRED_METRICS`` get a paired bootstrap CI: means of per-prompt
    values (:data:`PER_PROMPT`: toxicity, toxic fraction, ROUGE-L, length; the mean over a
    prompt's k samples) resample those values; corpus-level metrics (:data:`CORPUS`:
    distinct-n, unique fraction) are recomputed on every resample of the prompts. Other
    metrics get a plain after - before difference.
    """
    out: dict[str, float] = {}
    cis = {}
    if len(before.toxicity) >= 2:
        corpus = {k: v for k, v in bootstrap.items() if k != "statistic"}
        for name in M.PAIRED_METRICS:
            if name in PER_PROMPT:
                b, a = (PER_PROMPT[name](r, toxic_threshold) for r in (before, after))
                cis[name] = paired_bootstrap_ci(b, a, **bootstrap)
            else:  # a KeyError here: a paired metric without a rule above
                items, statistic = CORPUS[name]
                cis[name] = paired_bootstrap_corpus(
                    items(before), items(after), statistic, **corpus
                )
    for name, ci in cis.items():
        key = M.eval_key(M.DELTA_PHASE, name)
        out |= {
            key: ci["delta"],
            f"{key}_ci_low": ci["ci_low"],
            f"{key}_ci_high": ci["ci_high"],
            f"{key}_rel": ci["rel_delta"],
            f"{key}_rel_ci_low": ci["rel_ci_low"],
            f"{key}_rel_ci_high": ci["rel_ci_high"],
            f"{key}_p_value": ci["p_value"],
        }
    for key, value in before.metrics.items():
        name = key.split("/")[-1]
        other = after.metrics.get(M.eval_key(after.phase, name))
        if name in cis or other is None or not isinstance(value, (int, float)):
            continue
        out[M.eval_key(M.DELTA_PHASE, name)] = float(other) - float(value)
        if value:
            out[M.eval_key(M.DELTA_PHASE, f"{name}_rel")] = float(other) / float(value) - 1.0
    return out


SIDE_BY_SIDE_COLUMNS = (
    "id",
    "prompt",
    "reference",
    "response_before",
    "response_after",
    "toxicity_before",
    "toxicity_after",
)


def side_by_side_rows(before: EvalResult, after: EvalResult, limit: int = 100) -> list[list]:
    """Rows pairing the same prompt and sample index before and after PPO."""
    after_by_key = {(r["id"], r["sample"]): r for r in after.records}
    rows = []
    for rec in before.records:
        other = after_by_key.get((rec["id"], rec["sample"]))
        if other is None:
            continue
        rows.append(
            [
                rec["id"],
                rec["prompt"][-500:],
                rec["reference"],
                rec["response"],
                other["response"],
                rec["toxicity"]["reward"],
                other["toxicity"]["reward"],
            ]
        )
        if len(rows) >= limit:
            break
    return rows


def log_comparison(
    tracker: Tracker,
    before: EvalResult,
    after: EvalResult,
    bootstrap: Mapping[str, Any],
    toxic_threshold: float,
) -> None:
    """The before -> after report to the run's summary and W&B: the paired deltas, the
    side-by-side table and both toxicity histograms."""
    tracker.log_summary(paired_deltas(before, after, bootstrap, toxic_threshold))
    tracker.log_table(
        M.SIDE_BY_SIDE_TABLE, SIDE_BY_SIDE_COLUMNS, side_by_side_rows(before, after), step=None
    )
    tracker.log_histograms(
        {M.eval_key(r.phase, M.TOXICITY_HIST): r.toxicity.ravel() for r in (before, after)},
        step=None,
    )


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def report_table(summary: Mapping[str, Any]) -> str:
    """The printed before / after table (``metric_names.REPORT_METRICS``), with the paired
    bootstrap CI of each change and, where the summary has them, the guided teacher
    (``algorithm=guided``) and the optimum of the objective at the run's beta, followed by
    how much of the optimum's drop the run (and the teacher) achieved; "" when there is
    nothing to show."""
    extra = [
        phase
        for phase in (M.TEACHER_PHASE, M.OPTIMUM_PHASE)
        if any(key.startswith(M.eval_key(phase, "")) for key in summary)
    ]
    head = "| metric | before | after | " + "".join(f"{p} | " for p in extra)
    lines = ["", head + "change (95% CI) |", "|---" * (4 + len(extra)) + "|"]
    shown = False
    for key in M.REPORT_METRICS:
        before, after = (summary.get(M.eval_key(phase, key)) for phase in M.EVAL_PHASES)
        if before is None and after is None:
            continue
        shown = True
        delta = M.eval_key(M.DELTA_PHASE, key)
        change = "-"
        if summary.get(delta) is not None:
            lo, hi = summary.get(f"{delta}_ci_low"), summary.get(f"{delta}_ci_high")
            rel = summary.get(f"{delta}_rel")
            change = f"{summary[delta]:+.3f} [{_fmt(lo)}, {_fmt(hi)}]"
            if rel is not None and not math.isnan(rel):
                change += f" ({rel:+.0%})"
        others = "".join(f"{_fmt(summary.get(M.eval_key(p, key)))} | " for p in extra)
        lines.append(f"| {key} | {_fmt(before)} | {_fmt(after)} | {others}{change} |")
    lines = lines if shown else []
    beta = summary.get(M.eval_key(M.OPTIMUM_PHASE, "beta"))
    for who, drop, ratio in (
        ("", M.OPTIMUM_DROP_ACHIEVED, M.OPTIMUM_KL_RATIO),
        ("the teacher ", M.TEACHER_DROP_ACHIEVED, M.TEACHER_KL_RATIO),
    ):
        achieved, kl_ratio = summary.get(drop), summary.get(ratio)
        if achieved is None:
            continue
        line = f"{who}against the optimum at beta {beta:.3g}: {achieved:.0%} of its toxicity drop"
        if kl_ratio is not None:
            line += f", at {kl_ratio:.1f}x its KL"
        lines.append(line)
    return "\n".join(lines)


def card_table(summary: Mapping[str, Any]) -> list[str]:
    """The model card's held-out evaluation table (``metric_names.CARD_METRICS``, before /
    after / optimum), as markdown lines."""
    lines = ["| metric | before | after | optimum |", "|---|---|---|---|"]
    for key in M.CARD_METRICS:
        values = [summary.get(M.eval_key(p, key)) for p in (*M.EVAL_PHASES, M.OPTIMUM_PHASE)]
        cells = ("-" if v is None else f"{v:.4f}" for v in values)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    beta = summary.get(M.eval_key(M.OPTIMUM_PHASE, "beta"))
    if beta is not None:
        lines += [
            "",
            f"optimum: the objective's optimum ref * exp(r / beta) at beta {beta:.4g}, read "
            "from the before samples.",
        ]
    return lines
