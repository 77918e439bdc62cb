"""What a training stage shows while it runs: a progress bar (on a terminal) and about 20
console lines per run; metrics.jsonl and W&B hold every step."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from detox_exp import metric_names as M
from detox_exp.utils import progress

log = logging.getLogger(__name__)


class StepConsole:
    """The bar and console lines of ``steps`` steps named ``name``, from step ``start`` (a
    resumed run); ``postfix`` gives a step's headline numbers."""

    def __init__(
        self,
        name: str,
        steps: int,
        start: int,
        postfix: Callable[[Mapping[str, float]], dict[str, str]],
    ) -> None:
        self.name, self.steps, self.postfix = name, steps, postfix
        self.bar = progress(total=steps, desc=name, unit="step")
        self.bar.update(start)
        self.every = max(1, steps // 20)

    def show(self, step: int, metrics: Mapping[str, float]) -> None:
        """After step ``step``: the bar moves; every ``steps / 20`` steps and at the last,
        a console line (a skipped batch has no headline numbers: the bar only)."""
        self.bar.update(1)
        if M.REWARD_MEAN not in metrics:  # skipped batch
            return
        shown = self.postfix(metrics)
        self.bar.set_postfix(shown)
        if step % self.every and step != self.steps:
            return
        line = ", ".join(f"{k} {v}" for k, v in shown.items())
        seconds = metrics[M.STEP_TIME]
        log.info("%s step %d/%d: %s, %.2f s", self.name, step, self.steps, line, seconds)

    def close(self) -> None:
        self.bar.close()
