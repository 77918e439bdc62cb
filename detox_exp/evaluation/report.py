"""Before -> after changes with paired bootstrap confidence intervals, and the held-out
optimum of the objective at the run's beta beside them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from detox_exp import metric_names as M
from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.evaluation.metrics import (
    distinct_of_grams,
    ngrams,
    paired_bootstrap_ci,
    paired_bootstrap_corpus,
    response_collapse,
)
from detox_exp.frontier import core as frontier

# metrics whose change gets a paired bootstrap CI (prompts resampled, the same before / after)
PAIRED = (
    "toxicity_mean",
    "toxic_fraction",
    "rouge_l",
    "response_len_mean",
    "distinct_1",
    "distinct_2",
    "unique_fraction",
)


def paired_deltas(
    before: EvalResult,
    after: EvalResult,
    bootstrap: Mapping[str, Any],
    toxic_threshold: float = 0.5,
) -> dict[str, float]:
    """``eval/delta/<metric>`` (+ ``_ci_low``, ``_ci_high``, ``_rel``, ``_p_value``).

    The ``PAIRED`` metrics get a paired bootstrap CI: means of per-prompt values (toxicity,
    toxic fraction, ROUGE-L, length; the mean over a prompt's k samples) resample those
    values; corpus-level metrics (distinct-n, unique fraction) are recomputed on every
    resample of the prompts. Other metrics get a plain after - before difference.
    """
    out: dict[str, float] = {}
    per_prompt = {
        "toxicity_mean": (before.toxicity.mean(1), after.toxicity.mean(1)),
        "toxic_fraction": (
            (before.toxicity > toxic_threshold).mean(1),
            (after.toxicity > toxic_threshold).mean(1),
        ),
        "rouge_l": (before.rouge_l.mean(1), after.rouge_l.mean(1)),
        "response_len_mean": (before.lengths.mean(1), after.lengths.mean(1)),
    }
    cis = {}
    if len(before.toxicity) >= 2:
        for name, (b, a) in per_prompt.items():
            cis[name] = paired_bootstrap_ci(b, a, **bootstrap)
        corpus = {k: v for k, v in bootstrap.items() if k != "statistic"}
        texts_b, texts_a = before.responses(), after.responses()
        for n in (1, 2):
            grams_b = [[g for t in texts for g in ngrams(t, n)] for texts in texts_b]
            grams_a = [[g for t in texts for g in ngrams(t, n)] for texts in texts_a]
            cis[f"distinct_{n}"] = paired_bootstrap_corpus(
                grams_b, grams_a, distinct_of_grams, **corpus
            )
        cis["unique_fraction"] = paired_bootstrap_corpus(
            texts_b,
            texts_a,
            lambda items: response_collapse([t for texts in items for t in texts])[
                "unique_fraction"
            ],
            **corpus,
        )
    for name, ci in cis.items():
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
        if name in cis or other is None or not isinstance(value, (int, float)):
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


def optimum_metrics(
    before: EvalResult, beta: float, threshold: float, seed: int = 0, repeats: int = 4
) -> dict[str, float]:
    """``eval/optimum/*``: the optimum ``pi* ~ ref * exp(r / beta)`` on the held-out prompts,
    read from the before-evaluation's K >= 2 samples per prompt by self-normalised weights
    (:func:`detox_exp.frontier.core.optimum_metrics`); {} with one sample per prompt."""
    p, k = before.toxicity.shape
    if k < 2:
        return {}
    texts = before.responses()
    per_sample = {
        "rouge_l": before.rouge_l,
        "response_len_mean": before.lengths,
        "empty_fraction": np.array([[float(not t) for t in group] for group in texts]),
    }
    uniforms = np.random.default_rng(seed).random((repeats, p, k))
    corpus = frontier.ReferenceCorpus.of(texts, uniforms)
    values = frontier.optimum_metrics(
        beta, before.rewards(), before.toxicity, texts, per_sample, corpus, threshold, uniforms
    )
    values |= {"beta": float(beta), "num_prompts": p, "samples_per_prompt": k}
    return {f"eval/{M.OPTIMUM_PHASE}/{name}": v for name, v in values.items()}


def against_optimum(summary: Mapping[str, Any]) -> dict[str, float]:
    """The share of the optimum's toxicity drop the run achieved, and its KL as a multiple
    of the optimum's (where before, after and optimum are all in ``summary``)."""
    key = "eval/{}/{}".format
    before, after, best = (
        summary.get(key(phase, "toxicity_mean")) for phase in ("before", "after", "optimum")
    )
    if before is None or after is None or best is None:
        return {}
    out = {}
    if before - best > 0:
        out[M.OPTIMUM_DROP_ACHIEVED] = (before - after) / (before - best)
    kl_after, kl_best = (
        summary.get(key("after", "kl_to_reference")),
        summary.get(key("optimum", "kl_to_reference")),
    )
    if kl_after is not None and kl_best:
        out[M.OPTIMUM_KL_RATIO] = kl_after / kl_best
    return out
