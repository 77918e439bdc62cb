"""Crash and fault handling: exact resume after SIGKILL, NaN guard, W&B failures, secrets."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detox_exp import checkpoint
from tests.helpers.cli import check_one_line_error
from tests.helpers.run import ROOT, local_overrides, run_cli
from tests.wandb_file import read_history, read_wandb_records, replay_history

pytestmark = pytest.mark.slow

TIMING = ("time/", "perf/")


def steps(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for line in lines:
        assert line["step"] not in by_step, f"duplicate step {line['step']}"
        by_step[line["step"]] = line
    return by_step


def ppo_overrides(standins, run_dir: Path) -> list[str]:
    return local_overrides(standins, run_dir) + [
        "ppo.steps=6",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "stages.evaluate_before=false",
        "eval.num_prompts=4",
        "logger=wandb",
        "logger.wandb.mode=offline",
    ]


STEPS = 10  # of the runs that are stopped and resumed


@pytest.fixture(scope="module")
def full_run(standins, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run the stopped and resumed ones are compared with."""
    full = tmp_path_factory.mktemp("full")
    result = run_cli(*ppo_overrides(standins, full), f"ppo.steps={STEPS}", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return full


def assert_same_steps(full: Path, resumed: Path, after: int) -> None:
    """Steps after ``after`` and the final weights equal the uninterrupted run's."""
    a, b = steps(full), steps(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(after + 1, STEPS + 1):
        for key, value in a[step].items():
            if key.startswith(TIMING) or value is None:
                continue
            assert b[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    weights_a = load_file(full / "policy/adapter/adapter_model.safetensors")
    weights_b = load_file(resumed / "policy/adapter/adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6)


def test_exact_resume_after_sigkill(standins, full_run: Path, tmp_path: Path) -> None:
    full, crashed = full_run, tmp_path / "crashed"
    overrides = [*ppo_overrides(standins, crashed), f"ppo.steps={STEPS}"]
    killed = run_cli(*overrides, "ppo.debug.kill_after_step=3", cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(steps(crashed)) == [1, 2, 3]
    checkpoints = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert checkpoints == ["best", "step-2", "step-3"]  # keep=2, plus the best
    resumed = run_cli(*overrides, "resume=auto", cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_steps(full, crashed, after=3)
    # the same W&B run continues (a SIGKILLed offline writer may lose its buffered records,
    # metrics.jsonl does not): one run id across both processes' offline folders
    folders = sorted(crashed.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1
    resumed_run = read_wandb_records(next(folders[1].glob("*.wandb")))["run"]
    assert resumed_run["id"] == folders[0].name.rsplit("-", 1)[1]


def signal_at(run_dir: Path, step: int, signum: int):
    """``while_running`` for run_cli: send ``signum`` once metrics.jsonl has ``step``."""

    def send(pid: int) -> None:
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.is_file() and any(
                json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()
            ):
                os.kill(pid, signum)
                return
            time.sleep(0.01)

    return send


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(
    standins, full_run: Path, tmp_path: Path, signum: int
) -> None:
    """Ctrl-C or a scheduler's SIGTERM during PPO: the run finishes its step, writes a
    checkpoint (none is due: checkpoint.every=0), prints one line and exits 128 + signum;
    the command in that line continues it exactly, reusing the frontier's files."""
    run_dir = tmp_path / "stopped"
    overrides = [*ppo_overrides(standins, run_dir), f"ppo.steps={STEPS}", "checkpoint.every=0"]
    stopped = run_cli(*overrides, cwd=ROOT, while_running=signal_at(run_dir, 2, signum))
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    lines = [x for x in stopped.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    last = max(steps(run_dir))
    assert sorted(steps(run_dir)) == list(range(1, last + 1)) and 2 <= last < STEPS
    name = signal.Signals(signum).name
    line = lines[0]
    assert line.startswith(f"detox-exp: stopped by {name} at step {last};"), line
    assert f"checkpoint {run_dir / 'checkpoints' / f'step-{last}'}" in line
    assert checkpoint.damage(run_dir / "checkpoints" / f"step-{last}") is None
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    record = read_wandb_records(run_file)
    assert record["exit_code"] == 128 + signum
    assert ("preempted" if signum == signal.SIGTERM else "interrupted") in record["run"]["tags"]

    frontier = run_dir / "frontier" / "draws.jsonl"
    written = frontier.stat().st_mtime_ns
    command = shlex.split(line.split("resume with: ")[1])
    assert command[0] == "detox-exp" and command[-1] == "resume=auto"
    # W&B not silenced, so that it would print a "less than the current step" warning for
    # anything logged at a step the rewound run has passed
    resumed = run_cli(*command[1:], cwd=ROOT, env={"WANDB_SILENT": "false"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "less than the current step" not in resumed.stderr, resumed.stderr[-3000:]
    assert_same_steps(full_run, run_dir, after=last)
    assert frontier.stat().st_mtime_ns == written  # read back, not sampled again
    assert "frontier: reusing" in (run_dir / "cli.log").read_text()


def test_wandb_history_after_resume_holds_each_step_once(standins, tmp_path: Path) -> None:
    """Stopped at step 4 with the last checkpoint at step 2, then resumed: step 3 is
    recomputed. The W&B run is rewound to step 2, so that (replaying the offline run files as
    a sync would) each step appears once, with the values in metrics.jsonl."""
    overrides = ppo_overrides(standins, tmp_path) + ["checkpoint.every=2"]
    stopped = run_cli(*overrides, "ppo.debug.nan_at_step=4", cwd=ROOT)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert sorted(steps(tmp_path)) == [1, 2, 3]
    resumed = run_cli(*overrides, "resume=auto", cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    files = [next(f.glob("*.wandb")) for f in sorted(tmp_path.glob("wandb/offline-run-*"))]
    assert len(files) == 2
    assert 3 in read_history(files[0])[1]  # the first run did log step 3
    history, repeated = replay_history(files)
    assert repeated == []
    jsonl = steps(tmp_path)
    assert sorted(jsonl) == [1, 2, 3, 4, 5, 6]
    # W&B also has step 0: the frontier stage's table and plot, logged before PPO
    assert sorted(history) == [0, *sorted(jsonl)]
    for step, line in jsonl.items():
        for key, value in line.items():
            if key == "step" or key.startswith(TIMING) or value is None:
                continue
            assert history[step][key] == pytest.approx(value, abs=1e-6), (step, key)


def test_damaged_newest_checkpoint(standins, tmp_path: Path) -> None:
    """A cut-off state.pt in the newest checkpoint: resume=auto warns in one line and goes on
    from the one before; resume=PATH to it stops with one line naming the file."""
    overrides = ppo_overrides(standins, tmp_path) + ["ppo.steps=3", "stages.evaluate_after=false"]
    assert run_cli(*overrides, cwd=ROOT).returncode == 0
    state = tmp_path / "checkpoints" / "step-3" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    direct = run_cli(*overrides, f"resume={state.parent}", cwd=ROOT)
    check_one_line_error(direct, "resume", "step-3/state.pt", "damaged")
    resumed = run_cli(*overrides, "resume=auto", cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    console = resumed.stdout + resumed.stderr  # Hydra's log handler writes to stdout
    warnings = [x for x in console.splitlines() if "skipping checkpoint step-3" in x]
    assert len(warnings) == 1 and "Traceback" not in console
    assert "resumed from" in console and "step-2" in console
    assert sorted(steps(tmp_path)) == [1, 2, 3]


def test_nan_stops_with_clear_error_after_keeping_a_checkpoint(standins, tmp_path: Path) -> None:
    result = run_cli(*ppo_overrides(standins, tmp_path), "ppo.debug.nan_at_step=3", cwd=ROOT)
    assert result.returncode == 3
    line = [x for x in result.stderr.splitlines() if x.startswith("detox-exp: error:")]
    assert len(line) == 1 and "Traceback" not in result.stderr
    assert "ppo step 3" in line[0] and "scores" in line[0] and "step-2" in line[0]
    assert (tmp_path / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    assert sorted(steps(tmp_path)) == [1, 2]


def test_nan_batch_skipped_when_configured(standins, tmp_path: Path) -> None:
    result = run_cli(
        *ppo_overrides(standins, tmp_path),
        "ppo.debug.nan_at_step=2",
        "ppo.on_nonfinite=skip",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    by_step = steps(tmp_path)
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    assert by_step[2]["ppo/skipped_batches"] == 1 and "env/reward_mean" not in by_step[2]
    assert by_step[6]["ppo/skipped_batches"] == 1


def test_wandb_unreachable_run_goes_on(standins, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"}
    overrides = ppo_overrides(standins, tmp_path) + [
        "logger.wandb.mode=online",
        "logger.wandb.init_timeout=3",
        "ppo.steps=2",
    ]
    result = run_cli(*overrides, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(steps(tmp_path)) == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "eval/after/toxicity_mean" in summary
    log = (tmp_path / "cli.log").read_text()
    assert log.count("W&B failed") == 1


def test_secrets_never_reach_the_run_dir(standins, tmp_path: Path) -> None:
    secret = "s3cr3t" + "k" * 34
    overrides = ppo_overrides(standins, tmp_path) + ["ppo.steps=1"]
    result = run_cli(*overrides, cwd=ROOT, env={"WANDB_API_KEY": secret})
    assert result.returncode == 0, result.stderr[-2000:]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_resume_path_without_checkpoint(standins, tmp_path: Path) -> None:
    overrides = local_overrides(standins, tmp_path / "run") + [f"resume={tmp_path}"]
    check_one_line_error(run_cli(*overrides, cwd=ROOT), "resume", "no checkpoint")


def test_unwritable_output_dir(standins, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    overrides = local_overrides(standins, blocker / "run")
    check_one_line_error(run_cli(*overrides, cwd=ROOT), "paths.output_dir", "writable")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_uncreatable_output_dir(standins, tmp_path: Path) -> None:
    # not a permission error: mkdir under /proc fails with ENOENT while Hydra sets up the job
    overrides = local_overrides(standins, Path("/proc/detox_exp_no_such_dir/run"))
    check_one_line_error(run_cli(*overrides, cwd=ROOT), "paths.output_dir", "/proc")
