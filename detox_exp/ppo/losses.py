"""PPO's loss on one minibatch, from the policy's forward pass over it: the clipped policy
loss, and as configured the clipped value loss (GAE), an entropy bonus and a KL term to the
reference (``ppo.kl_loss_coef``), each aggregated by ``ppo.loss_agg_mode``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from detox_exp import metric_names as M
from detox_exp.kl import kl_loss
from detox_exp.ppo import core
from detox_exp.ppo.experience import Minibatch
from detox_exp.ppo.settings import PPOSettings
from detox_exp.training.policy import ForwardOutput


def minibatch_loss(
    out: ForwardOutput,
    mb: Minibatch,
    s: PPOSettings,
    agg: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """(the loss, its terms as metrics) of minibatch ``mb`` given the policy's logits (and
    values) ``out`` on its responses; ``agg`` reduces per-token terms (see
    :func:`detox_exp.ppo.core.aggregate_loss`)."""
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
        kl_tokens = kl_loss(logprobs, mb.ref_logprobs, s.kl_loss_estimator, logits, mb.ref_logits)
        kl_term = agg(kl_tokens, mb.mask)
        loss = loss + s.kl_loss_coef * kl_term
        stats[M.LOSS_KL] = kl_term.item()
    stats[M.LOSS_TOTAL] = loss.item()
    return loss, stats
