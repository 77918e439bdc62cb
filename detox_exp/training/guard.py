"""The guard against NaN / inf in a training step (``ppo.on_nonfinite``,
``algorithm.on_nonfinite``): stop the run with one
clear error that names the last good checkpoint (``error``), or drop the whole batch and put
the trainer back where it was before it (``skip``), stopping after
``ppo.max_consecutive_skips`` dropped batches in a row."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detox_exp.distributed import Dist
from detox_exp.errors import TrainingError

log = logging.getLogger(__name__)


class SkipBatch(Exception):
    """Raised inside a step to drop the batch (``ppo.on_nonfinite=skip``)."""


@dataclass
class BatchOutcome:
    """What :meth:`NonFiniteGuard.batch` decided: ``skipped`` names the quantity that was
    not finite when the batch was dropped, else None."""

    skipped: str | None = None


class NonFiniteGuard:
    """Checks each quantity of a step on every process (a NaN on one stops or skips all)."""

    def __init__(
        self, on_nonfinite: str, max_consecutive_skips: int, dist: Dist, node: str = "ppo"
    ) -> None:
        self.node = node  # the config node of the training method, named in the errors
        self.skip = on_nonfinite == "skip"
        self.max_consecutive_skips = max_consecutive_skips
        self.dist = dist
        self.skipped = 0  # batches dropped in the run
        self.consecutive_skips = 0
        self.last_checkpoint: Path | None = None  # named in the error

    def last_good(self) -> str:
        return str(self.last_checkpoint or "none (set checkpoint.every)")

    def check(self, quantity: str, values: torch.Tensor, step: int) -> None:
        """Raise (stop, or skip the batch) if ``values`` hold NaN or inf on any process."""
        bad = self.dist.sum(torch.tensor(float(not torch.isfinite(values).all()))).item() > 0
        if not bad:
            return
        if self.skip:
            raise SkipBatch(quantity)
        raise TrainingError(
            f"{self.node} step {step}",
            f"{quantity} contain NaN or inf; last good checkpoint: {self.last_good()}",
            f"lower {self.node}.optimizer.lr, check the reward model, "
            f"or set {self.node}.on_nonfinite=skip",
        )

    @contextmanager
    def batch(
        self, step: int, snapshot: Callable[[], Any], restore: Callable[[Any], None]
    ) -> Iterator[BatchOutcome]:
        """The context of one batch: with ``skip``, ``snapshot()`` is taken before it, and a
        :class:`SkipBatch` inside is caught, ``restore(snapshot)`` undoes what the batch
        changed, and the outcome records the skip."""
        outcome = BatchOutcome()
        saved = snapshot() if self.skip else None
        try:
            yield outcome
        except SkipBatch as skip:
            restore(saved)
            self.skipped += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise TrainingError(
                    f"{self.node} step {step}",
                    f"{skip} contain NaN or inf in {self.consecutive_skips} batches in a row "
                    f"({self.node}.max_consecutive_skips); "
                    f"last good checkpoint: {self.last_good()}",
                    f"lower {self.node}.optimizer.lr or check the reward model",
                ) from None
            log.warning("%s step %d: %s not finite, batch skipped", self.node, step, skip)
            outcome.skipped = str(skip)
            return
        self.consecutive_skips = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
