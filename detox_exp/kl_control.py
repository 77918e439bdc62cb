"""KL coefficient controllers (``ppo.kl_controller``; any training method's beta): fixed,
adaptive (Ziegler et al. 2019) and frontier (beta from a toxicity-drop target)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from detox_exp.errors import ConfigError


def _check_arg(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:  # a plain-Python error type the CLI prints as one line
        raise ConfigError(f"ppo.kl_controller.{key}", problem, fix)


class FixedKLController:
    """Constant KL coefficient ``value``."""

    def __init__(self, kl_coef: float) -> None:
        _check_arg(kl_coef >= 0, "kl_coef", f"must be >= 0, got {kl_coef}", "use e.g. 0.05")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class FrontierKLController(FixedKLController):
    """A constant KL coefficient taken from a target before training: the largest beta whose
    optimum cuts the mean toxicity by at least ``target_drop`` (the least KL spent for that
    cut), found on the frontier stage's reference samples (:mod:`detox_exp.frontier`).
    ``kl_coef`` is that beta, set by the pipeline after the frontier stage."""

    def __init__(self, target_drop: float, kl_coef: float | None = None) -> None:
        _check_arg(
            0 < target_drop < 1, "target_drop", f"must be in (0, 1), got {target_drop}", "use 0.5"
        )
        self.target_drop = float(target_drop)
        super().__init__(1.0 if kl_coef is None else kl_coef)

    @classmethod
    def configured_by(cls, node: Mapping[str, Any]) -> bool:
        """Whether the ``ppo.kl_controller`` config node ``node`` builds this controller (its
        beta then comes from the frontier stage): the one test of that, for every caller."""
        from hydra.utils import get_class

        target = node.get("_target_")
        return bool(target) and issubclass(get_class(str(target)), cls)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2): moves ``value`` so that the
    observed KL approaches ``target``, by at most 20% per ``horizon`` samples.

    ``horizon`` sets how fast it can act: over a run of N samples the coefficient can change
    by at most a factor ``1.2 ** (N / horizon)``. Ziegler et al.'s 10,000 suits millions of
    episodes; for a run of a few thousand samples it must be of the order of a batch, or the
    coefficient stays where it started (``conf/ppo/kl_controller/adaptive.yaml``)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        _check_arg(
            init_kl_coef >= 0, "init_kl_coef", f"must be >= 0, got {init_kl_coef}", "e.g. 0.2"
        )
        _check_arg(target > 0, "target", f"must be > 0, got {target}", "use e.g. 6.0")
        _check_arg(horizon > 0, "horizon", f"must be > 0, got {horizon}", "use e.g. 10000")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ziegler et al. 2019: ``e = clip(KL / target - 1, -0.2, 0.2)``;
        ``beta <- beta * (1 + e * n_steps / horizon)``; ``n_steps`` = samples in this batch."""
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl is {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``value`` only: ``target`` and ``horizon`` come from the current config."""
        self.value = float(state["value"])


def configured_beta(controller: Mapping[str, Any]) -> float | None:
    """The beta a ``ppo.kl_controller`` node starts from (None for the frontier's own)."""
    if FrontierKLController.configured_by(controller):
        return None
    value = controller.get("kl_coef", controller.get("init_kl_coef"))
    return None if value is None else float(value)
