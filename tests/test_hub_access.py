"""A hub id the run cannot fetch stops the run at once (one line naming HF_HUB_OFFLINE), not
after huggingface_hub's retries (about 25 s per file); with every id in the local cache the
run goes on offline. The hub is a closed local port (``HF_ENDPOINT``)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from detox_exp import hub
from detox_exp.errors import DataError
from tests.helpers.cli import check_one_line_error
from tests.helpers.config import compose_cfg
from tests.helpers.run import ROOT, run_cli
from tests.test_hub_loading import plant

REAL_IDS = [
    ("model.name_or_path", "google/flan-t5-base", "model"),
    ("dataset.path", "knkarthick/dialogsum", "dataset"),
    ("reward.name_or_path", "facebook/roberta-hate-speech-dynabench-r4-target", "model"),
]


def closed_port() -> int:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def hub_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process with an empty HF cache, online, whose hub is a closed port; the offline
    switch (go_offline) is undone after the test. Returns the cache dir."""
    import datasets.config
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_the_real_experiment_names_its_hub_ids(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=flan_t5_dialogsum"], tmp_path)
    found = [(i.field, i.repo_id, i.repo_type) for i in hub.hub_ids(cfg)]
    assert sorted(found) == sorted(REAL_IDS)
    assert hub.hub_ids(compose_cfg(["experiment=demo"], tmp_path)) == []  # built locally


def test_an_uncached_id_with_the_hub_down_is_one_line(hub_down: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=flan_t5_dialogsum"], tmp_path)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        hub.check_hub_access(cfg)
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 5
    assert info.value.field == "model.name_or_path"
    assert "google/flan-t5-base" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)
    assert not hub.offline()


def test_every_id_cached_with_the_hub_down_goes_offline(
    hub_down: Path, tmp_path: Path, standins
) -> None:
    plant(hub_down, "models", "google/flan-t5-base", standins["policy"])
    plant(hub_down, "models", REAL_IDS[2][1], standins["reward"])
    data = tmp_path / "dialogsum"
    data.mkdir()
    (data / "train.csv").write_text("id,dialogue,summary\n")
    cfg = compose_cfg(["experiment=flan_t5_dialogsum"], tmp_path)
    ids = hub.hub_ids(cfg)
    assert [i.repo_id for i in ids if not hub.cached(i)] == ["knkarthick/dialogsum"]
    with pytest.raises(DataError, match="dataset.path: .*knkarthick/dialogsum"):
        hub.check_hub_access(cfg)
    plant(hub_down, "datasets", "knkarthick/dialogsum", data)
    hub.check_hub_access(cfg)
    assert hub.offline()  # transformers / datasets now read the cache without retries
    import datasets.config

    assert datasets.config.HF_HUB_OFFLINE


def test_a_snapshot_without_weights_is_not_cached(tmp_path: Path, standins) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text((Path(standins["policy"]) / "config.json").read_text())
    plant(tmp_path / "hub", "models", "org/model", folder)
    assert not hub.cached(hub.HubId("f", "org/model", "model"), tmp_path / "hub")
    plant(tmp_path / "hub", "models", "org/full", Path(standins["policy"]))
    assert hub.cached(hub.HubId("f", "org/full", "model"), tmp_path / "hub")


def test_unreachable_hub_stops_the_run_at_once(tmp_path: Path) -> None:
    """The real experiment, nothing cached, the hub a closed port: exit 2 with one line
    before any stage (about 25 s of retries per file otherwise)."""
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "HF_HUB_OFFLINE": "",
        "TRANSFORMERS_OFFLINE": "",
    }
    start = time.perf_counter()
    result = run_cli(
        "experiment=flan_t5_dialogsum",
        "logger=none",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    took = time.perf_counter() - start  # a fresh interpreter: its imports included
    print(f"refused after {took:.1f} s")
    check_one_line_error(result, "model.name_or_path", "google/flan-t5-base", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in result.stderr
    assert not (tmp_path / "run" / "data").exists()  # before any stage
    assert took < 60
