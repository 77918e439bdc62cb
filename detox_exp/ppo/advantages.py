"""Per-token rewards and the advantage estimators as pure functions of tensors: the KL
penalised rewards (Ziegler et al. 2019), GAE (Schulman et al. 2016) and the critic-free group
estimators (RLOO, GRPO, Dr. GRPO), registered by name in ``ADVANTAGE_ESTIMATORS``
(``ppo.advantage_estimator``). Shapes and masks as in :mod:`detox_exp.ppo.core`."""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from detox_exp.kl import kl_penalty
from detox_exp.ppo.core import last_token_index
from detox_exp.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("ppo.advantage_estimator")


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards with a KL penalty (Ziegler et al. 2019, eq. 2).

    ``r_t = -kl_coef * KL_t`` on response tokens, plus the sequence score ``scores[b]`` (``[B]``)
    at the last response token of row b. Returns ``(rewards, kl)``, both ``[B, T]`` and 0
    outside ``mask``. The default k1 makes the penalty's expected policy gradient exactly
    ``kl_coef * grad KL(pi || ref)``, so the objective is ``E[score] - kl_coef * KL`` (see
    ``kl_penalty`` for the other estimators and arguments).
    """
    keep = mask.bool()
    kl = kl_penalty(logprobs, ref_logprobs, estimator, logits=logits, ref_logits=ref_logits)
    kl = torch.where(keep, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    rewards = -kl_coef * kl
    scores = scores.reshape(-1).to(rewards.dtype)
    if scores.shape[0] != rewards.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries for a batch of {rewards.shape[0]}")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), vectorised over the batch.

    ``rewards``, ``values``, ``mask``: ``[B, T]``. A position outside the mask is terminal:
    the value after the last response token is 0. Returns ``(advantages, returns)``, both
    ``[B, T]``, with ``returns = advantages + values`` and 0 outside the mask. Pass detached
    tensors (this function does not detach).
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(keep, values, zero)
    rewards = torch.where(keep, rewards.to(values.dtype), zero)
    nonterminal = keep.to(values.dtype)
    gen_len = rewards.shape[-1]
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(gen_len)):
        # bootstrap value if not done: V(s_{t+1}) = 0 past the end of the response
        nextvalues = values[:, t + 1] if t < gen_len - 1 else torch.zeros_like(lastgaelam)
        # delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1}
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * nonterminal[:, t]
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def per_group(baseline: Callable[[Tensor, float], Tensor]) -> Callable[..., tuple[Tensor, Tensor]]:
    """A critic-free estimator from its group rule ``baseline(scores [P, k], eps) -> [P, k]``:
    each sample's sequence reward (its score plus its summed per-token KL penalty) goes
    through the rule with its group's k - 1 others, and every token of the sample gets the
    sample's advantage; the return is the sequence reward. A group whose k rewards are all
    equal carries no signal and gets exactly 0. The rule stays reachable as ``.group``."""

    def estimator(
        rewards: Tensor, mask: Tensor, values: Tensor | None, *, k: int, eps: float, **_: Any
    ) -> tuple[Tensor, Tensor]:
        sequence_reward = rewards.sum(1)
        per_sample = group_advantages(sequence_reward.view(-1, k), baseline, eps)
        return per_sample.reshape(-1, 1) * mask, sequence_reward[:, None] * mask

    estimator.group = baseline
    estimator.__doc__ = baseline.__doc__
    return estimator


def group_advantages(
    scores: Tensor, estimator: str | Callable[[Tensor, float], Tensor], eps: float = 1e-6
) -> Tensor:
    """Critic-free advantages from ``scores`` ``[P, k]`` (k samples of each of P prompts) ->
    ``[P, k]`` by a registered group estimator's rule (or the rule itself); a group whose k
    scores are all equal gets exactly 0."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"group_advantages: scores must be [P, k >= 2], got {tuple(scores.shape)}")
    if isinstance(estimator, str):
        entry = ADVANTAGE_ESTIMATORS[estimator]
        if entry.needs_critic:
            raise ValueError(f"{estimator!r} is not a group advantage estimator")
        estimator = entry.fn.group
    advantages = estimator(scores, eps)
    flat = (scores == scores[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros((), dtype=advantages.dtype), advantages)


@ADVANTAGE_ESTIMATORS.register("gae", needs_critic=True)
def gae(
    rewards: Tensor, mask: Tensor, values: Tensor, *, gamma: float, lam: float, **_: Any
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) from the value head's per-token values (Schulman et al. 2016)."""
    return compute_gae(rewards, values, mask, gamma, lam)


@ADVANTAGE_ESTIMATORS.register("rloo", needs_critic=False)
@per_group
def rloo(scores: Tensor, eps: float) -> Tensor:
    """``s_i - mean_{j != i} s_j``, the leave-one-out baseline (Kool et al. 2019, Ahmadian et
    al. 2024): unbiased, the baseline is independent of the sample."""
    k = scores.shape[1]
    return (scores - scores.mean(dim=1, keepdim=True)) * (k / (k - 1))


@ADVANTAGE_ESTIMATORS.register("grpo", needs_critic=False)
@per_group
def grpo(scores: Tensor, eps: float) -> Tensor:
    """``(s_i - mean) / (std + eps)``, the unbiased std over the group (Shao et al. 2024)."""
    mean = scores.mean(dim=1, keepdim=True)
    return (scores - mean) / (scores.std(dim=1, keepdim=True) + eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo", needs_critic=False)
@per_group
def dr_grpo(scores: Tensor, eps: float) -> Tensor:
    """``s_i - mean``, GRPO without the std (Liu et al. 2025, Dr. GRPO)."""
    return scores - scores.mean(dim=1, keepdim=True)
