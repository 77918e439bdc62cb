"""What the tests share besides fixtures: the repo paths, running the real CLI (through a
pre-imported zygote process), the stand-in run overrides, and a trained-looking LoRA."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
CONF_DIR = ROOT / "conf"
CLI_ENV = {"CI": "true", "WANDB_SILENT": "true"}  # added to every CLI run's environment


# two threads, shared out between pytest-xdist workers (`make test` runs two), in the test
# processes and in the CLI runs they start (more threads than cores makes both slower)
THREADS = max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def trained_lora(model: torch.nn.Module, targets: tuple[str, ...] = ("q", "v")):
    """``model`` wrapped with a LoRA adapter (r=4) on ``targets``, in eval mode, whose B
    matrices are random (a trained-looking, non-zero update) rather than peft's zeros."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="SEQ_2_SEQ_LM")
    torch.manual_seed(0)
    model = get_peft_model(model, lora).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


class _Zygote:
    """One pre-imported parent per test process (``tests/cli_zygote.py``) that forks a child
    per CLI run, so that a run does not pay the 10-15 s of imports of a fresh interpreter."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.buffer = b""

    def start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            env = os.environ.copy() | CLI_ENV
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "cli_zygote.py")],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
            self.buffer = b""
            atexit.register(self.proc.kill)
            self.read(timeout=300)  # {"ready": true}
        return self.proc

    def read(self, timeout: float) -> dict:
        """The next reply line (unbuffered reads: ``select`` sees only what is in the pipe)."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the CLI zygote died (exit {self.proc.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(
        self,
        argv: list[str],
        cwd: Path,
        envs: list[dict],
        timeout: float,
        while_running: Callable[[list[int]], None] | None = None,
    ) -> tuple[int, list[str], list[str]]:
        """One child per environment in ``envs``, all at once -> (exit code, each child's
        stdout, each child's stderr). ``while_running(pids)`` runs in a thread meanwhile
        (e.g. to send the children a signal)."""
        proc = self.start()
        with tempfile.TemporaryDirectory() as tmp:
            files = [(Path(tmp, f"stdout{i}"), Path(tmp, f"stderr{i}")) for i in range(len(envs))]
            children = [
                {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(o), "stderr": str(e)}
                for env, (o, e) in zip(envs, files)
            ]
            proc.stdin.write((json.dumps({"children": children}) + "\n").encode())
            pids = self.read(timeout=60)["pids"]
            helper = None
            if while_running is not None:
                helper = threading.Thread(target=while_running, args=(pids,), daemon=True)
                helper.start()
            try:
                code = self.read(timeout=timeout)["returncode"]
            except TimeoutError:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                self.read(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            finally:
                if helper is not None:
                    helper.join(timeout=60)
            outs = [o.read_text(errors="replace") for o, _ in files]
            return code, outs, [e.read_text(errors="replace") for _, e in files]


_ZYGOTE = _Zygote()
IMPORT_TIME_ENV = ("HF_", "TRANSFORMERS_")


def cli_env(env: dict) -> dict:
    """A CLI run's environment: this process's, without pytest's and Hydra's own settings,
    plus ``CLI_ENV`` and ``env``."""
    full = os.environ.copy() | CLI_ENV
    for key in ("HYDRA_FULL_ERROR", "PYTEST_CURRENT_TEST"):
        full.pop(key, None)
    return full | env


def run_cli(
    *overrides: str,
    cwd: Path,
    env: dict | None = None,
    timeout: int = 600,
    fresh: bool = False,
    while_running: Callable[[int], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real entrypoint in a process of its own: ``python -m detox_exp`` when
    ``fresh``, else ``detox_exp.cli.main`` in a child forked from a pre-imported parent,
    with this process's share of the cores (``torch_threads``) unless given. Settings that
    huggingface_hub / transformers / datasets read at import time (``HF_*``), and every
    run off Linux, get a fresh interpreter. ``while_running(pid)`` runs in a thread while
    the run does (e.g. to send it a signal)."""
    full_env = cli_env(env or {})
    if not any(o.startswith("torch_threads=") for o in overrides):
        overrides = (*overrides, f"torch_threads={THREADS}")
    args = [sys.executable, "-m", "detox_exp", *overrides]
    # fork after importing torch is safe on Linux only (macOS: Objective-C runtime state)
    if (
        fresh
        or sys.platform != "linux"
        or any(key.startswith(IMPORT_TIME_ENV) for key in env or {})
    ):
        with subprocess.Popen(
            args, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            if while_running is not None:
                threading.Thread(target=while_running, args=(proc.pid,), daemon=True).start()
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        return subprocess.CompletedProcess(args, proc.returncode, out, err)
    on_start = None if while_running is None else (lambda pids: while_running(pids[0]))
    code, out, err = _ZYGOTE.run(list(overrides), cwd, [full_env], timeout, on_start)
    return subprocess.CompletedProcess(args, code, out[0], err[0])


def run_ranks(
    *overrides: str, nproc: int, port: int, cwd: Path, env: dict, timeout: int = 600
) -> subprocess.CompletedProcess:
    """The entrypoint on ``nproc`` local processes with the environment torchrun gives its
    workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` / ``MASTER_PORT``, ...),
    forked from the pre-imported parent; a failed rank stops the others, as under torchrun.
    stdout / stderr are the ranks' in rank order. Linux only (see :func:`run_cli`)."""
    base = cli_env(env)
    envs = [
        base
        | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for rank in range(nproc)
    ]
    code, outs, errs = _ZYGOTE.run(list(overrides), cwd, envs, timeout)
    args = ["fork-launch", f"--nproc_per_node={nproc}", *overrides]
    return subprocess.CompletedProcess(args, code, "".join(outs), "".join(errs))


def local_overrides(standins: dict[str, Path], run_dir: Path) -> list[str]:
    """Overrides for a quick real run on the local stand-ins (W&B off)."""
    return [
        "debug=fast",
        "logger=none",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        f"model.name_or_path={standins['policy']}",
        f"reward.name_or_path={standins['reward']}",
        "dataset=jsonl",
        f"dataset.path={standins['prompts']}",
        "dataset.max_eval_samples=8",
    ]
