"""One rollout batch (the "experience" PPO learns from), its minibatches and its metrics.

Shapes: ``B`` rows (this process's share of the batch), ``S`` prompt width, ``T`` response
width. Prompts are right-padded, responses hold pad after their first EOS; both widths are
rounded up to ``fast.width_multiple`` (:mod:`detox_exp.fast.widths`), and
:meth:`Experience.minibatch` trims a minibatch's padding to the same multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detox_exp import metric_names as M
from detox_exp.distributed import Dist
from detox_exp.fast import SWITCHES
from detox_exp.fast.widths import round_up
from detox_exp.ppo import core
from detox_exp.seq2seq import group_rows
from detox_exp.training.policy import ForwardOutput


@dataclass
class Minibatch:
    """The groups of one optimisation micro-batch, right padding trimmed: ``p`` prompts and
    their ``b = p * k`` samples."""

    query: torch.Tensor  # [p, s] prompt ids, one row per prompt
    query_mask: torch.Tensor  # [p, s]
    response: torch.Tensor  # [b, t] sampled ids
    mask: torch.Tensor  # [b, t] 1 up to and including the first EOS
    logprobs: torch.Tensor  # [b, t] log-probs under the rollout's policy ("old")
    ref_logprobs: torch.Tensor  # [b, t] reference log-probs
    values: torch.Tensor | None  # [b, t] the rollout's value estimates (gae only)
    advantages: torch.Tensor  # [b, t]
    returns: torch.Tensor  # [b, t]
    ref_logits: torch.Tensor | None = None  # [b, t, V] (kl_loss_estimator=full only)


@dataclass
class Experience:
    """Everything PPO needs from one rollout, on the trainer's device.

    ``P`` prompts, each sampled ``k`` times: ``B = P * k`` samples, prompt p's samples in rows
    ``p * k ... p * k + k - 1`` (a group). Prompt tensors have one row per prompt.
    """

    indices: list[int]  # [P] the prompts' rows in the dataset
    samples_per_prompt: int  # k
    query: torch.Tensor  # [P, S] prompt ids
    query_mask: torch.Tensor  # [P, S]
    response: torch.Tensor  # [B, T] sampled ids, pad after the first EOS
    mask: torch.Tensor  # [B, T] float, 1 up to and including the first EOS
    texts: list[str]  # [B] the decoded responses
    scores: torch.Tensor  # [B] raw reward-model scores
    toxicity: torch.Tensor  # [B] P(toxic) from the reward model
    logprobs: torch.Tensor  # [B, T] policy log-probs of the response tokens
    ref_logprobs: torch.Tensor  # [B, T] reference log-probs
    values: torch.Tensor | None  # [B, T] value estimates (gae only)
    entropy: torch.Tensor  # [B, T] policy entropy per position
    kl: torch.Tensor  # [B, T] per-token KL for logging (ppo.kl_log_estimator, >= 0)
    kl_reward: torch.Tensor  # [B, T] per-token KL in the reward (ppo.kl_estimator)
    rewards: torch.Tensor  # [B, T] -kl_coef * kl_reward, plus the score on the last token
    advantages: torch.Tensor  # [B, T] GAE (whitened if configured) or the group advantage
    returns: torch.Tensor  # [B, T] advantages + values (gae) or the sequence reward
    timings: dict[str, float]  # seconds per rollout phase (time/*)
    ref_logits: torch.Tensor | None = None  # [B, T, V] reference logits (kl loss "full")
    # the rollout's policy pass with its graph, for the batch's one update (see
    # PPOTrainer.reuses_rollout_forward); None once used, or when the update runs its own
    live: ForwardOutput | None = None

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        """The sample rows [len(groups) * k] of the prompts (groups) ``groups``."""
        return group_rows(groups, self.samples_per_prompt)

    def minibatch(self, groups: torch.Tensor) -> Minibatch:
        """The prompts ``groups`` and all their samples, with the columns past the longest
        prompt / response among them dropped (widths rounded up to ``fast.width_multiple``)."""
        idx = self.rows(groups)
        mask = self.mask[idx]
        query_mask = self.query_mask[groups]
        multiple = SWITCHES.width_multiple
        t = round_up(int(mask.sum(1).max().item()), multiple, mask.shape[1])
        s = round_up(int(query_mask.sum(1).max().item()), multiple, query_mask.shape[1])
        return Minibatch(
            query=self.query[groups][:, :s],
            query_mask=query_mask[:, :s],
            response=self.response[idx][:, :t],
            mask=mask[:, :t],
            logprobs=self.logprobs[idx][:, :t],
            ref_logprobs=self.ref_logprobs[idx][:, :t],
            values=None if self.values is None else self.values[idx][:, :t],
            advantages=self.advantages[idx][:, :t],
            returns=self.returns[idx][:, :t],
            ref_logits=None if self.ref_logits is None else self.ref_logits[idx][:, :t],
        )


def step_metrics(
    roll: Experience, local: dict[str, float], dist: Dist, kl_coef: float
) -> dict[str, float]:
    """A PPO step's metrics: exact global statistics from per-sample values gathered over
    processes, and the means over processes of the rest (``local``: optimisation stats and
    timings); ``kl_coef``: the coefficient the step's rewards used."""
    mask = roll.mask
    kl_per_sample = dist.gather(roll.kl.sum(1))
    kl_reward = dist.gather(roll.kl_reward.sum(1))
    scores = dist.gather(roll.scores)
    toxicity = dist.gather(roll.toxicity.to(dist.device))
    lengths = dist.gather(mask.sum(1).float())
    local = {
        M.ENTROPY: core.masked_mean(roll.entropy, mask).item(),
        M.RETURNS_MEAN: core.masked_mean(roll.returns, mask).item(),
        **roll.timings,
        **local,
    }
    if roll.values is not None:
        local[M.VAR_EXPLAINED] = core.explained_variance(roll.values, roll.returns, mask).item()
        local[M.VALUE_MEAN] = core.masked_mean(roll.values, mask).item()
    local = dist.mean_dict(local, sorted(local))
    metrics = {
        M.KL: kl_per_sample.mean().item(),
        M.KL_REWARD: kl_reward.mean().item(),
        M.KL_COEF: kl_coef,
        M.REWARD_MEAN: scores.mean().item(),
        M.REWARD_STD: scores.std().item() if len(scores) > 1 else 0.0,
        M.TOXICITY_MEAN: toxicity.mean().item(),
        M.RESPONSE_LEN_MEAN: lengths.mean().item(),
        **local,
    }
    if roll.samples_per_prompt > 1:  # gathered groups are whole: rows p * k ... p * k + k - 1
        groups = scores.view(-1, roll.samples_per_prompt)
        metrics[M.GROUP_ZERO_STD] = (groups == groups[:, :1]).all(1).float().mean().item()
        metrics[M.GROUP_REWARD_STD] = groups.std(1).mean().item()
    return metrics
