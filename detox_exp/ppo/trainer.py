"""The PPO loop for encoder-decoder policies: rollout -> score -> advantages -> update.

The math lives in :mod:`detox_exp.ppo.core` and :mod:`detox_exp.ppo.advantages` (pure
functions); the loop every method shares (data order, random streams, guard, checkpoint
state, DDP, logging) in :mod:`detox_exp.training.loop`; this module holds what is PPO's:
rollout, advantages and the update (its loss terms: :mod:`detox_exp.ppo.losses`; a step's
metrics: :mod:`detox_exp.ppo.experience`).
Dropout is off during PPO (the network stays in eval mode, as in trl >= 0.12) so that the
importance ratio of the first minibatch is exactly 1 and old / new log-probs agree.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from detox_exp import metric_names as M
from detox_exp.checkpoint import CheckpointManager
from detox_exp.distributed import masked_whiten_global
from detox_exp.fast import SWITCHES
from detox_exp.fast.widths import round_up
from detox_exp.generation import (
    decode,
    decoder_inputs,
    make_sampling,
    pad_queries,
    sample_responses,
)
from detox_exp.kl import kl_penalty
from detox_exp.kl_control import AdaptiveKLController, FixedKLController
from detox_exp.ppo import core
from detox_exp.ppo.advantages import ADVANTAGE_ESTIMATORS, compute_rewards
from detox_exp.ppo.checks import check_lr, local_sizes, settings_from
from detox_exp.ppo.experience import Experience, step_metrics
from detox_exp.ppo.losses import minibatch_loss
from detox_exp.reward.scorer import ToxicityScorer
from detox_exp.tracking import Tracker
from detox_exp.training.loop import TrainingLoop
from detox_exp.training.policy import ActorCritic, ForwardOutput

log = logging.getLogger(__name__)


class PPOTrainer(TrainingLoop):
    """PPO with a KL penalty to the reference (adapter disabled); see conf/ppo/default.yaml.

    ``settings``: the ``ppo.*`` keyword arguments of :class:`PPOSettings` (defaults, docs
    and checks live there). With ``samples_per_prompt`` k > 1 each rollout samples k
    responses of ``batch_size / k`` prompts; the encoder runs once per prompt everywhere.
    """

    name = "ppo"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scorer: ToxicityScorer,
        prompts: Dataset,
        tracker: Tracker,
        generation: Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        kl_controller: AdaptiveKLController | FixedKLController,
        checkpoints: CheckpointManager | None = None,
        wandb_id: str | None = None,
        **settings: Any,
    ) -> None:
        s = self.settings = settings_from(settings)  # checked, before anything
        super().__init__(
            tokenizer=tokenizer,
            prompts=prompts,
            tracker=tracker,
            steps=s.steps,
            batch_size=s.batch_size,
            samples_per_prompt=s.samples_per_prompt,
            seed=s.seed,
            device=s.device,
            precision=s.precision,
            on_nonfinite=s.on_nonfinite,
            max_consecutive_skips=s.max_consecutive_skips,
            max_grad_norm=s.max_grad_norm,
            save_dir=s.save_dir,
            checkpoints=checkpoints,
            wandb_id=wandb_id,
            debug=s.debug,
        )
        self.local_batch, self.local_mini = local_sizes(s, self.dist.world_size)
        self.forward_batch = s.forward_batch_size or self.local_batch
        self.scorer = scorer
        self.generation = dict(generation)
        self.horizon = make_sampling(self.generation).max_new_tokens  # Dr. GRPO's divisor
        self.kl_ctl = kl_controller
        self.running = core.RunningMoments() if s.score.normalize else None
        self.sample_table_every, self.num_table_samples = s.sample_table_every, s.num_table_samples
        self.updates_per_step = s.ppo_epochs * (self.local_batch // self.local_mini)
        policy = ActorCritic(model, s.separate_value_model, value_head=s.uses_critic)
        self.attach(policy, optimizer)
        check_lr(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------- helpers
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

    def _sample(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """(query, query mask, the prompts' encoder output, responses, response mask): k
        samples of each prompt from the policy, widths padded to ``fast.width_multiple``.
        The encoder runs once per prompt: its output serves generation (all k samples) and
        the policy's forward passes after it."""
        query, query_mask = pad_queries(
            [self.prompts[i]["input_ids"] for i in indices],
            self.tokenizer.pad_token_id,
            self.device,
            SWITCHES.width_multiple,
        )
        with self._autocast():
            encoder_hidden = self.policy.encode(query, query_mask)
            response, mask = sample_responses(
                self.policy.model,
                self.tokenizer,
                query,
                query_mask,
                self.generation,
                encoder_hidden,
                samples_per_prompt=self.k,
                generator=self.sampling_stream(),
            )
        extra = round_up(response.shape[1], SWITCHES.width_multiple) - response.shape[1]
        response = torch.nn.functional.pad(response, (0, extra), value=self.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, extra), value=0.0)
        return query, query_mask, encoder_hidden, response, mask

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def rollout(self, indices: list[int]) -> Experience:
        """Sample k responses per prompt, score and evaluate them; everything PPO needs, on
        ``self.device``."""
        s, k = self.settings, self.k
        t0 = self._clock()
        query, query_mask, encoder_hidden, response, mask = self._sample(indices)
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
        self.check("scores", raw_scores)
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
        rewards, kl_reward = compute_rewards(
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
        advantages, returns = ADVANTAGE_ESTIMATORS[s.advantage_estimator].fn(
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
        self.check("rewards", rewards)
        self.check("advantages", advantages)
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
        epochs_run = 0
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
                        self.check("loss", loss)
                        self.scaler.scale(loss * world).backward()
                    for key, value in mstats.items():
                        stats[key].append(value)
                    epoch_kl.append(mstats[M.APPROX_KL])
                stats[M.GRAD_NORM].append(self.optimizer_step())
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
        return minibatch_loss(out, mb, self.settings, agg)

    def update(self) -> tuple[dict[str, float], Experience]:
        """One PPO step: rollout, optimisation and the step's metrics."""
        roll = self.rollout(self.next_batch())
        t_opt = self._clock()
        opt_stats = self.optimize(roll)
        opt_stats[M.TIME_OPTIMIZE] = self._clock() - t_opt
        return step_metrics(roll, opt_stats, self.dist, self.kl_ctl.value), roll

    def after_step(self, metrics: dict[str, float], roll: Experience) -> None:
        self.kl_ctl.update(metrics[M.KL], self.batch_size)  # Ziegler: n_steps = batch size

    # ------------------------------------------------ what PPO adds to the loop's state
    def extra_state(self) -> dict[str, Any]:
        """The KL controller and the score statistics."""
        return {
            "kl_controller": self.kl_ctl.state_dict(),
            "running": self.running.state_dict() if self.running is not None else None,
        }

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.running is not None and state["running"] is not None:
            self.running.load_state_dict(state["running"])

    def extra_snapshot(self) -> dict[str, Any]:
        return {"running": copy.deepcopy(self.running) if self.running is not None else None}

    def restore_extra(self, snapshot: Mapping[str, Any]) -> None:
        self.running = snapshot["running"]
