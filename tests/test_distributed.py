"""Two CPU processes (gloo) run PPO together: shared weights, global metrics. One test starts
them with torchrun; the others with torchrun's environment from the pre-imported test parent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detox_exp.training.loop import sampling_stream
from tests.helpers.run import ROOT, local_overrides, run_ranks

pytestmark = pytest.mark.slow


def run_two_processes(
    standins,
    run_dir: Path,
    port: int,
    *extra: str,
    check: bool = True,
    launcher: str = "fork",
) -> subprocess.CompletedProcess:
    """The entrypoint on 2 CPU processes (gloo), weights digested per step, started by
    torchrun (``launcher="torchrun"``, as users run it) or with torchrun's environment from
    the pre-imported test parent (``"fork"``: the same ranks without 2 x 10-15 s of imports;
    torchrun off Linux)."""
    overrides = [o for o in local_overrides(standins, run_dir) if not o.startswith("hydra.run")]
    overrides += [f"hydra.run.dir={run_dir}", "ppo.steps=2", "ppo.debug.param_digest=true"]
    overrides += ["torch_threads=1", *extra]
    env = {"CI": "true", "OMP_NUM_THREADS": "1"}
    if launcher == "fork" and sys.platform == "linux":
        result = run_ranks(*overrides, nproc=2, port=port, cwd=ROOT, env=env, timeout=600)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(port), "-m", "detox_exp", *overrides]
        result = subprocess.run(
            cmd, cwd=ROOT, env=os.environ | env, capture_output=True, text=True, timeout=600
        )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_process_ppo(standins, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_two_processes(
        standins,
        run_dir,
        29533,
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "eval.num_prompts=4",
        launcher="torchrun",
    )
    digests = {
        rank: [
            json.loads(x)
            for x in (run_dir / f"param_digests/rank{rank}.jsonl").read_text().splitlines()
        ]
        for rank in (0, 1)
    }
    assert [d["step"] for d in digests[0]] == [1, 2] == [d["step"] for d in digests[1]]
    for a, b in zip(digests[0], digests[1]):
        assert a["digest"] == b["digest"]  # identical weights after every step
        assert a["n"] == b["n"] == 4  # each process scored its half of the batch of 8
    assert digests[0][0]["digest"] != digests[0][1]["digest"]  # and they did train
    # each process samples from its own stream, seeded from (seed, rank, step)
    seed = OmegaConf.load(run_dir / ".hydra/config.yaml").seed
    probes = {(r, d["step"]): d["stream_probe"] for r in (0, 1) for d in digests[r]}
    assert len({tuple(p) for p in probes.values()}) == 4
    for (rank, step), probe in probes.items():
        stream = sampling_stream(seed, rank, step, torch.device("cpu"))
        assert probe == torch.rand(2, generator=stream).tolist()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # logged once, by the main process
    for line, a, b in zip(lines, digests[0], digests[1]):
        global_mean = (a["reward_sum"] + b["reward_sum"]) / (a["n"] + b["n"])
        assert line["env/reward_mean"] == pytest.approx(global_mean, abs=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "eval/after/toxicity_mean" in summary
    assert (run_dir / "policy/merged/config.json").is_file()


@pytest.mark.parametrize(("mini_batch_size", "port"), [(8, 29534), (16, 29538)])
def test_two_process_group_sampling(
    standins, tmp_path: Path, mini_batch_size: int, port: int
) -> None:
    """k = 4 samples per prompt on 2 processes: each process holds whole groups, and the
    logged group statistics are those of all groups of the global batch. With one minibatch
    per batch the update runs on the rollout's pass (fast.reuse_rollout_forward) under DDP."""
    import statistics

    run_dir = tmp_path / "run"
    run_two_processes(
        standins,
        run_dir,
        port,
        "ppo=rloo",
        "ppo.batch_size=16",
        f"ppo.mini_batch_size={mini_batch_size}",
        "ppo.ppo_epochs=1",
        "stages.evaluate_before=false",
        "stages.evaluate_after=false",
    )
    digests = [
        [json.loads(x) for x in (run_dir / f"param_digests/rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line, a, b in zip(lines, digests[0], digests[1], strict=True):
        assert a["digest"] == b["digest"]  # identical weights after every step
        # 16 samples = 4 prompts x 4: each process scored 2 whole groups of 4
        assert a["n"] == b["n"] == 8
        groups = a["group_scores"] + b["group_scores"]
        assert len(groups) == 4 and all(len(g) == 4 for g in groups)
        flat = [s for g in groups for s in g]
        assert line["env/reward_mean"] == pytest.approx(sum(flat) / 16, abs=1e-5)
        zero = sum(len(set(g)) == 1 for g in groups) / 4
        assert line["ppo/group/zero_std_fraction"] == pytest.approx(zero)
        std = sum(statistics.stdev(g) for g in groups) / 4
        assert line["ppo/group/reward_std"] == pytest.approx(std, rel=1e-4, abs=1e-6)
    assert digests[0][0]["digest"] != digests[0][1]["digest"]  # and they did train


@pytest.mark.parametrize(("wait_timeout_s", "survives"), [(120, True), (3, False)])
def test_slow_main_stage_does_not_time_out_the_others(
    standins, tmp_path: Path, wait_timeout_s: int, survives: bool
) -> None:
    """The main process evaluates 8 s longer than the collectives' timeout of 3 s while the
    other waits: the stage wait's own timeout covers it (and, set to 3 s, would not)."""
    result = run_two_processes(
        standins,
        tmp_path / "run",
        29535 + survives,
        "stages.frontier=false",  # one stage wait fewer (each waits 8 s)
        "stages.ppo=false",
        "stages.evaluate_after=false",
        "eval.num_prompts=4",
        "distributed.timeout_s=3",
        f"distributed.wait_timeout_s={wait_timeout_s}",
        "distributed.debug_wait_delay_s=8",
        check=False,
    )
    assert (result.returncode == 0) == survives, result.stderr[-3000:]
    if not survives:
        assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower()
