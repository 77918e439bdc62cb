"""Atomic PPO checkpoints and exact resume.

A checkpoint is a folder ``<run_dir>/checkpoints/step-<N>/`` with
- ``trainable.safetensors``: every trainable tensor (LoRA adapter + value head, or the whole
  network with full fine-tuning),
- ``state.pt``: optimizer, grad scaler, KL controller, score statistics, data order and
  position, step counter, RNG states (python, numpy, torch, CUDA), all plain tensors and
  containers so that it loads with ``torch.load(weights_only=True)``,
- ``meta.json``: step, W&B run id, the tracked metric, and the sha256 of the other files.
It is written to a temporary folder and renamed into place, so a crash never leaves a
half-written checkpoint; the newest ``keep`` are kept, plus ``best`` (by ``best_metric``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from detox_exp.errors import ConfigError, DataError

PREFIX = "step-"
FILES = ("trainable.safetensors", "state.pt")

log = logging.getLogger(__name__)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a missing file, unreadable meta.json, or a file
    whose sha256 differs from the one recorded in meta.json), or None if it is intact."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"{path / 'meta.json'} is unreadable"
    recorded = meta.get("sha256") or {}
    for name in FILES:
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if name in recorded and sha256(file) != recorded[name]:
            return f"{file} is damaged (its sha256 differs from meta.json's)"
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / lists (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
            "kind": kind,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`. CUDA states are restored for the devices this process
    has: a checkpoint written on more GPUs than are visible now (or on a GPU machine, resumed
    on CPU) restores the first ``min(saved, torch.cuda.device_count())``."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        for index, cuda_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "meta.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``resume=auto``: the newest checkpoint of this run dir (None if there is none);
    ``resume=PATH``: a checkpoint folder, or a run dir / checkpoints folder holding one."""
    if resume is None:
        return None
    if resume == "auto":  # the newest intact one, warning about each damaged one skipped
        for found in reversed(list_checkpoints(run_dir / "checkpoints")):
            problem = damage(found)
            if problem is None:
                return found
            log.warning("resume=auto: skipping checkpoint %s: %s", found.name, problem)
        return None
    path = Path(resume).expanduser()
    if not (path / "meta.json").is_file():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        path = found[-1] if found else None
    if path is not None:
        problem = damage(path)
        if problem is not None:
            raise DataError(
                "resume",
                problem,
                "resume from an intact checkpoint (resume=PATH to an older step-N, or "
                "resume=auto, which skips damaged ones)",
            )
        return path
    raise DataError(
        "resume", f"no checkpoint at {resume}", "pass a checkpoint dir, a run dir, or resume=auto"
    )


class CheckpointManager:
    """Writes checkpoints every ``every`` steps, keeps the newest ``keep`` and the best."""

    def __init__(
        self,
        folder: Path,
        every: int = 0,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
    ) -> None:
        if every < 0:
            raise ConfigError("checkpoint.every", f"must be >= 0, got {every}", "0 turns it off")
        if keep < 1:
            raise ConfigError("checkpoint.keep", f"must be >= 1, got {keep}", "raise it")
        if best_mode not in ("max", "min"):
            raise ConfigError("checkpoint.best_mode", f"unknown {best_mode!r}", "use max or min")
        self.folder, self.every, self.keep = Path(folder), every, keep
        self.best_metric, self.best_mode = best_metric, best_mode

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        meta: dict[str, Any],
    ) -> Path:
        """Atomically write checkpoint ``step``; prune; refresh ``best``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{PREFIX}{step}"
        tmp = self.folder / f".tmp-{PREFIX}{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp / "trainable.safetensors"),
        )
        torch.save(state, tmp / "state.pt")
        sums = {name: sha256(tmp / name) for name in FILES}
        (tmp / "meta.json").write_text(json.dumps(meta | {"step": step, "sha256": sums}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._update_best(final, meta)
        for old in list_checkpoints(self.folder)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _update_best(self, path: Path, meta: dict[str, Any]) -> None:
        value = (meta.get("metrics") or {}).get(self.best_metric or "")
        if value is None:
            return
        best = self.folder / "best"
        if (best / "meta.json").is_file():
            old = (
                json.loads((best / "meta.json").read_text())
                .get("metrics", {})
                .get(self.best_metric)
            )
            if old is not None and (value <= old if self.best_mode == "max" else value >= old):
                return
        tmp = self.folder / f".tmp-best-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp)
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)


def load(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable tensors, state, meta) of a checkpoint, loaded safely.

    Every tensor lands on ``map_location``, not on the device it was saved from: the main
    process writes optimizer state from its own GPU (``cuda:0``), which a process on another
    GPU, or on a machine with fewer GPUs, must not be handed. The default, the CPU, suits
    every process: ``load_state_dict`` of the model, optimizer and grad scaler moves each
    tensor to its parameter's device, and RNG and generator states must be CPU tensors."""
    tensors = load_file(str(path / "trainable.safetensors"), device=str(map_location))
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    return tensors, state, read_meta(path)


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``: its ``step``, the W&B run id and the step's metrics."""
    return json.loads((path / "meta.json").read_text())
