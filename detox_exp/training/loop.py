"""The training loop every method shares: data order, random streams, the non-finite guard,
exact checkpoint state, DDP, step logging, stopping on a signal and saving.

A method (PPO in :mod:`detox_exp.ppo.trainer`, value-guided distillation in
:mod:`detox_exp.guided.trainer`) subclasses :class:`TrainingLoop`, builds ``self.policy``
(a :class:`~detox_exp.training.policy.ActorCritic`) and its optimizer with
:meth:`TrainingLoop.attach`, and implements :meth:`TrainingLoop.update` (one step's work,
returning its metrics). What it keeps beyond the weights, optimizer and data position it adds
through :meth:`extra_state` / :meth:`load_extra_state` (and :meth:`extra_snapshot` for what
``on_nonfinite=skip`` must roll back).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from detox_exp import checkpoint, interrupt
from detox_exp import metric_names as M
from detox_exp.checkpoint import CheckpointManager, rng_state, set_rng_state
from detox_exp.distributed import Dist
from detox_exp.errors import DataError
from detox_exp.seq2seq import mixed_precision
from detox_exp.tracking import Tracker
from detox_exp.training import faults
from detox_exp.training.console import StepConsole
from detox_exp.training.faults import LoopDebug
from detox_exp.training.guard import NonFiniteGuard
from detox_exp.training.policy import ActorCritic
from detox_exp.utils import resolve_device

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampling_stream(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, rank, step) (numpy's SeedSequence mixes
    the three into one well-spread 64-bit seed)."""
    mixed = np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed))


@dataclass
class StepSamples:
    """A step's samples, as the sample table and the parameter digest read them."""

    indices: list[int]  # this process's prompts (k samples each)
    texts: list[str]
    scores: torch.Tensor  # the reward classifier's score per sample
    toxicity: torch.Tensor


class TrainingLoop:
    """``steps`` steps of a method over ``prompts``, each on ``batch_size`` samples (global,
    over processes): ``samples_per_prompt`` k responses of ``batch_size / k`` prompts.

    ``checkpoints`` None: no checkpoints. ``wandb_id``: the W&B run a checkpoint resumes.
    ``debug``: test-only fault injection of the loop (:class:`LoopDebug`).
    ``node``: the method's config node, named in errors."""

    name = "train"  # the console's and progress bar's name for a step
    updates_per_step = 1  # optimizer steps per training step (a method with more says so)

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Dataset,
        tracker: Tracker,
        steps: int,
        batch_size: int,
        samples_per_prompt: int,
        seed: int,
        device: str,
        precision: str,
        on_nonfinite: str,
        max_consecutive_skips: int,
        max_grad_norm: float | None,
        save_dir: str | None,
        checkpoints: CheckpointManager | None = None,
        wandb_id: str | None = None,
        debug: Any = None,
        node: str = "ppo",
    ) -> None:
        self.dist = Dist(resolve_device(device))
        self.device = self.dist.device
        self.tokenizer, self.prompts, self.tracker = tokenizer, prompts, tracker
        self.steps, self.batch_size, self.k = steps, batch_size, samples_per_prompt
        self.seed, self.max_grad_norm = seed, max_grad_norm
        self.dtype = PRECISIONS[precision]
        self.guard = NonFiniteGuard(on_nonfinite, max_consecutive_skips, self.dist, node)
        self.checkpoints = checkpoints
        self.wandb_id = wandb_id
        self.save_dir = Path(save_dir) if save_dir else None
        self.debug = debug if debug is not None else LoopDebug()
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.generator = torch.Generator().manual_seed(seed)  # data order (and minibatches)
        self.step = 0
        self._updates = 0  # optimizer steps taken in the current step
        self._order: list[int] = []
        self._position = 0

    def attach(self, policy: ActorCritic, optimizer: Callable[..., torch.optim.Optimizer]) -> None:
        """Put ``policy`` on the device in eval mode (no dropout: a step's log-probs are the
        same in every pass), wrap it in DDP when distributed, and build its optimizer over the
        trainable parameters."""
        self.policy = policy.to(self.device)
        self.policy.eval()
        self.ddp: torch.nn.Module = self.policy
        if self.dist.enabled:  # gradients averaged over processes; DDP syncs initial weights
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.policy, device_ids=ids)
        self.optimizer = optimizer(self.policy.trainable_parameters())

    # ------------------------------------------------------------------- helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        return mixed_precision(self.policy.model, self.device.type, self.dtype)

    def next_batch(self) -> list[int]:
        """This process's prompt indices for the next step: every process draws the same
        seeded permutation per pass over the data and takes its share of the global batch's
        ``batch_size / k`` prompts (whole groups: a prompt's k samples stay on one process)."""
        indices = []
        n_prompts = self.batch_size // self.k
        while len(indices) < n_prompts:
            if self._position >= len(self._order):
                self._order = torch.randperm(self.data_size(), generator=self.generator).tolist()
                self._position = 0
            take = min(n_prompts - len(indices), len(self._order) - self._position)
            indices += self._order[self._position : self._position + take]
            self._position += take
        return indices[self.dist.rank :: self.dist.world_size]

    def data_size(self) -> int:
        """How many items :meth:`next_batch` orders: the prompts (a method that trains on
        groups of stored samples instead counts those)."""
        return len(self.prompts)

    def sampling_stream(self) -> torch.Generator:
        """The random stream this process samples the current step's responses from: seeded
        from (seed, rank, step), so processes draw independent samples and a resumed run
        draws the same ones again."""
        return sampling_stream(self.seed, self.dist.rank, self.step + 1, self.device)

    def _clock(self) -> float:
        """``time.perf_counter()`` once the device's queued work is done: on CUDA, kernels run
        asynchronously, so without the sync a phase's time would show up in a later one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync() if self.dist.enabled else contextlib.nullcontext()

    def _grad_norm(self) -> torch.Tensor:
        """The trainable gradients' global norm, clipped to ``max_grad_norm`` if set."""
        params = self.policy.trainable_parameters()
        if self.max_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def check(self, quantity: str, values: torch.Tensor) -> None:
        """The guard's check of this step's ``quantity``: stop, or skip the batch, on NaN or
        inf (``debug.nan_at_step`` poisons the "scores" here)."""
        values = faults.poisoned(self.debug, quantity, values, self.step + 1)
        self.guard.check(quantity, values, self.step + 1)

    def optimizer_step(self) -> float:
        """Unscale, clip and check the gradients, step the optimizer and clear them; returns
        the gradient norm (before clipping)."""
        params = self.policy.trainable_parameters()
        step, per_step = self.step + 1, self.updates_per_step
        faults.poison_gradient(self.debug, params, step, self._updates, per_step)
        self._updates += 1
        self.scaler.unscale_(self.optimizer)
        norm = self._grad_norm()
        if not self.scaler.is_enabled():  # fp16: the scaler skips inf steps itself
            self.guard.check("gradients", norm, self.step + 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    # ------------------------------------------------------- what a method adds
    def update(self) -> tuple[dict[str, float], Any]:
        """One step of the method: (its metrics, what :meth:`after_step` and the sample
        table get). Runs inside the guard (a non-finite value drops or stops it)."""
        raise NotImplementedError

    def after_step(self, metrics: dict[str, float], batch: Any) -> None:
        """A method's work after a logged step (e.g. an adaptive KL controller's update)."""

    def sample_rows(self, batch: Any) -> list[list[Any]]:
        """Rows ``[step, prompt, response, reward, toxicity]`` of the W&B sample table, from
        the step's ``batch`` (its ``indices`` of prompts, ``texts``, ``scores`` and
        ``toxicity`` per sample: a PPO rollout, or :class:`StepSamples`)."""
        return [
            [
                self.step,
                self.prompts[batch.indices[j // self.k]]["prompt"][-300:],
                batch.texts[j],
                float(batch.scores[j]),
                float(batch.toxicity[j]),
            ]
            for j in range(min(self.num_table_samples, len(batch.texts)))
        ]

    def extra_state(self) -> dict[str, Any]:
        """A method's checkpoint state beyond the weights, optimizer and data position."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def extra_snapshot(self) -> dict[str, Any]:
        """What a step changes beyond weights, optimizer and scaler (copied: rolled back by
        ``on_nonfinite=skip``)."""
        return {}

    def restore_extra(self, snapshot: Mapping[str, Any]) -> None:
        """Inverse of :meth:`extra_snapshot`."""

    sample_table_every = 0
    num_table_samples = 4

    # ------------------------------------------------------------------ one step
    def _snapshot(self) -> dict[str, Any]:
        """What a batch changes (weights, optimizer, scaler, the method's extras), copied,
        so that ``on_nonfinite=skip`` can drop the whole batch (see _restore)."""
        return {
            "params": [p.detach().clone() for p in self.policy.trainable_parameters()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()),
            "extra": self.extra_snapshot(),
        }

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, saved in zip(self.policy.trainable_parameters(), snapshot["params"]):
                param.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.scaler.load_state_dict(snapshot["scaler"])
        self.restore_extra(snapshot["extra"])

    def train_step(self) -> dict[str, float]:
        """One step: the method's update inside the guard, then metrics and logging."""
        start = self._clock()
        self._updates = 0
        with self.guard.batch(self.step + 1, self._snapshot, self._restore) as outcome:
            metrics, batch = self.update()
        self.step += 1
        if outcome.skipped:
            metrics = {M.SKIPPED_BATCHES: self.guard.skipped, M.STEP_TIME: self._clock() - start}
            self.tracker.log(metrics, step=self.step)
            return metrics
        step_time = self._clock() - start
        metrics |= {
            M.STEP_TIME: step_time,
            M.SAMPLES_PER_S: self.batch_size / step_time,
            M.SKIPPED_BATCHES: self.guard.skipped,
        }
        if self.debug.param_digest:
            self._write_param_digest(batch)
        self.after_step(metrics, batch)
        self.tracker.log(metrics, step=self.step)
        every = self.sample_table_every
        if every and self.step % every == 0:
            columns = ["step", "prompt", "response", "reward", "toxicity"]
            rows = self.sample_rows(batch)[: self.num_table_samples]
            self.tracker.log_table(M.SAMPLES_TABLE, columns, rows, step=self.step)
        return metrics

    def _write_param_digest(self, batch: Any) -> None:
        """``debug.param_digest``: a hash of this process's weights after the step."""
        stream = sampling_stream(self.seed, self.dist.rank, self.step, self.device)
        faults.write_param_digest(
            self.policy,
            self.tracker.run_dir,
            self.dist.rank,
            self.step,
            batch.scores,
            self.k,
            stream_probe=torch.rand(2, generator=stream).tolist(),
        )

    # ------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """What the loop needs to continue exactly where it is: ``trainable`` (the trainable
        weights by name), the step, the data order and position, the generator, the
        optimizer, scaler, the guard's counts, the global RNG states and the method's
        :meth:`extra_state`."""
        return {
            "trainable": {n: p for n, p in self.policy.named_parameters() if p.requires_grad},
            "step": self.step,
            "order": torch.tensor(self._order, dtype=torch.long),
            "position": self._position,
            "generator": self.generator.get_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.extra_state(),
            **self.guard.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (on a trainer built from the same config)."""
        params = dict(self.policy.named_parameters())
        tensors = state["trainable"]
        missing = set(tensors) ^ {n for n, p in params.items() if p.requires_grad}
        if missing:
            raise DataError(
                "resume",
                f"checkpoint does not match the model ({sorted(missing)[:3]} ...)",
                "resume with the config the checkpoint was written with",
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        self.step = int(state["step"])
        self._order = state["order"].tolist()
        self._position = int(state["position"])
        self.generator.set_state(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state)
        self.guard.load_state_dict(state)
        set_rng_state(state["rng"])

    def _maybe_checkpoint(self, metrics: dict[str, float], now: bool = False) -> Path | None:
        """Write a checkpoint when one is due (or ``now``, e.g. on a stop request); returns
        the newest checkpoint (this step's when written)."""
        if self.checkpoints is not None and (now or self.checkpoints.due(self.step)):
            if self.dist.is_main:
                state = self.state_dict()
                tensors = state.pop("trainable")
                meta = {"wandb_id": self.wandb_id, "metrics": metrics}
                self.guard.last_checkpoint = self.checkpoints.save(self.step, tensors, state, meta)
            self.dist.wait()
        faults.crash_after(self.debug, self.step)
        return self.guard.last_checkpoint

    def _stop_requested(self) -> int | None:
        """A pending SIGINT / SIGTERM (:mod:`detox_exp.interrupt`) on any process: every
        process stops after the same step."""
        signum = interrupt.requested() or 0
        if self.dist.enabled:
            signum = int(self.dist.gather(torch.tensor([signum])).max())
        return signum or None

    def resume(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (weights, optimizer, RNG, data position...)."""
        tensors, state, _ = checkpoint.load(path)
        self.load_state_dict({"trainable": tensors, **state})
        self.guard.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------- the loop
    def prepare(self) -> None:
        """A method's work before the first step (e.g. fitting a scorer); runs on resume too."""

    def train(self) -> list[dict[str, float]]:
        """Run ``steps`` steps with a progress bar; returns every step's metrics. A SIGINT /
        SIGTERM stops it after the current step, with a checkpoint of that step
        (:class:`detox_exp.interrupt.Interrupted`)."""
        with interrupt.deferred():
            try:
                self.prepare()
                return self._train()
            except interrupt.Interrupted as stop:  # a second signal: stopped mid-step
                if stop.step is None:
                    stop.step, stop.checkpoint = self.step, self.guard.last_checkpoint
                raise

    def _train(self) -> list[dict[str, float]]:
        history = []
        console = StepConsole(self.name, self.steps, self.step, self.postfix)
        while self.step < self.steps:
            metrics = self.train_step()
            history.append(metrics)
            self._maybe_checkpoint(metrics)
            signum = self._stop_requested()
            if signum is not None:  # a checkpoint of this step, then stop
                console.close()
                due = self.checkpoints is not None and self.checkpoints.due(self.step)
                path = self.guard.last_checkpoint if due else self._maybe_checkpoint(metrics, True)
                raise interrupt.Interrupted(signum, self.step, path)
            console.show(self.step, metrics)
        console.close()
        return history

    def postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """The step's headline numbers on the progress bar and console."""
        return {
            "reward": f"{metrics[M.REWARD_MEAN]:.3f}",
            "toxicity": f"{metrics[M.TOXICITY_MEAN]:.3f}",
            "kl": f"{metrics[M.KL]:.3f}",
        }

    def save(
        self,
        summary: Mapping[str, Any],
        config: Any,
        eval_table: Sequence[str] = (),
        reward_model: str | None = None,
    ) -> Path | None:
        """Adapter (+ value head) + merged model (with a model card holding ``eval_table``
        and naming ``reward_model``, the classifier this run trained against) under
        ``save_dir``."""
        if self.save_dir is None:
            return None
        from detox_exp.training.saving import save_policy

        return save_policy(
            self.policy, self.tokenizer, self.save_dir, summary, config, eval_table, reward_model
        )
