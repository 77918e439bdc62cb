"""Multi-process runs (``torchrun`` / ``accelerate launch``): one process per device.

Rollouts are sharded across processes, gradients are averaged by DistributedDataParallel,
statistics are reduced over all processes, and only the main process logs and writes.
A single process (the usual case) needs none of this and every helper is then a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# The group the stage waits run on (see Dist.wait), made with the default group.
_WAIT: dict[str, Any] = {"group": None, "delay_s": 0.0}


class Dist:
    """Process-group facts and collectives (all no-ops with one process).

    The first ``Dist`` of a process starts the process group (the ``distributed`` config):
    collectives time out after ``timeout_s``; the stage waits (:meth:`wait`), where the other
    processes wait for the main one to train the reward model, evaluate or save, run on a
    separate gloo group that times out after ``wait_timeout_s``."""

    def __init__(
        self,
        device: torch.device,
        timeout_s: float = 1800,
        wait_timeout_s: float = 21600,
        debug_wait_delay_s: float = 0,
    ) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world_size > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
                wait = timedelta(seconds=wait_timeout_s)
                _WAIT["group"] = dist.new_group(backend="gloo", timeout=wait)
                _WAIT["delay_s"] = float(debug_wait_delay_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wait(self) -> None:
        """Wait for every process at a stage boundary, on the wait group (its timeout covers
        a main-process stage; NCCL's default of 10 minutes would not)."""
        if not self.enabled:
            return
        if self.is_main and _WAIT["delay_s"]:  # fault injection: a slow main-process stage
            time.sleep(_WAIT["delay_s"])
        dist.barrier(group=_WAIT["group"])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a copy)."""
        out = values.detach().clone().to(self.device)
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.world_size

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every process along dim 0 (rank order)."""
        if not self.enabled:
            return values
        values = values.detach().to(self.device).contiguous()
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values)
        return torch.cat(parts)

    def mean_dict(self, metrics: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
        """Average the given scalar metrics over processes (one collective)."""
        if not self.enabled or not keys:
            return metrics
        packed = self.mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return metrics | dict(zip(keys, packed.tolist()))

    def broadcast(self, obj: Any) -> Any:
        """The main process's value of ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def masked_whiten_global(x: torch.Tensor, mask: torch.Tensor, d: Dist, eps: float = 1e-8):
    """Whiten ``x`` over the masked entries of ALL processes (unbiased variance)."""
    m = mask.to(x.dtype)
    stats = d.sum(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double())
    total, total_sq, n = stats.tolist()
    mean = total / n
    var = (total_sq / n - mean * mean) * n / max(n - 1, 1)
    return (x - mean) * torch.rsqrt(torch.tensor(var + eps, dtype=x.dtype, device=x.device))
