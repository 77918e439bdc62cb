"""Test-only fault injection of the training loop (``<method>.debug.*``): NaN scores or a
NaN gradient at a chosen step, a hard crash after a step's checkpoint, a digest of the
weights per process and step. The loop applies them where its guard looks
(:meth:`~detox_exp.training.loop.TrainingLoop.check`,
:meth:`~detox_exp.training.loop.TrainingLoop.optimizer_step`) and after its checkpoints; a
method's code holds none."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the ppo.* schema imports LoopDebug and stays light (no torch)
    import torch


@dataclass
class LoopDebug:
    """``<method>.debug``: what to inject (tests)."""

    nan_at_step: int | None = None  # NaN scores at this step (a method that checks them: PPO)
    # a NaN in one gradient of the step's second update (its first if it has one) at this step
    nan_grad_at_step: int | None = None
    kill_after_step: int | None = None  # SIGKILL after this step's checkpoint (a hard crash)
    param_digest: bool = False  # write a hash of the trainable weights per process and step


def poisoned(debug: LoopDebug, quantity: str, values: torch.Tensor, step: int) -> torch.Tensor:
    """``values``, or at ``debug.nan_at_step`` for the "scores" a copy with a NaN."""
    if quantity != "scores" or debug.nan_at_step != step:
        return values
    values = values.clone()
    values.view(-1)[0] = float("nan")
    return values


def poison_gradient(
    debug: LoopDebug, params: Sequence[torch.Tensor], step: int, updates: int, per_step: int
) -> None:
    """At ``debug.nan_grad_at_step``, a NaN in one gradient of ``params`` before the step's
    second optimizer step (``updates`` taken of ``per_step``; the first if it has one)."""
    if debug.nan_grad_at_step == step and updates == min(1, per_step - 1):
        grad = next(p.grad for p in params if p.grad is not None)
        grad.view(-1)[0] = float("nan")


def crash_after(debug: LoopDebug, step: int) -> None:
    """At ``debug.kill_after_step`` (after that step's checkpoint), SIGKILL: a hard crash."""
    if debug.kill_after_step == step:
        os.kill(os.getpid(), signal.SIGKILL)


def write_param_digest(
    policy: torch.nn.Module,
    run_dir: str | Path,
    rank: int,
    step: int,
    local_scores: torch.Tensor,
    samples_per_prompt: int = 1,
    **extra: Any,
) -> None:
    """``debug.param_digest``: a hash of this process's trainable weights after ``step``
    (``<run_dir>/param_digests/rank<r>.jsonl``), so a test can check that every process holds
    the same weights, and this process's scores by group (rows p * k ... p * k + k - 1 are
    prompt p's samples), plus ``extra`` JSON-able values."""
    digest = hashlib.sha256()
    for param in policy.parameters():
        if param.requires_grad:
            digest.update(param.detach().cpu().float().numpy().tobytes())
    path = Path(run_dir) / "param_digests" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "step": step,
        "digest": digest.hexdigest(),
        "reward_sum": local_scores.sum().item(),
        "n": len(local_scores),
        "group_scores": local_scores.view(-1, samples_per_prompt).tolist(),
    } | extra
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
