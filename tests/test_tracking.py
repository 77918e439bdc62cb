"""Tracker: where it says the W&B run is, per mode; how the W&B mode and run name are chosen;
what an offline run file holds (metric definitions, the model artifact)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detox_exp import metric_names as M
from detox_exp.tracking import Tracker
from detox_exp.wandb_run import (
    NAME_MAX_CHARS,
    WANDB_MAX_METADATA_KEYS,
    choose_wandb_mode,
    hydra_run_name,
    model_metadata,
    run_name,
    wandb_logged_in,
)
from tests.helpers.run import CONF_DIR
from tests.wandb_file import (
    read_artifacts,
    read_history,
    read_metric_definitions,
    read_wandb_records,
)


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


# ------------------------------------------------------------------ W&B mode
def test_choose_wandb_mode_order() -> None:
    def logged_in() -> bool:
        return True

    def logged_out() -> bool:
        return False

    assert choose_wandb_mode("offline", {"WANDB_MODE": "online"}, logged_in) == "offline"
    assert choose_wandb_mode(None, {"WANDB_MODE": "disabled"}, logged_in) == "disabled"
    assert choose_wandb_mode(None, {"WANDB_MODE": "dryrun"}, logged_in) == "offline"
    assert choose_wandb_mode(None, {"WANDB_DISABLED": "true"}, logged_in) == "disabled"
    assert choose_wandb_mode(None, {"WANDB_MODE": "bogus"}, logged_out) == "offline"
    assert choose_wandb_mode(None, {}, logged_in) == "online"
    assert choose_wandb_mode(None, {}, logged_out) == "offline"


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME without W&B credentials; NETRC points at its (absent) .netrc."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def test_wandb_login_netrc_entry_means_online(wandb_home: Path) -> None:
    # what `wandb login` writes; read by wandb's own helpers, no server contacted
    assert not wandb_logged_in()
    assert choose_wandb_mode(None, {}) == "offline"
    netrc = wandb_home / ".netrc"
    netrc.write_text("machine example.com\n  login user\n  password " + "b" * 40 + "\n")
    netrc.chmod(0o600)
    assert not wandb_logged_in()  # an entry for another host
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    assert wandb_logged_in()
    assert choose_wandb_mode(None, {}) == "online"
    assert choose_wandb_mode(None, {"WANDB_MODE": "offline"}) == "offline"


def test_wandb_api_key_means_online(wandb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "c" * 40)
    assert choose_wandb_mode(None, {}) == "online"


# ------------------------------------------------------------------ run name
def test_run_name_from_task_and_overrides(monkeypatch) -> None:
    groups = {"experiment", "ppo", "ppo/kl_controller", "logger", "hydra/launcher"}
    overrides = [
        "experiment=demo",
        "ppo=rloo",
        "seed=1",
        "hydra.run.dir=/tmp/x",
        "logger.wandb.mode=offline",
        "hydra/launcher=local_parallel",
        "paths.cache_dir=/c",
        "resume=auto",
        "torch_threads=2",
    ]
    assert run_name("demo", overrides, groups) == "demo rloo seed=1"
    assert run_name("demo", [], groups) == "demo"
    assert (
        run_name("flan_t5_dialogsum", ["ppo/kl_controller=adaptive", "+extra.x=2", "~eval"], groups)
        == "flan_t5_dialogsum adaptive extra.x=2 ~eval"
    )
    assert run_name("bench", ["experiment=demo"], groups) == "bench demo"
    assert len(run_name("t", [f"k{i}=v" for i in range(100)], groups)) == NAME_MAX_CHARS
    from hydra.core.hydra_config import HydraConfig

    # outside Hydra (another test in this process may have set a config): W&B's own name
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    assert hydra_run_name("demo") is None


# ------------------------------------------------------- an offline run, read back
@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One offline W&B run started inside a composed Hydra job (experiment=demo ppo=grpo
    seed=3), with two PPO steps, a summary and a model artifact; its run file read back."""
    import wandb
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    run_dir = tmp_path_factory.mktemp("offline_run")
    overrides = ["experiment=demo", "ppo=grpo", "seed=3", "logger.wandb.mode=offline"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    merged = run_dir / "policy" / "merged"
    merged.mkdir(parents=True)
    (merged / "README.md").write_text("# policy\n\nThe card.\n")
    (merged / "model.safetensors").write_bytes(b"\0" * 64)
    HydraConfig.instance().set_config(cfg)
    try:
        tracker = Tracker(run_dir, {"project": "p", "mode": "offline", "name": None})
        tracker.start({"task_name": cfg.task_name, "seed": 3})
        tracker.log_table("before_ppo/table", ["a"], [[1]], step=None)  # e.g. the frontier
        tracker.log_histograms({"before_ppo/hist": [0.1, 0.2]}, step=None)
        for step in (1, 2):
            tracker.log({M.REWARD_MEAN: -step, M.KL: 0.1 * step, M.LOSS_POLICY: 0.5}, step=step)
        tracker.log_summary({"eval/after/toxicity_mean": 0.25, "eval/after/note": "x"})
        tracker.log_model(merged)
        run_id = tracker.run.id
        tracker.finish()
    finally:
        HydraConfig.instance().cfg = None
        wandb.teardown()  # waits for W&B's service to write the whole run file
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return {
        "id": run_id,
        "records": read_wandb_records(path),
        "metrics": read_metric_definitions(path),
        "artifacts": read_artifacts(path),
        "history": read_history(path)[1],
    }


def test_offline_run_has_readable_name(offline_run: dict) -> None:
    assert offline_run["records"]["run"]["name"] == "demo grpo seed=3"


def test_ppo_metrics_plot_against_step_and_keep_last(offline_run: dict) -> None:
    metrics = offline_run["metrics"]
    assert metrics["step"]["hidden"]
    for namespace in ("env", "objective", "ppo"):
        assert metrics[f"{namespace}/*"]["step_metric"] == "step"
        assert metrics[f"{namespace}/*"]["summary"] == ["last"]
    rows = offline_run["history"]
    # W&B's row counter is the PPO step: what is logged before PPO without a step is row 0,
    # and PPO step 1 is not dropped as a step below W&B's counter
    assert sorted(rows) == [0, 1, 2]
    assert "before_ppo/table" in {k.split("/_")[0] for k in rows[0]} and "step" not in rows[0]
    assert [rows[s][M.REWARD_MEAN] for s in (1, 2)] == [-1, -2]


def test_log_model_logs_the_merged_policy_with_its_card(offline_run: dict) -> None:
    (artifact,) = [a for a in offline_run["artifacts"] if a["type"] != "run_table"]
    assert artifact["type"] == "model"
    assert artifact["name"] == f"policy-{offline_run['id']}"
    assert artifact["description"] == "# policy\n\nThe card.\n"
    assert artifact["paths"] == ["README.md", "model.safetensors"]
    assert artifact["metadata"] == {"eval/after/toxicity_mean": 0.25}


def offline_tracker_run(run_dir: Path, log_model: bool = True, calls=None) -> dict:
    """An offline Tracker run: one PPO step, ``calls(tracker)``, a summary, finish; what its
    run file holds."""
    import wandb

    tracker = Tracker(run_dir, {"project": "p", "mode": "offline"}, log_model=log_model)
    tracker.start({"seed": 1})
    tracker.log({M.KL: 0.1}, step=1)
    if calls is not None:
        calls(tracker)
    tracker.log_summary({"eval/after/toxicity_mean": 0.2, "time/stage/ppo_s": 1.0})
    tracker.finish(exit_code=0)
    wandb.teardown()
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return {"records": read_wandb_records(path), "artifacts": read_artifacts(path)}


def test_a_failed_wandb_call_costs_only_that_call(tmp_path: Path, caplog) -> None:
    """The artifact upload fails (its folder is missing): one warning naming what W&B lost,
    and the summary logged after it and the exit code still reach the run file."""
    with caplog.at_level("WARNING"):
        run = offline_tracker_run(tmp_path, calls=lambda t: t.log_model(tmp_path / "missing"))
    warnings = [r.getMessage() for r in caplog.records if "W&B failed" in r.getMessage()]
    assert len(warnings) == 1 and "the model artifact" in warnings[0], warnings
    assert {"eval/after/toxicity_mean", "time/stage/ppo_s"} <= run["records"]["summary_keys"]
    assert run["records"]["exit_code"] == 0 and M.KL in run["records"]["history_keys"]
    assert not [a for a in run["artifacts"] if a["type"] == "model"]


def test_log_model_switched_off_uploads_nothing(tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "README.md").write_text("# card\n")
    run = offline_tracker_run(tmp_path, log_model=False, calls=lambda t: t.log_model(merged))
    assert not [a for a in run["artifacts"] if a["type"] == "model"]
    assert "eval/after/toxicity_mean" in run["records"]["summary_keys"]


def test_model_metadata_fits_wandb_whatever_the_summary() -> None:
    """A summary of real size (the demo's has 150+ keys: eval/{before,after,optimum}/*,
    eval/delta/* with CIs, ...): the metadata keeps the identity and the headline metrics
    (finite ones: W&B refuses inf), within W&B's limit, and W&B accepts it."""
    import wandb

    summary = {f"eval/delta/metric_{i}_ci_low": 0.1 * i for i in range(300)}
    summary |= {key: 0.5 for key in M.MODEL_METADATA_METRICS}
    summary[M.OPTIMUM_KL_RATIO] = float("inf")
    identity = {"base_model": "google/flan-t5-base", "reward_model": "/run/reward_model"}
    metadata = model_metadata(summary, identity)
    assert len(metadata) <= WANDB_MAX_METADATA_KEYS
    assert metadata["reward_model"] == "/run/reward_model"
    assert M.OPTIMUM_KL_RATIO not in metadata
    assert {k for k in M.MODEL_METADATA_METRICS if k != M.OPTIMUM_KL_RATIO} <= set(metadata)
    wandb.Artifact("policy-x", type="model", metadata=metadata)  # W&B's own validation
    finite = {k: v for k, v in summary.items() if k != M.OPTIMUM_KL_RATIO}
    with pytest.raises(ValueError, match="metadata keys"):  # what the whole summary meets
        wandb.Artifact("policy-x", type="model", metadata=finite | identity)
