"""The benchmark experiment on a DIR from scripts/make_bench_dir.py writes its perf numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_bench_experiment(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    made = subprocess.run(
        [
            sys.executable,
            "scripts/make_bench_dir.py",
            "--size",
            "small",
            "--out",
            str(bench),
            "--prompts",
            "40",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert "11.5M parameters" in made.stdout
    result = run_cli(
        "experiment=bench",
        f"model.name_or_path={bench}/policy",
        f"reward.name_or_path={bench}/reward",
        "dataset=jsonl",
        f"dataset.path={bench}/prompts.jsonl",
        "ppo.steps=3",
        f"hydra.run.dir={tmp_path}/run",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["perf/samples_per_s"] == pytest.approx(16 / summary["perf/median_step_s"])
    assert summary["perf/peak_rss_mb"] > 100
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["tokens/response_len_mean"] == 32 for x in lines)  # exactly 32 new tokens
    assert not (tmp_path / "run" / "eval").exists()  # no evaluation
