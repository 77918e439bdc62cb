"""Value-guided training (``algorithm=guided``): fit a prefix scorer on reference rollouts,
then distil the guided reference ``ref(a | s) V(s, a)`` (the objective's tokenwise optimum,
:mod:`detox_exp.guidance`) into the LoRA policy with a per-token full-vocabulary divergence.

1. ``prepare`` (before step 1): sample ``scorer.rollout_prompts`` train prompts x
   ``scorer.rollout_samples`` responses from the reference (the prompts the frontier stage
   drew from come with its draws instead: ``reference_draws``), score them, and fit the
   :class:`~detox_exp.guided.scorer.PrefixScorer` by cross-entropy against each response's
   reward (two-hot on the atoms) at every (prefix, realised token); its calibration on
   held-out rollout prompts against the constant predictor goes to the summary
   (``guided/scorer/*``). The fitted scorer is saved in ``work_dir``; a resumed run loads it.
2. each step: ``batch_size / k`` prompts x k responses from the teacher (``prefixes:
   teacher``) or the policy (``policy``), the teacher's and the policy's next-token
   distributions at every prefix, and one optimizer step on :func:`~detox_exp.guidance.
   distill_loss` (``direction``). Forward KL on the teacher's samples is the default: its
   expected gradient is that of the sequence-level KL(teacher || policy) (docs/guided.md).

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
from detox_exp.errors import ConfigError
from detox_exp.generation import (
    decode,
    decoder_inputs,
    pad_queries,
    response_mask,
    sample_responses,
)
from detox_exp.guidance import (
    distill_loss,
    guided_logits,
    reward_atoms,
    scorer_loss,
    two_hot,
)
from detox_exp.guided.scorer import PrefixScorer, load_prefix_scorer, save_prefix_scorer
from detox_exp.reward.scorer import ToxicityScorer
from detox_exp.tracking import Tracker
from detox_exp.training.loop import LoopDebug, StepSamples, TrainingLoop, sampling_stream
from detox_exp.training.policy import ActorCritic
from detox_exp.utils import progress

log = logging.getLogger(__name__)

DIRECTIONS = ("forward", "reverse")
SCORER_DEFAULTS = {
    "rollout_prompts": 1024,
    "rollout_samples": 8,
    "batch_prompts": 32,
    "batch_tokens": 4096,
    "n_atoms": 16,
    "hidden_size": 0,
    "epochs": 8,
    "lr": 3e-3,
    "heldout_fraction": 0.1,
}
ROW_KEYS = ("states", "tokens")  # the scorer's inputs per response token
DISTILL_DEFAULTS = {"direction": "forward", "prefixes": "teacher"}
PREFIXES = ("teacher", "policy")


def _check(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"algorithm.{key}", problem, fix)


def check_settings(
    steps: int = 100,
    batch_size: int = 64,
    samples_per_prompt: int = 4,
    prefix_scorer: Mapping[str, Any] | None = None,
    distill: Mapping[str, Any] | None = None,
    on_nonfinite: str = "error",
    max_consecutive_skips: int = 3,
    **_: Any,
) -> None:
    """The ranges of ``algorithm.*`` (the pipeline checks them before any stage runs)."""
    scorer = {**SCORER_DEFAULTS, **(prefix_scorer or {})}
    distill = {**DISTILL_DEFAULTS, **(distill or {})}
    for key in scorer:
        if key not in SCORER_DEFAULTS:
            raise ConfigError(
                f"algorithm.prefix_scorer.{key}",
                "unknown key",
                f"use one of {list(SCORER_DEFAULTS)}",
            )
    for key in distill:
        if key not in DISTILL_DEFAULTS:
            raise ConfigError(
                f"algorithm.distill.{key}", "unknown key", f"use one of {list(DISTILL_DEFAULTS)}"
            )
    _check(steps >= 1, "steps", f"must be >= 1, got {steps}", "raise it")
    _check(
        on_nonfinite in ("error", "skip"),
        "on_nonfinite",
        f"unknown {on_nonfinite!r}",
        "use one of ('error', 'skip')",
    )
    _check(max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1", "raise it")
    _check(samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1", "raise it")
    _check(
        batch_size >= samples_per_prompt and batch_size % samples_per_prompt == 0,
        "batch_size",
        f"must be a multiple of samples_per_prompt={samples_per_prompt}, got {batch_size}",
        f"use e.g. {4 * samples_per_prompt}",
    )
    _check(
        scorer["rollout_prompts"] >= 4, "prefix_scorer.rollout_prompts", "must be >= 4", "raise it"
    )
    _check(
        scorer["rollout_samples"] >= 1, "prefix_scorer.rollout_samples", "must be >= 1", "raise it"
    )
    _check(scorer["n_atoms"] >= 2, "prefix_scorer.n_atoms", "must be >= 2", "use e.g. 16")
    _check(scorer["epochs"] >= 1, "prefix_scorer.epochs", "must be >= 1", "raise it")
    for key in ("batch_prompts", "batch_tokens"):
        _check(scorer[key] >= 1, f"prefix_scorer.{key}", "must be >= 1", "raise it")
    _check(scorer["hidden_size"] >= 0, "prefix_scorer.hidden_size", "must be >= 0", "use 0: linear")
    _check(
        scorer["lr"] > 0, "prefix_scorer.lr", f"must be > 0, got {scorer['lr']}", "use e.g. 3e-3"
    )
    _check(
        0 < scorer["heldout_fraction"] < 1,
        "prefix_scorer.heldout_fraction",
        f"must be in (0, 1), got {scorer['heldout_fraction']}",
        "use e.g. 0.1",
    )
    _check(
        distill["direction"] in DIRECTIONS,
        "distill.direction",
        f"unknown direction {distill['direction']!r}",
        f"use one of {DIRECTIONS}",
    )
    _check(
        distill["prefixes"] in PREFIXES,
        "distill.prefixes",
        f"unknown prefixes {distill['prefixes']!r}",
        f"use one of {PREFIXES}",
    )


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
        steps: int = 100,
        batch_size: int = 32,
        samples_per_prompt: int = 4,
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
        self.check_args(steps, batch_size, samples_per_prompt, prefix_scorer, distill)
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
        self.prefix_scorer: PrefixScorer | None = None
        self.reference_draws = reference_draws

    # --------------------------------------------------------------- the reference
    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    def guide(self, hidden: torch.Tensor) -> torch.Tensor:
        """``log V(s, a)`` [..., V] after decoder states [..., d] (the teacher's guidance)."""
        return self.prefix_scorer.log_values(hidden, self.beta)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, query mask, responses, response mask): k samples of each prompt from
        ``source``: ``teacher`` (the guided reference), ``reference`` (adapter disabled,
        unguided: the scorer's rollouts) or ``policy``; ``record``: see
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
            )
        return query, query_mask, response, mask

    # ------------------------------------------------------------ the prefix scorer
    def prepare(self) -> None:
        """Fit the prefix scorer (or, resumed, load the one this run fitted)."""
        path = self.work_dir / "prefix_scorer.pt"
        if self.step > 0 and path.is_file():
            self.prefix_scorer, _ = load_prefix_scorer(path, self.device)
            log.info("guided: reusing the prefix scorer %s", path)
            return
        if self.dist.is_main:
            scorer, stats = self._fit_scorer()
            save_prefix_scorer(scorer, self.beta, path)
            self.tracker.log_summary(stats)
        self.dist.wait()
        self.prefix_scorer, _ = load_prefix_scorer(path, self.device)

    def _drawn(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(query, query mask, responses, response mask, rewards) of ``indices`` from
        ``reference_draws``: the texts tokenised again as the decoder reads them (EOS last;
        one cut at ``max_new_tokens`` has none, as a sampled one)."""
        texts, rewards = self.reference_draws
        limit = int(self.generation.get("max_new_tokens", 64))
        ids = self.tokenizer([t for i in indices for t in texts[i]])["input_ids"]
        response, present = pad_queries(
            [row[:limit] for row in ids], self.tokenizer.pad_token_id, self.device
        )
        mask = response_mask(response, self.tokenizer.eos_token_id) * present
        query, query_mask = self._queries(indices)
        return query, query_mask, response, mask, rewards[indices].flatten().to(self.device)

    def _token_data(
        self, indices: list[int], generator: torch.Generator, drawn: bool = False
    ) -> dict[str, Tensor]:
        """Reference samples of ``indices`` (``rollout_samples`` each; ``drawn``: those of
        ``reference_draws``), scored, as one row per
        response token (EOS included): the reference decoder's state before it ``states``
        [N, d], the token ``tokens`` [N], and the response's reward ``rewards`` [N]; plus
        the responses' rewards ``sequence_rewards``."""
        s = self.scorer_settings
        k, per = s["rollout_samples"], max(1, s["batch_prompts"])
        if drawn:
            k = self.reference_draws[1].shape[1]
        out: dict[str, list] = {
            "states": [],
            "tokens": [],
            "rewards": [],
            "sequence_rewards": [],
        }
        bar = progress(total=len(indices), desc="scorer rollouts", unit="prompt")
        for start in range(0, len(indices), per):
            chunk = indices[start : start + per]
            if drawn:
                query, query_mask, response, mask, reward = self._drawn(chunk)
            else:
                query, query_mask, response, mask = self.sample(chunk, generator, k, "reference")
                reward = self.reward.score(decode(self.tokenizer, response)).reward
                reward = reward.to(self.device)
            _, states = self._reference_pass(query, query_mask, response, k)
            keep = mask.bool()
            out["states"].append(states[keep])
            out["tokens"].append(response[keep])
            out["rewards"].append(reward[:, None].expand_as(mask)[keep])
            out["sequence_rewards"].append(reward)
            bar.update(len(chunk))
        bar.close()
        return {key: torch.cat(value) for key, value in out.items()}

    def _fit_scorer(self) -> tuple[PrefixScorer, dict[str, float]]:
        """Reference rollouts on ``rollout_prompts`` train prompts (a held-out share of
        freshly sampled ones kept for calibration; the prompts of ``reference_draws`` come
        with their draws), the reward atoms and prior from their rewards, then ``epochs``
        passes of Adam over their tokens in shuffled batches of ``batch_tokens``."""
        s = self.scorer_settings
        gen = torch.Generator().manual_seed(self.seed + 7919)  # the scorer's own streams
        order = torch.randperm(len(self.prompts), generator=gen).tolist()
        total = min(s["rollout_prompts"], len(self.prompts))
        n_heldout = max(1, int(total * s["heldout_fraction"]))
        n_drawn = 0 if self.reference_draws is None else len(self.reference_draws[0])
        drawn = list(range(min(n_drawn, total - n_heldout, len(self.prompts))))
        fresh = [i for i in order if i >= len(drawn)][: total - len(drawn)]
        stream = sampling_stream(self.seed, self.dist.rank, 0, self.device)
        parts = [self._token_data(fresh[:-n_heldout], stream)] if len(fresh) > n_heldout else []
        if drawn:
            reused = self._token_data(drawn, stream, drawn=True)
            parts.append(reused)
            log.info("prefix scorer: the frontier's draws of %d prompts reused", len(drawn))
        train = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        held = self._token_data(fresh[-n_heldout:], stream)
        atoms = reward_atoms(train["sequence_rewards"], s["n_atoms"]).to(self.device)
        prior = two_hot(train["sequence_rewards"], atoms).mean(0)
        embedding = self.model.get_output_embeddings().weight
        scorer = PrefixScorer(embedding, atoms, prior, s["hidden_size"]).to(self.device)
        opt = torch.optim.Adam(scorer.parameters(), lr=s["lr"])
        n = len(train["tokens"])
        batches = range(0, n, s["batch_tokens"])
        bar = progress(total=s["epochs"] * len(batches), desc="prefix scorer", unit="batch")
        for _ in range(s["epochs"]):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for start in batches:
                rows = perm[start : start + s["batch_tokens"]]
                logits = scorer.atom_logits(*(train[key][rows] for key in ROW_KEYS))
                loss = scorer_loss(logits, two_hot(train["rewards"][rows], atoms))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
        bar.close()
        scorer = scorer.eval().requires_grad_(False)
        stats = self._calibration(scorer, held, prior)
        stats[M.SCORER_ROLLOUTS] = float(len(train["sequence_rewards"]))
        stats[M.SCORER_ATOMS] = float(len(atoms))
        stats[M.SCORER_REUSED] = float(len(reused["sequence_rewards"]) if drawn else 0)
        log.info(
            "prefix scorer: held-out cross-entropy %.4f (constant %.4f), value correlation %.3f",
            stats[M.SCORER_LOSS_HELDOUT],
            stats[M.SCORER_LOSS_CONSTANT],
            stats[M.SCORER_VALUE_CORR],
        )
        return scorer, stats

    @torch.no_grad()
    def _calibration(
        self, scorer: PrefixScorer, held: dict[str, Tensor], prior: Tensor
    ) -> dict[str, float]:
        """On held-out prompts' tokens: the cross-entropy per token against the constant
        predictor (the training rewards' atom frequencies), and the correlation of the
        predicted V(s, a) with the realised exp(r / beta)."""
        target = two_hot(held["rewards"], scorer.atoms)
        logits = torch.cat(
            [
                scorer.atom_logits(*(held[key][i : i + 4096] for key in ROW_KEYS))
                for i in range(0, len(held["tokens"]), 4096)
            ]
        )
        constant = prior.clamp_min(1e-6).log().to(logits.device).expand_as(logits)
        value = logits.softmax(-1) @ torch.exp(scorer.atoms / self.beta)
        realised = torch.exp(held["rewards"] / self.beta)
        corr = torch.corrcoef(torch.stack([value, realised]))[0, 1].item()
        return {
            M.SCORER_LOSS_HELDOUT: scorer_loss(logits, target).item(),
            M.SCORER_LOSS_CONSTANT: scorer_loss(constant, target).item(),
            M.SCORER_VALUE_CORR: corr,
        }

    # ------------------------------------------------------------------ one step
    def teacher_logits(
        self,
        query: Tensor,
        query_mask: Tensor,
        response: Tensor,
        record: list[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The reference's and the teacher's logits [B, T, V] at every prefix of
        ``response``: kept from sampling (``record``, when the teacher drew the responses),
        else from one reference pass and the guide."""
        if record is not None:
            return torch.stack([r for r, _ in record], 1), torch.stack([t for _, t in record], 1)
        ref_logits, states = self._reference_pass(query, query_mask, response, self.k)
        with torch.no_grad():
            return ref_logits, guided_logits(ref_logits, self.guide(states))

    def update(self) -> tuple[dict[str, float], StepSamples]:
        """Sample, read the teacher's and the policy's distributions, one optimizer step."""
        t0 = self._clock()
        indices = self.next_batch()
        source = self.distill["prefixes"]
        record = [] if source == "teacher" else None  # its distributions, as it sampled
        query, query_mask, response, mask = self.sample(
            indices, self.sampling_stream(), self.k, source, record
        )
        texts = decode(self.tokenizer, response)
        t1 = self._clock()
        ref_logits, teacher = self.teacher_logits(query, query_mask, response, record)
        dec = decoder_inputs(response, self.policy.config.decoder_start_token_id)
        with self._autocast():
            out = self.ddp(query, query_mask, dec, with_values=False, samples_per_prompt=self.k)
        student = out.logits.float()
        loss = distill_loss(student, teacher, mask, self.distill["direction"])
        self.guard.check("loss", loss, self.step + 1)
        loss.backward()  # DDP averages the processes' gradients: the global mean
        norm = self.optimizer_step()
        t2 = self._clock()
        scores = self.reward.score(texts)
        t3 = self._clock()
        with torch.no_grad():
            log_ref = ref_logits.log_softmax(-1)
            log_pi, log_t = student.detach().log_softmax(-1), teacher.log_softmax(-1)
            kl_policy = ((log_pi.exp() * (log_pi - log_ref)).sum(-1) * mask).sum(1)
            kl_teacher = ((log_t.exp() * (log_t - log_ref)).sum(-1) * mask).sum(1)
        reward = self.dist.gather(scores.reward.to(self.device))
        toxicity = self.dist.gather(scores.toxicity.to(self.device))
        local = {
            M.LOSS_DISTILL: loss.item(),
            M.GRAD_NORM: norm,
            M.TIME_GENERATE: t1 - t0,
            M.TIME_OPTIMIZE: t2 - t1,
            M.TIME_SCORE: t3 - t2,
        }
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

    def postfix(self, metrics: Mapping[str, float]) -> dict[str, str]:
        return {
            "loss": f"{metrics[M.LOSS_DISTILL]:.3f}",
            "toxicity": f"{metrics[M.TOXICITY_MEAN]:.3f}",
            "kl": f"{metrics[M.KL]:.3f}",
        }

    def save(self, summary, config, eval_table=(), reward_model=None) -> Path | None:
        """The policy as PPO saves it, plus the prefix scorer (``prefix_scorer.pt``) and the
        beta it guides at, so that :func:`detox_exp.guided.teacher.load_teacher` can sample
        from the teacher of a saved run."""
        saved = super().save(summary, config, eval_table, reward_model)
        if saved is not None and self.prefix_scorer is not None:
            save_prefix_scorer(self.prefix_scorer, self.beta, saved / "prefix_scorer.pt")
        return saved
