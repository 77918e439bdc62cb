"""Tracker: where it says the W&B run is, per mode (the end-to-end tests cover offline)."""

from __future__ import annotations

from pathlib import Path

from detox_exp.tracking import Tracker


def test_location_without_wandb(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path)
    tracker.start({"seed": 1})
    assert tracker.location == "W&B off"
    tracker.finish()


def test_location_with_wandb_disabled_names_no_folder(tmp_path: Path) -> None:
    # mode=disabled runs a no-op W&B run whose .dir is a folder that is never written
    tracker = Tracker(tmp_path, {"project": "p", "mode": "disabled"})
    tracker.start({"seed": 1})
    assert tracker.location == "W&B disabled (mode=disabled)"
    tracker.log({"x": 1.0}, step=1)
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "metrics.jsonl").is_file()
