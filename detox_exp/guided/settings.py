"""The ranges of ``algorithm.*`` for ``algorithm=guided`` (conf/algorithm/guided.yaml); the
pipeline checks them before any stage runs."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from detox_exp.errors import ConfigError

log = logging.getLogger(__name__)

DIRECTIONS = ("forward", "reverse")
SCORER_DEFAULTS = {
    "rollout_prompts": 1024,
    "rollout_samples": 8,
    "batch_prompts": 32,
    "batch_tokens": 4096,
    "n_atoms": 16,
    "hidden_size": 0,
    "epochs": 8,
    "lr": 3e-3,
    "heldout_fraction": 0.1,
}
DISTILL_DEFAULTS = {"direction": "forward", "prefixes": "reference"}
PREFIXES = ("teacher", "reference", "policy")
LR_DECAYS = ("none", "linear")
KL_MATCH = "kl_match"  # algorithm.guide_scale: calibrated (detox_exp.guided.calibrate)


def _check(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"algorithm.{key}", problem, fix)


def check_settings(
    steps: int = 100,
    batch_size: int = 64,
    samples_per_prompt: int = 4,
    prefix_scorer: Mapping[str, Any] | None = None,
    distill: Mapping[str, Any] | None = None,
    guide_candidates: int = 0,
    guide_scale: float | str = 1.0,
    lr_decay: str = "none",
    mini_batch_size: int | None = None,
    on_nonfinite: str = "error",
    max_consecutive_skips: int = 3,
    **_: Any,
) -> None:
    """The ranges of ``algorithm.*`` (the pipeline checks them before any stage runs)."""
    scorer = _known("prefix_scorer", prefix_scorer, SCORER_DEFAULTS)
    distill = _known("distill", distill, DISTILL_DEFAULTS)
    _check(steps >= 1, "steps", f"must be >= 1, got {steps}", "raise it")
    _check(
        guide_candidates >= 0,
        "guide_candidates",
        f"must be >= 0, got {guide_candidates}",
        "use 0 (the whole vocabulary) or e.g. 200",
    )
    _check(
        guide_scale == KL_MATCH
        or (isinstance(guide_scale, int | float) and not isinstance(guide_scale, bool))
        and guide_scale > 0,
        "guide_scale",
        f"must be kl_match or a number > 0, got {guide_scale!r}",
        "use kl_match (calibrated to the optimum's KL) or e.g. 1",
    )
    _check(lr_decay in LR_DECAYS, "lr_decay", f"unknown {lr_decay!r}", f"use one of {LR_DECAYS}")
    _check(
        on_nonfinite in ("error", "skip"),
        "on_nonfinite",
        f"unknown {on_nonfinite!r}",
        "use one of ('error', 'skip')",
    )
    _check(max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1", "raise it")
    _check(samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1", "raise it")
    _check(
        batch_size >= samples_per_prompt and batch_size % samples_per_prompt == 0,
        "batch_size",
        f"must be a multiple of samples_per_prompt={samples_per_prompt}, got {batch_size}",
        f"use e.g. {4 * samples_per_prompt}",
    )
    _check_scorer(scorer)
    for key, allowed in (("direction", DIRECTIONS), ("prefixes", PREFIXES)):
        _check(
            distill[key] in allowed,
            f"distill.{key}",
            f"unknown {key} {distill[key]!r}",
            f"use one of {allowed}",
        )
    _check(
        distill["prefixes"] != "reference" or scorer["rollout_samples"] >= samples_per_prompt,
        "distill.prefixes",
        f"reference distils on groups of samples_per_prompt={samples_per_prompt} of a "
        f"prompt's {scorer['rollout_samples']} scorer rollouts",
        "raise algorithm.prefix_scorer.rollout_samples to a multiple of samples_per_prompt",
    )
    mini = batch_size if mini_batch_size is None else mini_batch_size
    _check(
        mini >= samples_per_prompt and mini % samples_per_prompt == 0 and batch_size % mini == 0,
        "mini_batch_size",
        f"must divide batch_size={batch_size} and be a multiple of "
        f"samples_per_prompt={samples_per_prompt}, got {mini}",
        f"use e.g. {batch_size} (one update per step) or null",
    )
    _check(
        mini == batch_size or distill["prefixes"] != "policy",
        "mini_batch_size",
        "must equal batch_size with distill.prefixes=policy (on-policy: every update on "
        "samples of the policy as it stands)",
        "set algorithm.mini_batch_size=null",
    )


def check_guide_scale(guide_scale: float | str, frontier_draws: bool) -> None:
    """``kl_match`` calibrates the teacher on the frontier stage's draws: a run without them
    is a one-line error (before any stage, and in the trainer)."""
    _check(
        guide_scale != KL_MATCH or frontier_draws,
        "guide_scale",
        "kl_match matches the teacher's KL to the optimum's on the frontier stage's draws, "
        "and this run has none",
        "set stages.frontier=true, or a number (1: the scorer's own guide)",
    )


def _known(node: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict:
    """``given`` over ``defaults``; a key the defaults lack is a one-line error."""
    for key in given or {}:
        if key not in defaults:
            fix = f"use one of {list(defaults)}"
            raise ConfigError(f"algorithm.{node}.{key}", "unknown key", fix)
    return {**defaults, **(given or {})}


def _check_scorer(scorer: Mapping[str, Any]) -> None:
    """The ranges of ``algorithm.prefix_scorer.*``."""
    for key, low in (("rollout_prompts", 4), ("rollout_samples", 1), ("epochs", 1)):
        _check(scorer[key] >= low, f"prefix_scorer.{key}", f"must be >= {low}", "raise it")
    for key in ("batch_prompts", "batch_tokens"):
        _check(scorer[key] >= 1, f"prefix_scorer.{key}", "must be >= 1", "raise it")
    _check(scorer["n_atoms"] >= 2, "prefix_scorer.n_atoms", "must be >= 2", "use e.g. 16")
    _check(scorer["hidden_size"] >= 0, "prefix_scorer.hidden_size", "must be >= 0", "use 0: linear")
    _check(
        scorer["lr"] > 0, "prefix_scorer.lr", f"must be > 0, got {scorer['lr']}", "use e.g. 3e-3"
    )
    _check(
        0 < scorer["heldout_fraction"] < 1,
        "prefix_scorer.heldout_fraction",
        f"must be in (0, 1), got {scorer['heldout_fraction']}",
        "use e.g. 0.1",
    )


def check_rollouts(prefix_scorer: Mapping[str, Any], frontier_kl: float | None) -> None:
    """Warn when the prefix scorer's reference samples per prompt are fewer than 4 x
    exp(KL(pi* || ref)), the frontier's measured KL at the run's beta: importance sampling
    from ref to pi* needs about exp(KL) samples (Chatterjee & Diaconis 2018), so fewer leave
    the scorer without the completions the optimum keeps (docs/guided.md)."""
    if frontier_kl is None:
        return
    need = 4 * math.exp(frontier_kl)
    have = prefix_scorer["rollout_samples"]
    if have < need:
        log.warning(
            "algorithm.prefix_scorer.rollout_samples=%d is under 4 x exp(KL) = %.1f (the "
            "frontier's KL %.3f nats at this beta): raise it for a calibrated scorer",
            have,
            need,
            frontier_kl,
        )
