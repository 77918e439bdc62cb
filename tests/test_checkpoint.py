"""Checkpoint manager, RNG state round trip, resume path resolution, perf summary."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detox_exp import checkpoint
from detox_exp import metric_names as M
from detox_exp.errors import ConfigError, DataError
from detox_exp.perf import perf_summary


def save(manager: checkpoint.CheckpointManager, step: int, reward: float) -> Path:
    tensors = {"w": torch.full((2,), float(step))}
    state = {"step": step, "rng": checkpoint.rng_state()}
    return manager.save(step, tensors, state, {"metrics": {"env/reward_mean": reward}})


def test_keeps_newest_and_best(tmp_path: Path) -> None:
    manager = checkpoint.CheckpointManager(tmp_path, every=1, keep=2, best_metric="env/reward_mean")
    for step, reward in ((1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)):
        save(manager, step, reward)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    tensors, state, meta = checkpoint.load(tmp_path / "best")
    assert meta["step"] == 2 and tensors["w"].tolist() == [2.0, 2.0] and state["step"] == 2
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind
    assert manager.due(3) and not checkpoint.CheckpointManager(tmp_path, every=0).due(3)


def test_rng_round_trip() -> None:
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_state_loads_with_weights_only(tmp_path: Path) -> None:
    path = save(checkpoint.CheckpointManager(tmp_path, every=1), 7, 1.0)
    _, state, _ = checkpoint.load(path)  # torch.load(weights_only=True) inside
    assert state["step"] == 7


def test_resolve_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert checkpoint.resolve_resume(None, run) is None
    assert checkpoint.resolve_resume("auto", run) is None  # nothing yet: start fresh
    manager = checkpoint.CheckpointManager(run / "checkpoints", every=1)
    save(manager, 1, 0.0)
    last = save(manager, 2, 0.0)
    assert checkpoint.resolve_resume("auto", run) == last
    assert checkpoint.resolve_resume(str(run), tmp_path / "other") == last
    assert checkpoint.resolve_resume(str(last), tmp_path / "other") == last
    with pytest.raises(DataError, match="resume"):
        checkpoint.resolve_resume(str(tmp_path / "nothing"), run)


def test_damaged_checkpoint_is_skipped_by_auto_and_refused_by_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    manager = checkpoint.CheckpointManager(run / "checkpoints", every=1, keep=3)
    first, second = save(manager, 1, 0.0), save(manager, 2, 0.0)
    assert checkpoint.damage(second) is None
    state = second / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])  # cut off, as by a full disk
    assert "state.pt is damaged" in checkpoint.damage(second)
    with caplog.at_level("WARNING"):
        assert checkpoint.resolve_resume("auto", run) == first
    assert "skipping checkpoint step-2" in caplog.text
    with pytest.raises(DataError, match="state.pt is damaged"):
        checkpoint.resolve_resume(str(second), run)
    with pytest.raises(DataError, match="state.pt is damaged"):
        checkpoint.resolve_resume(str(run), tmp_path / "other")  # its newest is step-2
    (first / "trainable.safetensors").unlink()
    assert checkpoint.resolve_resume("auto", run) is None  # nothing intact: start fresh


def test_bad_checkpoint_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        checkpoint.CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ConfigError, match="checkpoint.every"):
        checkpoint.CheckpointManager(tmp_path, every=-1)


def test_perf_summary_skips_the_first_step() -> None:
    history = [
        {
            M.REWARD_MEAN: 0.0,
            M.STEP_TIME: t,
            M.TIME_GENERATE: t / 2,
            M.TIME_SCORE: 0.1,
            M.TIME_FORWARD: 0.2,
            M.TIME_OPTIMIZE: 0.3,
        }
        for t in (9.0, 1.0, 3.0, 2.0)
    ]
    out = perf_summary(history, batch_size=16, device=torch.device("cpu"))
    assert out[M.MEDIAN_STEP_S] == 2.0  # median of 1, 3, 2
    assert out[M.SAMPLES_PER_S] == 8.0
    assert out["perf/median_time/generate"] == 1.0
    assert out[M.PEAK_RSS_MB] > 10
    assert M.PEAK_CUDA_MB not in out  # GPU memory only for CUDA runs
