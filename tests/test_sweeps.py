"""Hydra multiruns: one W&B run per job in one group, failures recorded, Optuna search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.run import ROOT, run_cli
from tests.wandb_file import read_wandb_records

pytestmark = pytest.mark.slow


def test_multirun_groups_jobs_and_survives_a_failing_job(demo_cache: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "experiment=demo_small",
        "debug=fast",
        "ppo.gamma=1.0,0.9,1.5",
        "logger.wandb.mode=offline",
        "stages.train_reward=false",
        "stages.evaluate_after=false",
        "ppo.steps=1",
        f"hydra.sweep.dir={sweep}",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    by_job = {r["job"]: r for r in rows}
    assert [by_job[j]["status"] for j in range(3)] == ["ok", "ok", "failed"]
    assert "ppo.gamma" in by_job[2]["error"]
    table = (sweep / "sweep_summary.md").read_text()
    assert "ppo.gamma=1.5" in table
    assert f"failed: {by_job[2]['error']}".replace("|", "/") in table  # the reason, too
    runs = [
        read_wandb_records(f)["run"]
        for f in sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    ]
    # the bad config fails its checks before anything starts: no W&B run for that job
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 2
    assert {r["group"] for r in runs} == {f"debug/{sweep.name}"}
    # job_type: the job's overrides (cut to W&B's 64 characters); tags: each override
    assert sorted(r["job_type"].lower() for r in runs) == [
        f"experiment=demo_small,debug=fast,ppo.gamma={g},stages.train_reward=false"[:64]
        for g in ("0.9", "1.0")
    ]
    assert any("ppo.gamma=1.0" in r["tags"] for r in runs)
    # the multirun ends with its table, the sweep folder and the way to compare its runs
    tail = result.stdout.rstrip().splitlines()[-3:]
    assert tail == [
        f"sweep dir: {sweep}",
        f"summary: {sweep / 'sweep_summary.md'}",
        f"compare the runs: detox-exp-compare {sweep}",
    ]
    assert table in result.stdout


def test_optuna_search_two_trials(demo_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "logger=none",
        "ppo.steps=1",
        "stages.train_reward=false",
        "reward.name_or_path=${assets.cache_dir}/reward_init",
        f"hydra.sweep.dir={sweep}",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) >= {
        "ppo.optimizer.lr",
        "model.lora.r",
        "ppo.advantage_estimator",
    }
    assert isinstance(best["best_value"], float)
    rows = [json.loads(x) for x in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert min(r["objective"] for r in rows) == pytest.approx(best["best_value"])


def test_summary_table_keeps_one_row_per_job(tmp_path: Path) -> None:
    from detox_exp.sweeps import JobInfo, record_job

    error = "InstantiationException: Error in call to 'int':\nValueError('a | b')"
    record_job(JobInfo(True, 0, ["seed=1"], tmp_path), "failed", {}, tmp_path / "0", error)
    record_job(JobInfo(True, 1, ["seed=2"], tmp_path), "ok", {}, tmp_path / "1")
    rows = (tmp_path / "sweep_summary.md").read_text().splitlines()
    assert len(rows) == 4  # header, rule, two jobs
    assert "failed: InstantiationException: Error in call to 'int': ValueError('a / b')" in rows[2]
    assert (
        json.loads((tmp_path / "sweep_summary.jsonl").read_text().splitlines()[0])["error"] == error
    )
