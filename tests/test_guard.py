"""The non-finite guard on its own: error, or skip with the trainer's state restored, and
the stop after too many skips in a row."""

from __future__ import annotations

import pytest
import torch

from detox_exp.distributed import Dist
from detox_exp.errors import TrainingError
from detox_exp.training.guard import NonFiniteGuard

NAN = torch.tensor([1.0, float("nan")])


def test_error_names_the_quantity_step_and_last_checkpoint(tmp_path) -> None:
    guard = NonFiniteGuard("error", 3, Dist(torch.device("cpu")))
    guard.check("scores", torch.ones(2), step=5)  # finite: nothing happens
    guard.last_checkpoint = tmp_path / "step_4"
    with pytest.raises(TrainingError, match=r"ppo step 5.*scores contain NaN.*step_4"):
        guard.check("scores", NAN, step=5)


def test_skip_restores_the_snapshot_and_counts_until_the_limit() -> None:
    guard = NonFiniteGuard("skip", 2, Dist(torch.device("cpu")))
    state = {"w": 1}
    restored = []

    def step(bad: bool):
        with guard.batch(7, lambda: dict(state), restored.append) as outcome:
            state["w"] += 1  # the batch changes the state, then fails its check
            guard.check("loss", NAN if bad else torch.ones(1), step=7)
        return outcome

    assert step(bad=True).skipped == "loss" and restored == [{"w": 1}]
    assert guard.state_dict() == {"skipped": 1, "consecutive_skips": 1}
    state["w"] = 1  # what restore() does in the trainer
    assert step(bad=False).skipped is None and guard.consecutive_skips == 0
    step(bad=True)
    with pytest.raises(TrainingError, match="2 batches in a row"):
        step(bad=True)
    assert guard.skipped == 3
