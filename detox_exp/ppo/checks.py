"""Checks of the PPO settings (``ppo.*``): each failure is a one-line error that names the
field and the fix. The pipeline runs them on the config before any stage
(:func:`check_ppo_config`), so a typo does not cost a reward training and a baseline
evaluation first; ``PPOTrainer`` runs them again on its own arguments."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from detox_exp.errors import ConfigError
from detox_exp.ppo.core import KL_ESTIMATORS

PRECISIONS = ("fp32", "bf16", "fp16")
# The PPOTrainer arguments that check_hyperparameters reads.
CHECKED = (
    "steps",
    "batch_size",
    "mini_batch_size",
    "gradient_accumulation_steps",
    "ppo_epochs",
    "gamma",
    "lam",
    "cliprange",
    "cliprange_value",
    "kl_estimator",
    "max_grad_norm",
    "score",
    "forward_batch_size",
    "precision",
    "on_nonfinite",
)


def check(condition: bool, field: str, problem: str, fix: str) -> None:
    """Raise ``ConfigError`` for ``ppo.<field>`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"ppo.{field}", problem, fix)


def check_hyperparameters(h: Mapping[str, Any]) -> None:
    """Check the arguments of ``PPOTrainer`` (``h``: its keyword arguments by name; only
    the ``CHECKED`` ones are read)."""
    steps, batch_size, mini_batch_size = h["steps"], h["batch_size"], h["mini_batch_size"]
    accum = h["gradient_accumulation_steps"]
    check(steps >= 0, "steps", f"must be >= 0, got {steps}", "set ppo.steps=20")
    check(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}", "raise it")
    check(mini_batch_size >= 1, "mini_batch_size", "must be >= 1", "raise it")
    check(
        batch_size % mini_batch_size == 0,
        "mini_batch_size",
        f"{mini_batch_size} does not divide ppo.batch_size={batch_size}",
        "pick a divisor of the batch size",
    )
    check(
        accum >= 1 and mini_batch_size % accum == 0,
        "gradient_accumulation_steps",
        f"{accum} does not divide ppo.mini_batch_size={mini_batch_size}",
        "pick a divisor of the mini-batch size",
    )
    check(h["ppo_epochs"] >= 1, "ppo_epochs", "must be >= 1", "raise it")
    for name, example in (("gamma", "1.0"), ("lam", "0.95")):
        value = h[name]
        check(0 <= value <= 1, name, f"must be in [0, 1], got {value}", f"use e.g. {example}")
    for name in ("cliprange", "cliprange_value"):
        check(h[name] > 0, name, f"must be > 0, got {h[name]}", "use e.g. 0.2")
    estimator = h["kl_estimator"]
    check(
        estimator in KL_ESTIMATORS,
        "kl_estimator",
        f"unknown {estimator!r}",
        f"use one of {KL_ESTIMATORS}",
    )
    norm = h["max_grad_norm"]
    check(
        norm is None or norm > 0,
        "max_grad_norm",
        f"must be > 0, got {norm}",
        "set it > 0, or null to turn it off",
    )
    score = dict(h["score"] or {})
    check(
        set(score) <= {"scale", "normalize", "clip"},
        "score",
        f"unknown keys {score}",
        "use scale, normalize, clip",
    )
    clip = score.get("clip")
    check(
        clip is None or clip > 0,
        "score.clip",
        f"must be > 0 or null, got {clip}",
        "set it > 0, or null to turn it off",
    )
    forward = h["forward_batch_size"]
    check(
        forward is None or forward >= 1,
        "forward_batch_size",
        f"must be >= 1 or null, got {forward}",
        "null runs the whole batch at once",
    )
    check(
        h["precision"] in PRECISIONS,
        "precision",
        f"unknown {h['precision']!r}",
        f"use one of {PRECISIONS} (the top-level precision sets it)",
    )
    check(
        h["on_nonfinite"] in ("error", "skip"),
        "on_nonfinite",
        f"unknown {h['on_nonfinite']!r}",
        "use error or skip",
    )


def local_sizes(
    batch_size: int, mini_batch_size: int, accum: int, world_size: int
) -> tuple[int, int]:
    """This process's (batch, mini-batch) sizes, checked against the number of processes."""
    for name, size in (("batch_size", batch_size), ("mini_batch_size", mini_batch_size)):
        check(
            size % world_size == 0,
            name,
            f"{size} is not divisible by the {world_size} processes",
            "use a multiple",
        )
    local_mini = mini_batch_size // world_size
    check(
        local_mini % accum == 0,
        "gradient_accumulation_steps",
        f"must divide the per-process mini-batch {local_mini}",
        "lower it",
    )
    return batch_size // world_size, local_mini


def check_ppo_config(ppo: Mapping[str, Any]) -> None:
    """Check a ``ppo`` config node (the trainer's defaults fill in what it leaves out),
    including ``ppo.optimizer.lr``. Only the checked keys are read (and resolved)."""
    from detox_exp.ppo.trainer import PPOTrainer  # the trainer imports this module

    params = inspect.signature(PPOTrainer).parameters
    check_hyperparameters({k: ppo[k] if k in ppo else params[k].default for k in CHECKED})
    lr = (ppo.get("optimizer") or {}).get("lr")
    if lr is not None:
        check_lr(lr)


def check_lr(lr: float) -> None:
    """``ppo.optimizer.lr`` must be positive."""
    check(lr > 0, "optimizer.lr", f"must be > 0, got {lr}", "use e.g. 1.41e-5")
