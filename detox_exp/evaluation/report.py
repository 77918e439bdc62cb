"""Before -> after changes with paired bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.evaluation.metrics import paired_bootstrap_ci

# per-prompt quantities that are paired between the two phases
PAIRED = ("toxicity_mean", "rouge_l")


def paired_deltas(
    before: EvalResult, after: EvalResult, bootstrap: Mapping[str, Any]
) -> dict[str, float]:
    """``eval/delta/<metric>`` (+ ``_ci_low``, ``_ci_high``, ``_rel``, ``_p_value``).

    Toxicity and ROUGE-L are paired per prompt (mean over the k samples of each prompt) and
    resampled by prompt; other metrics get a plain after - before difference.
    """
    out: dict[str, float] = {}
    per_prompt = {
        "toxicity_mean": (before.toxicity.mean(1), after.toxicity.mean(1)),
        "rouge_l": (before.rouge_l.mean(1), after.rouge_l.mean(1)),
    }
    for name, (b, a) in per_prompt.items():
        if len(b) < 2:
            continue
        ci = paired_bootstrap_ci(b, a, **bootstrap)
        key = f"eval/delta/{name}"
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
        other = after.metrics.get(f"eval/{after.phase}/{name}")
        if name in PAIRED or other is None or not isinstance(value, (int, float)):
            continue
        out[f"eval/delta/{name}"] = float(other) - float(value)
        if value:
            out[f"eval/delta/{name}_rel"] = float(other) / float(value) - 1.0
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
