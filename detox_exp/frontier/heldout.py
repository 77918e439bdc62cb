"""The objective's optimum on the HELD-OUT prompts at the run's beta (``eval/optimum/*``),
read from the before-evaluation's K >= 2 samples per prompt by self-normalised weights
(:mod:`detox_exp.frontier_math`), and how far the run got toward it (``eval/vs_optimum/*``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from detox_exp import frontier_math
from detox_exp import metric_names as M
from detox_exp.evaluation.evaluator import EvalResult


def heldout_optimum(
    before: EvalResult, beta: float, threshold: float, seed: int = 0, repeats: int = 4
) -> dict[str, float]:
    """``eval/optimum/*``: the optimum ``pi* ~ ref * exp(r / beta)`` on the held-out prompts,
    read from the before-evaluation's K >= 2 samples per prompt by self-normalised weights
    (:func:`detox_exp.frontier_math.optimum_metrics`); {} with one sample per prompt."""
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
    corpus = frontier_math.ReferenceCorpus.of(texts, uniforms)
    values = frontier_math.optimum_metrics(
        beta, before.rewards(), before.toxicity, texts, per_sample, corpus, threshold, uniforms
    )
    values |= {"beta": float(beta), "num_prompts": p, "samples_per_prompt": k}
    return {M.eval_key(M.OPTIMUM_PHASE, name): v for name, v in values.items()}


def against_optimum(summary: Mapping[str, Any], phase: str = "after") -> dict[str, float]:
    """The share of the optimum's toxicity drop that ``phase`` (``after``: the trained
    policy; ``teacher``: the guided teacher) achieved, and its KL as a multiple of the
    optimum's (where before, the phase and optimum are all in ``summary``)."""
    key = M.eval_key
    before, after, best = (
        summary.get(key(p, "toxicity_mean")) for p in ("before", phase, M.OPTIMUM_PHASE)
    )
    if before is None or after is None or best is None:
        return {}
    drop_key, kl_key = (
        (M.OPTIMUM_DROP_ACHIEVED, M.OPTIMUM_KL_RATIO)
        if phase == "after"
        else (M.TEACHER_DROP_ACHIEVED, M.TEACHER_KL_RATIO)
    )
    out = {}
    if before - best > 0:
        out[drop_key] = (before - after) / (before - best)
    kl_after, kl_best = (
        summary.get(key(phase, "kl_to_reference")),
        summary.get(key(M.OPTIMUM_PHASE, "kl_to_reference")),
    )
    if kl_after is not None and kl_best:
        out[kl_key] = kl_after / kl_best
    return out
