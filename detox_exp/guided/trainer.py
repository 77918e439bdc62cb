"""Value-guided training (``algorithm=guided``): fit a prefix scorer on reference rollouts,
then distil the guided reference ``ref(a | s) V(s, a)`` (the objective's tokenwise optimum,
:mod:`detox_exp.guidance`) into the LoRA policy with a per-token full-vocabulary divergence.

1. ``prepare`` (before step 1): fit the :class:`~detox_exp.guided.scorer.PrefixScorer` on
   reference rollouts of ``prefix_scorer.rollout_prompts`` train prompts (the frontier
   stage's draws, ``reference_draws``, stand in for its prompts' samples) by cross-entropy
   against each response's reward at every (prefix, realised token)
   (:mod:`detox_exp.guided.fit`); its calibration goes to the summary (``guided/scorer/*``).
   The fitted scorer is saved in ``work_dir``; a resumed run loads it.
2. each step: ``batch_size / k`` prompts x k responses from the teacher (``prefixes:
   teacher``) or the policy (``policy``), the teacher's and the policy's next-token
   distributions at every prefix, and one optimizer step on :func:`~detox_exp.guidance.
   distill_loss` (``direction``) per ``mini_batch_size`` of them (each sample used once; the
   teacher samples a step's whole batch at once, which is cheaper per sample). Forward KL on
   the teacher's samples is the default: its expected gradient is that of the sequence-level
   KL(teacher || policy) (docs/guided.md).

The loop (data order, streams, guard, checkpoints, DDP, logging) is
:class:`~detox_exp.training.loop.TrainingLoop`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from detox_exp import metric_names as M
from detox_exp.checkpoint import CheckpointManager
from detox_exp.errors import ConfigError, DataError
from detox_exp.frontier_math import optimum_kl, optimum_weights
from detox_exp.generation import (
    decode,
    decoder_inputs,
    make_sampling,
    pad_queries,
    sample_responses,
)
from detox_exp.guidance import distill_loss, guided_logits
from detox_exp.guided.calibrate import calibrate
from detox_exp.guided.fit import ReferenceSamples, Rollouts, fit_prefix_scorer
from detox_exp.guided.scorer import Guide, load_guide, save_guide
from detox_exp.guided.settings import (
    DISTILL_DEFAULTS,
    KL_MATCH,
    SCORER_DEFAULTS,
    check_guide_scale,
    check_settings,
)
from detox_exp.kl import categorical_kl
from detox_exp.reward.scorer import ToxicityScorer
from detox_exp.seq2seq import group_rows
from detox_exp.tracking import Tracker
from detox_exp.training.faults import LoopDebug
from detox_exp.training.loop import StepSamples, TrainingLoop, sampling_stream
from detox_exp.training.policy import ActorCritic

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 2  # teacher samples per frontier prompt for each scale kl_match tries
CALIBRATION_STREAM = 2**31  # their streams' step slots, + batch (no step reaches them)


class GuidedTrainer(TrainingLoop):
    """See the module docstring; ``kl_controller``'s value is the objective's beta."""

    name = "guided"
    check_args = staticmethod(check_settings)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scorer: ToxicityScorer,
        prompts: Dataset,
        tracker: Tracker,
        generation: Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        kl_controller: Any,
        work_dir: str,
        prefix_scorer: Mapping[str, Any],
        distill: Mapping[str, Any],
        guide_candidates: int = 0,
        guide_scale: float | str = 1.0,
        lr_decay: str = "none",
        steps: int = 100,
        batch_size: int = 32,
        samples_per_prompt: int = 4,
        mini_batch_size: int | None = None,
        seed: int = 0,
        device: str = "auto",
        precision: str = "fp32",
        on_nonfinite: str = "error",
        max_consecutive_skips: int = 3,
        max_grad_norm: float | None = 1.0,
        save_dir: str | None = None,
        sample_table_every: int = 10,
        num_table_samples: int = 4,
        checkpoints: CheckpointManager | None = None,
        wandb_id: str | None = None,
        debug: Mapping[str, Any] | None = None,
        reference_draws: tuple[list[list[str]], Tensor] | None = None,
    ) -> None:
        """``reference_draws``: (texts [P][K], rewards [P, K]) of train prompts 0 .. P - 1,
        sampled from the reference with this run's generation settings and scored (the
        frontier stage's): the scorer learns from them instead of sampling those prompts."""
        self.check_args(
            steps,
            batch_size,
            samples_per_prompt,
            prefix_scorer,
            distill,
            guide_candidates=guide_candidates,
            guide_scale=guide_scale,
            lr_decay=lr_decay,
            mini_batch_size=mini_batch_size,
        )
        check_guide_scale(guide_scale, reference_draws is not None)
        super().__init__(
            tokenizer=tokenizer,
            prompts=prompts,
            tracker=tracker,
            steps=steps,
            batch_size=batch_size,
            samples_per_prompt=samples_per_prompt,
            seed=seed,
            device=device,
            precision=precision,
            on_nonfinite=on_nonfinite,
            max_consecutive_skips=max_consecutive_skips,
            max_grad_norm=max_grad_norm,
            save_dir=save_dir,
            checkpoints=checkpoints,
            wandb_id=wandb_id,
            debug=LoopDebug(**(debug or {})),
            node="algorithm",
        )
        self.reward = scorer
        self.generation = dict(generation)
        self.beta = float(kl_controller.value)
        self.work_dir = Path(work_dir)
        self.scorer_settings = {**SCORER_DEFAULTS, **prefix_scorer}
        self.distill = {**DISTILL_DEFAULTS, **distill}
        self.sample_table_every, self.num_table_samples = sample_table_every, num_table_samples
        self.attach(ActorCritic(model, value_head=False), optimizer)
        self.lr_decay = lr_decay
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.candidates, self.guide_scale = guide_candidates, guide_scale
        self.updates_per_step = batch_size // (mini_batch_size or batch_size)
        if batch_size // samples_per_prompt // self.dist.world_size < self.updates_per_step:
            raise ConfigError(
                "algorithm.mini_batch_size",
                f"{mini_batch_size} leaves a process fewer prompts than updates per step",
                "raise it to a multiple of samples_per_prompt x the number of processes",
            )
        self.guide: Guide | None = None  # the teacher's guidance, once prepare fitted it
        # distill.prefixes=reference: the scorer's training rollouts, in groups of k
        self.reference: ReferenceSamples | None = None
        self.groups: list[list[int]] = []
        self.rollouts = Rollouts(
            sample=self.sample,
            reference_pass=self._reference_pass,
            queries=self._queries,
            reward=scorer,
            tokenizer=tokenizer,
            max_new_tokens=make_sampling(self.generation).max_new_tokens,
            device=self.device,
            draws=reference_draws,
        )

    # --------------------------------------------------------------- the reference
    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    def _reference_pass(
        self, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's logits [B, T, V] and last decoder states [B, T, d] of responses
        [P * k, T] of prompts [P, S] (no grad)."""
        dec = decoder_inputs(response, self.policy.config.decoder_start_token_id)
        with torch.no_grad(), self.policy.reference(), self._autocast():
            out = ActorCritic._run(self.model, query, query_mask, dec, True, None, k)
        return out.logits.float(), out.decoder_hidden_states[-1].float()

    def _queries(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_queries(
            [self.prompts[i]["input_ids"] for i in indices],
            self.tokenizer.pad_token_id,
            self.device,
        )

    @torch.no_grad()
    def sample(
        self,
        indices: list[int],
        generator: torch.Generator,
        k: int,
        source: str,
        record: list[tuple[Tensor, Tensor]] | None = None,
        states: list[Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, query mask, responses, response mask): k samples of each prompt from
        ``source``: ``teacher`` (the guided reference), ``reference`` (adapter disabled,
        unguided: the scorer's rollouts) or ``policy``; ``record``, ``states``: see
        :func:`~detox_exp.generation.sample_responses`."""
        query, query_mask = self._queries(indices)
        context = contextlib.nullcontext() if source == "policy" else self.policy.reference()
        with context, self._autocast():
            response, mask = sample_responses(
                self.model,
                self.tokenizer,
                query,
                query_mask,
                self.generation,
                samples_per_prompt=k,
                generator=generator,
                guide=self.guide if source == "teacher" else None,
                record=record,
                states=states,
            )
        return query, query_mask, response, mask

    def data_size(self) -> int:
        """The prompts, or with ``distill.prefixes=reference`` the groups of k of the
        scorer's rollouts (each step distils on ``batch_size / k`` of them)."""
        if self.distill["prefixes"] != "reference":
            return len(self.prompts)
        if not self.groups:
            raise RuntimeError("distill.prefixes=reference: prepare() keeps the rollouts first")
        return len(self.groups)

    # ------------------------------------------------------------ the prefix scorer
    def prepare(self) -> None:
        """Fit the prefix scorer (or, resumed, load the one this run fitted) and, with
        ``distill.prefixes=reference``, keep its training rollouts."""
        path = self.work_dir / "prefix_scorer.pt"
        samples = self.work_dir / "reference_samples.pt"
        if self.step > 0 and path.is_file():
            log.info("guided: reusing the prefix scorer %s", path)
        elif self.dist.is_main:
            scorer, stats, reference = fit_prefix_scorer(
                self.rollouts,
                self.scorer_settings,
                len(self.prompts),
                self.model.get_output_embeddings().weight,
                self.beta,
                self.seed,
                sampling_stream(self.seed, self.dist.rank, 0, self.device),
            )
            guide = Guide(scorer, self.beta, self.candidates)
            if self.guide_scale == KL_MATCH:
                stats |= self._match_scale(guide)
            else:
                guide.scale = float(self.guide_scale)
            reference.save(samples)
            save_guide(guide, path)  # last: the fit is complete once this file is there
            self.tracker.log_summary(stats)
        self.dist.wait()
        self.guide = load_guide(path, self.device)
        if self.distill["prefixes"] == "reference":
            if not samples.is_file():  # a run fitted with other prefixes, resumed with these
                raise DataError(
                    "resume",
                    f"{samples} is missing: this run's scorer was fitted without keeping its "
                    "rollouts",
                    "resume with the run's own algorithm.distill.prefixes",
                )
            self.reference = ReferenceSamples.load(samples)
            self.groups = self.reference.groups(self.k)

    def _match_scale(self, guide: Guide) -> dict[str, float]:
        """Set ``guide.scale`` to the one at which the teacher's KL to the reference equals the
        optimum's at the run's beta, both on the frontier stage's prompts
        (:mod:`detox_exp.guided.calibrate`); the same teacher samples for every scale tried
        (their own streams), :data:`CALIBRATION_SAMPLES` per prompt, sampled
        ``prefix_scorer.batch_prompts`` prompts at a time (the kept distributions of a batch
        take batch x tokens x vocabulary x 8 bytes)."""
        texts, rewards = self.rollouts.draws
        target = float(optimum_kl(optimum_weights(rewards.double().numpy(), self.beta)).mean())
        self.guide = guide

        def sample(indices: list[int], stream: torch.Generator, k: int, record: list) -> Tensor:
            return self.sample(indices, stream, k, "teacher", record)[3]

        def streams(b: int) -> torch.Generator:
            return sampling_stream(self.seed, self.dist.rank, CALIBRATION_STREAM + b, self.device)

        per_batch = self.scorer_settings["batch_prompts"]
        scale, kl, _ = calibrate(
            guide, target, sample, len(texts), per_batch, streams, CALIBRATION_SAMPLES
        )
        log.info("guided: guide scale %.3f, teacher KL %.3f, optimum's %.3f", scale, kl, target)
        return {M.GUIDE_SCALE: scale, M.GUIDE_SCALE_KL: kl, M.GUIDE_SCALE_TARGET: target}

    # ------------------------------------------------------------------ one step
    def teacher_logits(
        self,
        query: Tensor,
        query_mask: Tensor,
        response: Tensor,
        record: list[tuple[Tensor, Tensor]] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The reference's and the teacher's logits [B, T, V] at every prefix of
        ``response``: kept from sampling (``record``, when the teacher drew the responses),
        else from one reference pass and the guide, scored at the response tokens ``mask``
        [B, T] only when given (past a response's end, out of every loss, the teacher's
        logits are the reference's: the guide is most of the cost)."""
        if record is not None:
            return torch.stack([r for r, _ in record], 1), torch.stack([t for _, t in record], 1)
        ref_logits, states = self._reference_pass(query, query_mask, response, self.k)
        if mask is None:
            mask = ref_logits.new_ones(ref_logits.shape[:2])
        keep = mask.bool()
        with torch.no_grad():
            teacher = ref_logits.clone()
            ref = ref_logits[keep]
            teacher[keep] = guided_logits(ref, self.guide(states[keep], ref))
        return ref_logits, teacher

    def _distill_step(
        self, query: Tensor, query_mask: Tensor, response: Tensor, mask: Tensor, teacher: Tensor
    ) -> tuple[float, Tensor]:
        """The distillation loss of responses [B, T] of prompts [P, S] against the teacher's
        logits [B, T, V], and its backward; returns (the loss, the policy's logits, detached)."""
        dec = decoder_inputs(response, self.policy.config.decoder_start_token_id)
        with self._autocast():
            out = self.ddp(query, query_mask, dec, with_values=False, samples_per_prompt=self.k)
        student = out.logits.float()
        loss = distill_loss(student, teacher, mask, self.distill["direction"])
        self.check("loss", loss)
        loss.backward()  # DDP averages the processes' gradients: the global mean
        return loss.item(), student.detach()

    def update(self) -> tuple[dict[str, float], StepSamples]:
        """Take the step's batch (the scorer's rollouts, or samples of the teacher or the
        policy), read the teacher's distributions, then one optimizer step per minibatch of
        its prompts (``updates_per_step``, each sample used once)."""
        t0 = self._clock()
        source = self.distill["prefixes"]
        record = [] if source == "teacher" else None  # its distributions, as it sampled
        if source == "reference":  # the scorer's rollouts, each group of k once per pass
            groups = [self.groups[i] for i in self.next_batch()]
            indices = [int(self.reference.prompts[group[0]]) for group in groups]
            query, query_mask = self._queries(indices)
            rows = [row for group in groups for row in group]
            pad = self.tokenizer.pad_token_id
            response, mask = self.reference.responses(rows, pad, self.device)
            mask = mask.float()
        else:
            indices = self.next_batch()
            query, query_mask, response, mask = self.sample(
                indices, self.sampling_stream(), self.k, source, record
            )
        texts = decode(self.tokenizer, response)
        t1 = self._clock()
        ref_logits, teacher = self.teacher_logits(query, query_mask, response, record, mask)
        losses, norms, students = [], [], []
        prompts = torch.arange(len(indices), device=self.device)
        for update, groups in enumerate(prompts.tensor_split(self.updates_per_step)):
            self._set_lr(update)
            rows = group_rows(groups, self.k)
            loss, student = self._distill_step(
                query[groups], query_mask[groups], response[rows], mask[rows], teacher[rows]
            )
            losses.append(loss)
            norms.append(self.optimizer_step())
            students.append(student)
        student = torch.cat(students)
        t2 = self._clock()
        scores = self.reward.score(texts)
        t3 = self._clock()
        local = {
            M.LOSS_DISTILL: sum(losses) / len(losses),
            M.GRAD_NORM: sum(norms) / len(norms),
            M.TIME_GENERATE: t1 - t0,
            M.TIME_OPTIMIZE: t2 - t1,
            M.TIME_SCORE: t3 - t2,
        }
        with torch.no_grad():  # at the response tokens only (past their ends is padding)
            keep = mask.bool()
            response_of = keep.nonzero()[:, 0]
            log_ref = ref_logits[keep].log_softmax(-1)  # [tokens, V]

            def kl_to_reference(logits: Tensor) -> Tensor:  # exact, summed per response
                kl = categorical_kl(logits[keep].log_softmax(-1), log_ref)
                return kl.new_zeros(len(mask)).index_add_(0, response_of, kl)

            kl_policy, kl_teacher = kl_to_reference(student), kl_to_reference(teacher)
            candidates = self.guide.candidates  # the guide in use (a resumed run: its file's)
            if candidates:  # the reference's mass on the tokens the guide scored
                covered = log_ref.exp().topk(min(candidates, log_ref.shape[-1]))
                local[M.GUIDE_CANDIDATE_MASS] = covered.values.sum(-1).mean().item()
        reward = self.dist.gather(scores.reward.to(self.device))
        toxicity = self.dist.gather(scores.toxicity.to(self.device))
        local = self.dist.mean_dict(local, sorted(local))
        metrics = {
            M.KL: self.dist.gather(kl_policy).mean().item(),
            M.TEACHER_KL: self.dist.gather(kl_teacher).mean().item(),
            M.KL_COEF: self.beta,
            M.REWARD_MEAN: reward.mean().item(),
            M.REWARD_STD: reward.std().item() if len(reward) > 1 else 0.0,
            M.TOXICITY_MEAN: toxicity.mean().item(),
            M.RESPONSE_LEN_MEAN: self.dist.gather(mask.sum(1)).mean().item(),
            **local,
        }
        return metrics, StepSamples(indices, texts, scores.reward, scores.toxicity)

    def _set_lr(self, update: int) -> None:
        """``lr_decay=linear``: the learning rate of update ``update`` of this step falls
        linearly from the optimizer's to 1 / U of it over the run's U = steps x
        updates_per_step updates; a function of the step and the update alone, so a resumed
        run sets the same rates."""
        if self.lr_decay != "linear":
            return
        total = self.steps * self.updates_per_step
        left = 1.0 - (self.step * self.updates_per_step + update) / total
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * left

    def postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """The loss, the policy's KL and, unless the step's samples are the reference's (a
        constant of the run), their toxicity."""
        shown = {"loss": f"{metrics[M.LOSS_DISTILL]:.3f}"}
        if self.distill["prefixes"] != "reference":
            shown["toxicity"] = f"{metrics[M.TOXICITY_MEAN]:.3f}"
        return shown | {"kl": f"{metrics[M.KL]:.3f}"}

    def save(self, summary, config, eval_table=(), reward_model=None) -> Path | None:
        """The policy as PPO saves it, plus the prefix scorer (``prefix_scorer.pt``) and the
        beta it guides at, so that :func:`detox_exp.guided.teacher.load_teacher` can sample
        from the teacher of a saved run."""
        saved = super().save(summary, config, eval_table, reward_model)
        if saved is not None and self.guide is not None:
            save_guide(self.guide, saved / "prefix_scorer.pt")
        return saved
