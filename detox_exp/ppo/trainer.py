"""The PPO loop for encoder-decoder policies: rollout -> score -> advantages -> update.

The math lives in :mod:`detox_exp.ppo.core` (pure functions); this module orchestrates.
Dropout is off during PPO (the network stays in eval mode, as in trl >= 0.12) so that the
importance ratio of the first minibatch is exactly 1 and old / new log-probs agree.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from detox_exp import checkpoint, interrupt
from detox_exp import metric_names as M
from detox_exp.checkpoint import CheckpointManager, rng_state, set_rng_state
from detox_exp.distributed import Dist, masked_whiten_global, write_param_digest
from detox_exp.errors import DataError
from detox_exp.fast import SWITCHES
from detox_exp.fast.widths import round_up
from detox_exp.generation import (
    decode,
    decoder_inputs,
    make_sampling,
    pad_queries,
    sample_responses,
)
from detox_exp.kl import kl_loss, kl_penalty
from detox_exp.ppo import core
from detox_exp.ppo.checks import check_lr, local_sizes, settings_from
from detox_exp.ppo.experience import Experience
from detox_exp.ppo.guard import NonFiniteGuard
from detox_exp.ppo.policy import ActorCritic, ForwardOutput
from detox_exp.reward.scorer import ToxicityScorer
from detox_exp.seq2seq import mixed_precision
from detox_exp.tracking import Tracker
from detox_exp.utils import progress, resolve_device

log = logging.getLogger(__name__)


def sampling_stream(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, rank, step) (numpy's SeedSequence mixes
    the three into one well-spread 64-bit seed)."""
    import numpy as np

    mixed = np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed))


class PPOTrainer:
    """PPO with a KL penalty to the reference (adapter disabled); see conf/ppo/default.yaml.

    ``settings``: the ``ppo.*`` keyword arguments of :class:`PPOSettings` (defaults, docs
    and checks live there). With ``samples_per_prompt`` k > 1 each rollout samples k
    responses of ``batch_size / k`` prompts; the encoder runs once per prompt everywhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scorer: ToxicityScorer,
        prompts: Dataset,
        tracker: Tracker,
        generation: Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        kl_controller: core.AdaptiveKLController | core.FixedKLController,
        checkpoints: CheckpointManager | None = None,
        wandb_id: str | None = None,
        **settings: Any,
    ) -> None:
        s = self.settings = settings_from(settings)  # checked, before anything
        self.dist = Dist(resolve_device(s.device))
        self.device = self.dist.device
        self.local_batch, self.local_mini = local_sizes(s, self.dist.world_size)
        self.k = s.samples_per_prompt
        self.forward_batch = s.forward_batch_size or self.local_batch
        self.guard = NonFiniteGuard(s.on_nonfinite, s.max_consecutive_skips, self.dist)
        self.checkpoints = checkpoints  # None: no checkpoints
        self.wandb_id = wandb_id  # the W&B run a checkpoint resumes
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s.precision]
        self.tokenizer, self.scorer, self.prompts, self.tracker = (
            tokenizer,
            scorer,
            prompts,
            tracker,
        )
        self.generation = dict(generation)
        self.horizon = make_sampling(self.generation).max_new_tokens  # Dr. GRPO's divisor
        self.steps, self.batch_size = s.steps, s.batch_size
        self.kl_ctl = kl_controller
        self.running = core.RunningMoments() if s.score.normalize else None
        self.save_dir = Path(s.save_dir) if s.save_dir else None

        self.policy = ActorCritic(model, s.separate_value_model, value_head=s.uses_critic)
        self.policy = self.policy.to(self.device)
        self.policy.eval()  # no dropout: see module docstring
        self.ddp: torch.nn.Module = self.policy
        if self.dist.enabled:  # gradients averaged over processes; DDP syncs initial weights
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.policy, device_ids=ids)
        params = self.policy.trainable_parameters()
        self.optimizer = optimizer(params)
        check_lr(self.optimizer.param_groups[0]["lr"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=s.precision == "fp16")
        self.generator = torch.Generator().manual_seed(s.seed)
        self.step = 0
        self._order: list[int] = []
        self._position = 0

    # ------------------------------------------------------------------- helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        return mixed_precision(self.policy.model, self.device.type, self.dtype)

    def next_batch(self) -> list[int]:
        """This process's prompt indices for the next rollout: every process draws the same
        seeded permutation per pass over the data and takes its share of the global batch's
        ``batch_size / k`` prompts (whole groups: a prompt's k samples stay on one process)."""
        indices = []
        n_prompts = self.batch_size // self.k
        while len(indices) < n_prompts:
            if self._position >= len(self._order):
                self._order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
                self._position = 0
            take = min(n_prompts - len(indices), len(self._order) - self._position)
            indices += self._order[self._position : self._position + take]
            self._position += take
        return indices[self.dist.rank :: self.dist.world_size]

    def sampling_stream(self) -> torch.Generator:
        """The random stream this process samples the current step's responses from: seeded
        from (seed, rank, step), so processes draw independent samples and a resumed run
        draws the same ones again."""
        return sampling_stream(self.settings.seed, self.dist.rank, self.step + 1, self.device)

    def reuses_rollout_forward(self) -> bool:
        """Whether the rollout's policy pass also serves the batch's one update (switch
        ``fast.reuse_rollout_forward``): with one epoch of one minibatch, no accumulation and
        one rollout pass, the update's forward would recompute the same logits from the same
        weights. The rollout then runs that pass with grad and keeps it for the update (its
        old log-probs are the pass's own, detached: ratio exactly 1, as on-policy), which
        saves one policy forward per step."""
        s = self.settings
        return (
            SWITCHES.reuse_rollout_forward
            and s.ppo_epochs == 1
            and self.local_mini == self.local_batch
            and s.gradient_accumulation_steps == 1
            and self.forward_batch >= self.local_batch
        )

    def _update_pass(
        self, query: torch.Tensor, query_mask: torch.Tensor, dec: torch.Tensor
    ) -> ForwardOutput:
        """The policy's forward for an update (through DDP, values if gae), in the run's
        precision; the caller decides whether grad is on."""
        with self._autocast():
            return self.ddp(
                query,
                query_mask,
                dec,
                with_values=self.settings.uses_critic,
                samples_per_prompt=self.k,
            )

    def _forward(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        response: torch.Tensor,
        keep_logits: bool = False,
        encoder_hidden: torch.Tensor | None = None,
        live: bool = False,
    ) -> dict[str, Any]:
        """Policy log-probs, values (gae) and entropy, and reference log-probs, of given
        responses [P * k, T] of prompts [P, S] (the rollout calls it without grad; each
        encoder runs once per prompt). ``keep_logits`` also returns both logits. ``live``:
        the policy pass runs with grad (its own encoder pass, through DDP) and is returned
        as ``"live"`` for the update (see :meth:`reuses_rollout_forward`)."""
        dec = decoder_inputs(response, self.policy.config.decoder_start_token_id)
        result: dict[str, Any] = {}
        with self._autocast():
            if live:
                with torch.enable_grad():
                    out = self._update_pass(query, query_mask, dec)
                result["live"] = out
            else:
                out = self.policy(
                    query, query_mask, dec, encoder_hidden=encoder_hidden, samples_per_prompt=self.k
                )
            logits = out.logits.detach()
            result["logprobs"] = core.in_row_chunks(core.logprobs_from_logits, logits, response)
            result["entropy"] = core.in_row_chunks(core.entropy_from_logits, logits)
            if out.values is not None:
                result["values"] = out.values.detach().float()
            if keep_logits:
                result["logits"] = logits.float()
            ref_logits = self.policy.reference_logits(query, query_mask, dec, self.k)
            result["ref_logprobs"] = core.in_row_chunks(
                core.logprobs_from_logits, ref_logits, response
            )
            if keep_logits:
                result["ref_logits"] = ref_logits.float()
        return result

    def _clock(self) -> float:
        """``time.perf_counter()`` once the device's queued work is done: on CUDA, kernels run
        asynchronously, so without the sync a phase's time would show up in a later one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def rollout(self, indices: list[int]) -> Experience:
        """Sample k responses per prompt, score and evaluate them; everything PPO needs, on
        ``self.device``."""
        s, k = self.settings, self.k
        t0 = self._clock()
        query, query_mask = pad_queries(
            [self.prompts[i]["input_ids"] for i in indices],
            self.tokenizer.pad_token_id,
            self.device,
            SWITCHES.width_multiple,
        )
        with self._autocast():
            # the encoder runs once per prompt: its output serves generation (all k samples)
            # and the policy's forward pass below
            encoder_hidden = self.policy.encode(query, query_mask)
            response, mask = sample_responses(
                self.policy.model,
                self.tokenizer,
                query,
                query_mask,
                self.generation,
                encoder_hidden,
                samples_per_prompt=k,
                generator=self.sampling_stream(),
            )
        extra = round_up(response.shape[1], SWITCHES.width_multiple) - response.shape[1]
        response = torch.nn.functional.pad(response, (0, extra), value=self.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, extra), value=0.0)
        texts = decode(self.tokenizer, response)
        t1 = self._clock()
        scores = self.scorer.score(texts)
        t2 = self._clock()
        full_loss = s.kl_loss_coef > 0 and s.kl_loss_estimator == "full"
        full = full_loss or "full" in (s.kl_estimator, s.kl_log_estimator)
        live = self.reuses_rollout_forward()
        chunks = defaultdict(list)
        per_pass = max(1, self.forward_batch // k)  # prompts per no-grad pass
        for start in range(0, len(indices), per_pass):
            ps, rs = slice(start, start + per_pass), slice(start * k, (start + per_pass) * k)
            out = self._forward(
                query[ps], query_mask[ps], response[rs], full, encoder_hidden[ps], live
            )
            for key, value in out.items():
                chunks[key].append(value)
        live_pass = chunks.pop("live", [None])[0]  # one pass when live
        batch = {key: torch.cat(v) for key, v in chunks.items()}
        t3 = self._clock()
        timings = {M.TIME_GENERATE: t1 - t0, M.TIME_SCORE: t2 - t1, M.TIME_FORWARD: t3 - t2}
        raw_scores = scores.reward.to(self.device).clone()  # a normal tensor, not inference
        if s.debug.nan_at_step == self.step + 1:  # fault injection for tests
            raw_scores[0] = float("nan")
        self.guard.check("scores", raw_scores, self.step + 1)
        rewards, kl_reward, kl, advantages, returns = self._advantages(raw_scores, batch, mask)
        return Experience(
            indices=indices,
            samples_per_prompt=k,
            query=query,
            query_mask=query_mask,
            response=response,
            mask=mask,
            texts=texts,
            scores=raw_scores,
            toxicity=scores.toxicity,
            logprobs=batch["logprobs"],
            ref_logprobs=batch["ref_logprobs"],
            values=batch.get("values"),
            entropy=batch["entropy"],
            kl=kl,
            kl_reward=kl_reward,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            timings=timings,
            ref_logits=batch["ref_logits"] if full_loss else None,
            live=live_pass,
        )

    def _advantages(
        self, raw_scores: torch.Tensor, batch: Mapping[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Scores [B] and the rollout's forward pass -> (rewards, kl_reward, kl, advantages,
        returns), each [B, T]: KL-penalised per-token rewards (``kl_estimator``), the logged
        KL (``kl_log_estimator``), then GAE (whitened if configured) or, critic-free, one
        group advantage per sample from its sequence reward (score - kl_coef * sum of KL)."""
        s = self.settings
        # normalisation statistics come from the global batch; keep this process's share
        n = len(raw_scores)
        processed = core.process_scores(
            self.dist.gather(raw_scores),
            scale=float(s.score.scale),
            clip=s.score.clip,
            normalize=self.running is not None,
            running=self.running,
        )[self.dist.rank * n : (self.dist.rank + 1) * n]
        logits = {"logits": batch.get("logits"), "ref_logits": batch.get("ref_logits")}
        rewards, kl_reward = core.compute_rewards(
            processed,
            batch["logprobs"],
            batch["ref_logprobs"],
            mask,
            self.kl_ctl.value,
            s.kl_estimator,
            **logits,
        )
        kl = kl_reward
        if s.kl_log_estimator != s.kl_estimator:
            kl = kl_penalty(batch["logprobs"], batch["ref_logprobs"], s.kl_log_estimator, **logits)
            kl = torch.where(mask.bool(), kl, 0.0)
        advantages, returns = core.ADVANTAGE_ESTIMATORS[s.advantage_estimator].fn(
            rewards,
            mask,
            batch.get("values"),
            k=self.k,
            gamma=s.gamma,
            lam=s.lam,
            eps=s.group_eps,
        )
        if s.whiten_advantages:
            if self.dist.enabled:  # statistics over every process's tokens
                whitened = masked_whiten_global(advantages, mask, self.dist)
            else:
                whitened = core.masked_whiten(advantages, mask)
            advantages = torch.where(mask.bool(), whitened, 0.0)
        self.guard.check("rewards", rewards, self.step + 1)
        self.guard.check("advantages", advantages, self.step + 1)
        return rewards, kl_reward, kl, advantages, returns

    def optimize(self, roll: Experience) -> dict[str, float]:
        """PPO epochs x minibatches (with gradient accumulation) on one rollout batch.

        Minibatches hold whole groups. Each part's loss is its sum of terms divided by the
        WHOLE minibatch's count (tokens or sequences, over micro-batches and processes), and
        DDP's gradient average over processes is undone, so the parts add up to the loss of
        the minibatch as ``loss_agg_mode`` defines it."""
        s, k = self.settings, self.k
        stats = defaultdict(list)
        n_groups = len(roll.indices)
        mini_groups = self.local_mini // k
        micro_groups = mini_groups // s.gradient_accumulation_steps
        world = self.dist.world_size
        epochs_run = n_updates = 0
        for _ in range(s.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(n_groups, generator=self.generator).tolist()
            epoch_kl = []
            for mb_start in range(0, n_groups, mini_groups):
                mb = torch.tensor(order[mb_start : mb_start + mini_groups], device=self.device)
                tokens = self.dist.sum(roll.mask[roll.rows(mb)].sum()).item()
                agg = partial(
                    core.aggregate_loss,
                    mode=s.loss_agg_mode,
                    num_seqs=s.mini_batch_size,
                    num_tokens=tokens,
                    horizon=self.horizon,
                )
                starts = range(0, len(mb), micro_groups)
                for mc_start in starts:
                    # DDP averages gradients over processes once, on the last micro-batch
                    last = mc_start == starts[-1]
                    sync = contextlib.nullcontext() if last else self._no_sync()
                    with sync:
                        loss, mstats = self._loss(roll, mb[mc_start : mc_start + micro_groups], agg)
                        self.guard.check("loss", loss, self.step + 1)
                        self.scaler.scale(loss * world).backward()
                    for key, value in mstats.items():
                        stats[key].append(value)
                    epoch_kl.append(mstats[M.APPROX_KL])
                self._inject_nan_gradient(n_updates)
                self.scaler.unscale_(self.optimizer)
                norm = self._grad_norm()
                stats[M.GRAD_NORM].append(norm.item())
                if not self.scaler.is_enabled():  # fp16: the scaler skips inf steps itself
                    self.guard.check("gradients", norm, self.step + 1)
                self.scaler.step(self.optimizer)
                n_updates += 1
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            if s.target_approx_kl is not None:
                # decided on the global mean, so every process runs the same number of epochs
                kl = self.dist.mean(torch.tensor(sum(epoch_kl) / len(epoch_kl))).item()
                if kl > s.target_approx_kl:
                    break  # early stop: the policy moved too far from the rollout policy
        out = {key: sum(v) / len(v) for key, v in stats.items()}
        # the parts' losses are fractions of their minibatch's: report minibatch totals
        parts = s.gradient_accumulation_steps * world
        for key in (M.LOSS_POLICY, M.LOSS_VALUE, M.LOSS_TOTAL, M.LOSS_KL):
            if key in out:
                out[key] *= parts
        out[M.EPOCHS_RUN] = epochs_run
        return out

    def _loss(
        self,
        roll: Experience,
        groups: torch.Tensor,
        agg: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The loss of the groups ``groups``: their part of the minibatch's (``agg`` with the
        minibatch's counts, see optimize), or by default their own loss."""
        s = self.settings
        if agg is None:
            agg = partial(core.aggregate_loss, mode=s.loss_agg_mode, horizon=self.horizon)
        mb = roll.minibatch(groups)
        if roll.live is not None:  # the rollout's pass, with grad (reuses_rollout_forward)
            rows, t = roll.rows(groups), mb.response.shape[1]
            values = None if roll.live.values is None else roll.live.values[rows][:, :t]
            out = ForwardOutput(logits=roll.live.logits[rows][:, :t], values=values)
            roll.live = None  # its graph serves one backward
        else:
            dec = decoder_inputs(mb.response, self.policy.config.decoder_start_token_id)
            out = self._update_pass(mb.query, mb.query_mask, dec)
        logits = out.logits.float()
        logprobs = core.logprobs_from_logits(logits, mb.response)
        pg_loss, pg_stats = core.policy_loss(
            logprobs, mb.logprobs, mb.advantages, mb.mask, s.cliprange, agg
        )
        loss = pg_loss
        stats = {
            M.LOSS_POLICY: pg_loss.item(),
            M.APPROX_KL: pg_stats["approxkl"].item(),
            M.POLICY_KL: pg_stats["policykl"].item(),
            M.CLIPFRAC: pg_stats["clipfrac"].item(),
            M.RATIO_MEAN: pg_stats["ratio_mean"].item(),
        }
        if s.uses_critic:
            vf_loss, vf_stats = core.value_loss(
                out.values.float(), mb.values, mb.returns, mb.mask, s.cliprange_value, agg
            )
            loss = loss + s.vf_coef * vf_loss
            stats[M.LOSS_VALUE] = vf_loss.item()
            stats[M.VALUE_CLIPFRAC] = vf_stats["clipfrac"].item()
        if s.ent_coef:
            loss = loss - s.ent_coef * agg(core.entropy_from_logits(logits), mb.mask)
        if s.kl_loss_coef:
            kl_tokens = kl_loss(
                logprobs, mb.ref_logprobs, s.kl_loss_estimator, logits, mb.ref_logits
            )
            kl_term = agg(kl_tokens, mb.mask)
            loss = loss + s.kl_loss_coef * kl_term
            stats[M.LOSS_KL] = kl_term.item()
        stats[M.LOSS_TOTAL] = loss.item()
        return loss, stats

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync() if self.dist.enabled else contextlib.nullcontext()

    def _grad_norm(self) -> torch.Tensor:
        """The trainable gradients' global norm, clipped to ``max_grad_norm`` if set."""
        params = self.policy.trainable_parameters()
        if self.settings.max_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _inject_nan_gradient(self, n_updates: int) -> None:
        """Fault injection (``ppo.debug.nan_grad_at_step``): a NaN in one gradient before the
        second optimizer step of the batch (the first if the batch has one)."""
        s = self.settings
        if s.debug.nan_grad_at_step != self.step + 1:
            return
        n_minibatches = self.local_batch // self.local_mini
        if n_updates == min(1, n_minibatches * s.ppo_epochs - 1):
            grad = next(p.grad for p in self.policy.trainable_parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")

    def _snapshot(self) -> dict[str, Any]:
        """What a batch changes (weights, optimizer, scaler, score statistics), copied, so
        that ``on_nonfinite=skip`` can drop the whole batch (see _restore)."""
        return {
            "params": [p.detach().clone() for p in self.policy.trainable_parameters()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()),
            "running": copy.deepcopy(self.running) if self.running is not None else None,
        }

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, saved in zip(self.policy.trainable_parameters(), snapshot["params"]):
                param.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.scaler.load_state_dict(snapshot["scaler"])
        self.running = snapshot["running"]

    def train_step(self) -> dict[str, float]:
        """One PPO step: rollout, optimisation, metrics, logging; returns its metrics."""
        start = self._clock()
        with self.guard.batch(self.step + 1, self._snapshot, self._restore) as outcome:
            roll = self.rollout(self.next_batch())
            t_opt = self._clock()
            opt_stats = self.optimize(roll)
        self.step += 1
        if outcome.skipped:
            metrics = {M.SKIPPED_BATCHES: self.guard.skipped, M.STEP_TIME: self._clock() - start}
            self.tracker.log(metrics, step=self.step)
            return metrics
        t_end = self._clock()
        timings = {M.TIME_OPTIMIZE: t_end - t_opt, M.STEP_TIME: t_end - start}
        metrics = self._step_metrics(roll, opt_stats | timings)
        if self.settings.debug.param_digest:
            self._write_param_digest(roll)
        self.kl_ctl.update(metrics[M.KL], self.batch_size)  # Ziegler: n_steps = batch size
        self.tracker.log(metrics, step=self.step)
        every = self.settings.sample_table_every
        if every and self.step % every == 0:
            self._log_samples(roll)
        return metrics

    def _step_metrics(self, roll: Experience, local: dict[str, float]) -> dict[str, float]:
        """The step's metrics: exact global statistics from gathered per-sample values, and
        the means over processes of the rest (``local``: optimisation stats and timings)."""
        mask = roll.mask
        kl_per_sample = self.dist.gather(roll.kl.sum(1))
        kl_reward = self.dist.gather(roll.kl_reward.sum(1))
        scores = self.dist.gather(roll.scores)
        toxicity = self.dist.gather(roll.toxicity.to(self.device))
        lengths = self.dist.gather(mask.sum(1).float())
        local = {
            M.ENTROPY: core.masked_mean(roll.entropy, mask).item(),
            M.RETURNS_MEAN: core.masked_mean(roll.returns, mask).item(),
            **roll.timings,
            **local,
        }
        if roll.values is not None:
            local[M.VAR_EXPLAINED] = core.explained_variance(roll.values, roll.returns, mask).item()
            local[M.VALUE_MEAN] = core.masked_mean(roll.values, mask).item()
        local = self.dist.mean_dict(local, sorted(local))
        metrics = {
            M.KL: kl_per_sample.mean().item(),
            M.KL_REWARD: kl_reward.mean().item(),
            M.KL_COEF: self.kl_ctl.value,
            M.REWARD_MEAN: scores.mean().item(),
            M.REWARD_STD: scores.std().item() if len(scores) > 1 else 0.0,
            M.TOXICITY_MEAN: toxicity.mean().item(),
            M.RESPONSE_LEN_MEAN: lengths.mean().item(),
            M.SAMPLES_PER_S: self.batch_size / local[M.STEP_TIME],
            M.SKIPPED_BATCHES: self.guard.skipped,
            **local,
        }
        if self.k > 1:  # gathered groups are whole: rows p * k ... p * k + k - 1
            groups = scores.view(-1, self.k)
            metrics[M.GROUP_ZERO_STD] = (groups == groups[:, :1]).all(1).float().mean().item()
            metrics[M.GROUP_REWARD_STD] = groups.std(1).mean().item()
        return metrics

    def _write_param_digest(self, roll: Experience) -> None:
        """``ppo.debug.param_digest``: a hash of this process's weights after the step."""
        write_param_digest(
            self.policy,
            self.tracker.run_dir,
            self.dist.rank,
            self.step,
            roll.scores,
            self.k,
            stream_probe=torch.rand(
                2,
                generator=sampling_stream(
                    self.settings.seed, self.dist.rank, self.step, self.device
                ),
            ).tolist(),
        )

    def _log_samples(self, roll: Experience) -> None:
        """A W&B table of the step's first ``num_table_samples`` responses."""
        rows = [
            [
                self.step,
                self.prompts[roll.indices[j // self.k]]["prompt"][-300:],
                roll.texts[j],
                float(roll.scores[j]),
                float(roll.toxicity[j]),
            ]
            for j in range(min(self.settings.num_table_samples, len(roll.texts)))
        ]
        columns = ["step", "prompt", "response", "reward", "toxicity"]
        self.tracker.log_table(M.SAMPLES_TABLE, columns, rows, step=self.step)

    def state_dict(self) -> dict[str, Any]:
        """What the trainer needs to continue exactly where it is: ``trainable`` (the
        trainable weights by name), the step, the data order and position, the generators,
        the optimizer, scaler, KL controller, score statistics, the guard's counts and the
        global RNG states."""
        return {
            "trainable": {n: p for n, p in self.policy.named_parameters() if p.requires_grad},
            "step": self.step,
            "order": torch.tensor(self._order, dtype=torch.long),
            "position": self._position,
            "generator": self.generator.get_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "running": self.running.state_dict() if self.running is not None else None,
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
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.running is not None and state["running"] is not None:
            self.running.load_state_dict(state["running"])
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
        if self.settings.debug.kill_after_step == self.step:  # fault injection: a hard crash
            os.kill(os.getpid(), signal.SIGKILL)
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

    def train(self) -> list[dict[str, float]]:
        """Run ``steps`` PPO steps with a progress bar; returns every step's metrics. A
        SIGINT / SIGTERM stops it after the current step, with a checkpoint of that step
        (:class:`detox_exp.interrupt.Interrupted`)."""
        with interrupt.deferred():
            try:
                return self._train()
            except interrupt.Interrupted as stop:  # a second signal: stopped mid-step
                if stop.step is None:
                    stop.step, stop.checkpoint = self.step, self.guard.last_checkpoint
                raise

    def _train(self) -> list[dict[str, float]]:
        history = []
        bar = progress(total=self.steps, desc="ppo", unit="step")
        bar.update(self.step)
        every = max(1, self.steps // 20)
        while self.step < self.steps:
            metrics = self.train_step()
            history.append(metrics)
            self._maybe_checkpoint(metrics)
            signum = self._stop_requested()
            if signum is not None:  # a checkpoint of this step, then stop
                bar.close()
                due = self.checkpoints is not None and self.checkpoints.due(self.step)
                path = self.guard.last_checkpoint if due else self._maybe_checkpoint(metrics, True)
                raise interrupt.Interrupted(signum, self.step, path)
            bar.update(1)
            if M.REWARD_MEAN not in metrics:  # skipped batch
                continue
            bar.set_postfix(
                reward=f"{metrics[M.REWARD_MEAN]:.2f}",
                kl=f"{metrics[M.KL]:.2f}",
                tox=f"{metrics[M.TOXICITY_MEAN]:.2f}",
            )
            if self.step % every and self.step != self.steps:
                continue  # about 20 lines per run on the console; metrics.jsonl has each step
            log.info(
                "ppo step %d/%d: reward %.3f, toxicity %.3f, kl %.3f, %.2f s",
                self.step,
                self.steps,
                metrics[M.REWARD_MEAN],
                metrics[M.TOXICITY_MEAN],
                metrics[M.KL],
                metrics[M.STEP_TIME],
            )
        bar.close()
        return history

    def save(
        self,
        summary: Mapping[str, Any],
        config: Any,
        eval_table: Sequence[str] = (),
        reward_model: str | None = None,
    ) -> Path | None:
        """Adapter + value head + merged model (with a model card holding ``eval_table`` and
        naming ``reward_model``, the classifier this run trained against) under
        ``save_dir``."""
        if self.save_dir is None:
            return None
        from detox_exp.ppo.saving import save_policy

        return save_policy(
            self.policy, self.tokenizer, self.save_dir, summary, config, eval_table, reward_model
        )
