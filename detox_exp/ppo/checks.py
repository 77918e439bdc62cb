"""Checks of the PPO settings (``ppo.*``, :class:`~detox_exp.ppo.settings.PPOSettings`):
each failure is a one-line error that names the field and the fix. The pipeline runs them on
the config before any stage (:func:`check_ppo_config`), so a typo does not cost a reward
training and a baseline evaluation first; the trainer builds its settings through them
(:func:`settings_from`). The names of estimators and modes come from their registries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detox_exp.errors import ConfigError
from detox_exp.kl import KL_ESTIMATORS
from detox_exp.ppo.advantages import ADVANTAGE_ESTIMATORS
from detox_exp.ppo.core import LOSS_AGG_MODES
from detox_exp.ppo.settings import NESTED, PPOSettings
from detox_exp.schema import check_fields, check_value

PRECISIONS = ("fp32", "bf16", "fp16")
# the settings whose values are registered names: (registry, the properties a name needs)
REGISTERED = {
    "advantage_estimator": (ADVANTAGE_ESTIMATORS, {}),
    "loss_agg_mode": (LOSS_AGG_MODES, {}),
    "kl_estimator": (KL_ESTIMATORS, {"reward": True}),
    "kl_log_estimator": (KL_ESTIMATORS, {"log": True}),
    "kl_loss_estimator": (KL_ESTIMATORS, {"loss": True}),
}


def registered_names(setting: str) -> tuple[str, ...]:
    """The values ``ppo.<setting>`` accepts, from its registry."""
    registry, needs = REGISTERED[setting]
    return registry.names(**needs)


def sweep_choice(field: str) -> str:
    """A Hydra sweep's ``choice(...)`` over every registered value of ``ppo.<setting>``
    (``${registry_choice:ppo.advantage_estimator}`` in conf/hparams_search)."""
    setting = field.removeprefix("ppo.")
    if setting not in REGISTERED:
        raise ConfigError(field, "has no registry", f"use one of {sorted(REGISTERED)}")
    return f"choice({', '.join(registered_names(setting))})"


BUILT = ("_target_", "_partial_", "optimizer", "kl_controller")  # built by instantiate


def settings_from(values: Mapping[str, Any]) -> PPOSettings:
    """Checked settings from ``ppo.*`` keyword arguments (the schema's defaults fill in what
    they leave out): an unknown key, a wrong type or an impossible value is a one-line
    ConfigError naming ``ppo.<key>``."""
    flat = {k: v for k, v in values.items() if k not in NESTED}
    check_fields(PPOSettings, flat, "ppo")
    nested = {}
    for name, schema in NESTED.items():
        node = values.get(name) or {}
        check_value(node, Mapping, f"ppo.{name}")
        check_fields(schema, node, f"ppo.{name}")
        nested[name] = schema(**node)
    settings = PPOSettings(**{**values, **nested})
    check_settings(settings)
    return settings


def check(condition: bool, field: str, problem: str, fix: str) -> None:
    """Raise ``ConfigError`` for ``ppo.<field>`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"ppo.{field}", problem, fix)


def check_choice(s: PPOSettings, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(s, name)
    check(value in choices, name, f"unknown {value!r}", f"use one of {choices}")


def check_settings(s: PPOSettings) -> None:
    """Every rule on the ``ppo.*`` settings that needs no process count (see local_sizes):
    the batch sizes, the estimators, then the ranges of the rest (the first broken rule is
    the one reported)."""
    _check_sizes(s)
    _check_estimators(s)
    _check_ranges(s)


def _check_sizes(s: PPOSettings) -> None:
    """Steps, batch, minibatch, accumulation, epochs and groups of samples per prompt."""
    check(s.steps >= 0, "steps", f"must be >= 0, got {s.steps}", "set ppo.steps=20")
    check(s.batch_size >= 1, "batch_size", f"must be >= 1, got {s.batch_size}", "raise it")
    check(s.mini_batch_size >= 1, "mini_batch_size", "must be >= 1", "raise it")
    check(
        s.batch_size % s.mini_batch_size == 0,
        "mini_batch_size",
        f"{s.mini_batch_size} does not divide ppo.batch_size={s.batch_size}",
        "pick a divisor of the batch size",
    )
    accum = s.gradient_accumulation_steps
    check(
        accum >= 1 and s.mini_batch_size % accum == 0,
        "gradient_accumulation_steps",
        f"{accum} does not divide ppo.mini_batch_size={s.mini_batch_size}",
        "pick a divisor of the mini-batch size",
    )
    check(s.ppo_epochs >= 1, "ppo_epochs", "must be >= 1", "raise it")
    k = s.samples_per_prompt
    check(k >= 1, "samples_per_prompt", f"must be >= 1, got {k}", "use e.g. 4")
    for name in ("batch_size", "mini_batch_size"):
        size = getattr(s, name)
        check(
            size % k == 0,
            name,
            f"{size} is not a multiple of ppo.samples_per_prompt={k} (sizes count samples, "
            "and a group never splits)",
            f"use a multiple of {k}",
        )
    check(
        (s.mini_batch_size // accum) % k == 0,
        "gradient_accumulation_steps",
        f"a micro-batch of {s.mini_batch_size // accum} samples would split a group of {k}",
        f"make ppo.mini_batch_size / ppo.gradient_accumulation_steps a multiple of {k}",
    )


def _check_estimators(s: PPOSettings) -> None:
    """The registered advantage estimator, loss aggregation and KL estimators, and what
    each needs (a group, a value model)."""
    k = s.samples_per_prompt
    check_choice(s, "advantage_estimator", registered_names("advantage_estimator"))
    check(
        s.uses_critic or k >= 2,
        "samples_per_prompt",
        f"{s.advantage_estimator} needs a group of >= 2 samples per prompt, got {k}",
        "set ppo.samples_per_prompt=4",
    )
    check(
        s.uses_critic or not s.separate_value_model,
        "separate_value_model",
        f"{s.advantage_estimator} has no value model",
        "set it to false, or use ppo.advantage_estimator=gae",
    )
    check_choice(s, "loss_agg_mode", registered_names("loss_agg_mode"))
    for name in ("kl_estimator", "kl_log_estimator", "kl_loss_estimator"):
        check_choice(s, name, registered_names(name))


def _check_ranges(s: PPOSettings) -> None:
    """The ranges of the numbers and switches left."""
    for name, example in (("gamma", "1.0"), ("lam", "0.95")):
        value = getattr(s, name)
        check(0 <= value <= 1, name, f"must be in [0, 1], got {value}", f"use e.g. {example}")
    for name in ("cliprange", "cliprange_value"):
        value = getattr(s, name)
        check(value > 0, name, f"must be > 0, got {value}", "use e.g. 0.2")
    check(s.group_eps > 0, "group_eps", f"must be > 0, got {s.group_eps}", "use e.g. 1e-6")
    check(
        s.kl_loss_coef >= 0,
        "kl_loss_coef",
        f"must be >= 0, got {s.kl_loss_coef}",
        "use 0 (off) or e.g. 0.04",
    )
    norm = s.max_grad_norm
    check(
        norm is None or norm > 0,
        "max_grad_norm",
        f"must be > 0, got {norm}",
        "set it > 0, or null to turn it off",
    )
    clip = s.score.clip
    check(
        clip is None or clip > 0,
        "score.clip",
        f"must be > 0 or null, got {clip}",
        "set it > 0, or null to turn it off",
    )
    forward = s.forward_batch_size
    check(
        forward is None or forward >= 1,
        "forward_batch_size",
        f"must be >= 1 or null, got {forward}",
        "null runs the whole batch at once",
    )
    check(
        s.precision in PRECISIONS,
        "precision",
        f"unknown {s.precision!r}",
        f"use one of {PRECISIONS} (the top-level precision sets it)",
    )
    check_choice(s, "on_nonfinite", ("error", "skip"))
    check(
        s.max_consecutive_skips >= 1,
        "max_consecutive_skips",
        f"must be >= 1, got {s.max_consecutive_skips}",
        "use e.g. 3",
    )


def local_sizes(s: PPOSettings, world_size: int) -> tuple[int, int]:
    """This process's (batch, mini-batch) sizes in samples, checked against the number of
    processes: every process holds whole groups of ``samples_per_prompt`` samples."""
    unit = s.samples_per_prompt * world_size
    for name in ("batch_size", "mini_batch_size"):
        size = getattr(s, name)
        check(
            size % unit == 0,
            name,
            f"{size} samples do not split into whole groups of {s.samples_per_prompt} over "
            f"{world_size} processes",
            f"use a multiple of {unit}",
        )
    local_mini = s.mini_batch_size // world_size
    micro, rem = divmod(local_mini, s.gradient_accumulation_steps)
    check(
        rem == 0 and micro % s.samples_per_prompt == 0,
        "gradient_accumulation_steps",
        f"must split the per-process mini-batch of {local_mini} samples into whole groups",
        "lower it",
    )
    return s.batch_size // world_size, local_mini


def check_lr(lr: float) -> None:
    """``ppo.optimizer.lr`` must be a positive number."""
    check_value(lr, float, "ppo.optimizer.lr")
    check(lr > 0, "optimizer.lr", f"must be > 0, got {lr}", "use e.g. 1.41e-5")


def check_ppo_config(ppo: Mapping[str, Any]) -> PPOSettings:
    """Check a ``ppo`` config node (plain containers) against the schema, including
    ``ppo.optimizer.lr``; returns the settings."""
    settings = settings_from({k: ppo[k] for k in ppo if k not in BUILT})
    lr = (ppo.get("optimizer") or {}).get("lr")
    if lr is not None:
        check_lr(lr)
    return settings
