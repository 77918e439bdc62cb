"""Per-token KL(pi || ref) estimators, registered once (``KL_ESTIMATORS``) and used in three
roles, each chosen by its GRADIENT, not its value (docs/kl.md):

- ``reward``: detached, ``-beta * k`` per token (``ppo.kl_estimator``): :func:`kl_penalty`;
- ``log``: what ``objective/kl`` logs and the adaptive controller reads, never negative
  (``ppo.kl_log_estimator``): :func:`kl_penalty` too;
- ``loss``: a loss term with its gradient flowing (``ppo.kl_loss_estimator``): :func:`kl_loss`.

Every estimator is a pure function ``(log_ratio, logits, ref_logits) -> [B, T]`` with
``log_ratio = log p(x) - log q(x)`` ``[B, T]`` of tokens x SAMPLED from the policy p (q: the
reference) and, for ``full``, the logits ``[B, T, V]`` of both. Where it is registered
``nonnegative``, the reward / log roles clamp it at 0 against rounding; the loss role never
clamps (that would cut its gradient). Source: http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detox_exp.registry import Registry

KL_ESTIMATORS = Registry("ppo.kl_estimator")


def categorical_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per position, from the
    log-probabilities [..., V] of both: the one formula of ``full``, the distillation's
    per-token divergence and the guided method's logged KLs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, so log-softmax of bf16/fp16 logits stays accurate."""
    return torch.promote_types(dtype, torch.float32)


@KL_ESTIMATORS.register("k1", reward=True, log=False, loss=False, nonnegative=False)
def k1(log_ratio: Tensor, logits: Tensor | None, ref_logits: Tensor | None) -> Tensor:
    """``log p - log q``: unbiased, can be negative per token; as a detached reward its
    expected gradient is exactly ``grad KL(p || q)``; in the loss its expected gradient is 0.
    """
    return log_ratio


@KL_ESTIMATORS.register("k2", reward=True, log=False, loss=True, nonnegative=True)
def k2(log_ratio: Tensor, logits: Tensor | None, ref_logits: Tensor | None) -> Tensor:
    """``0.5 (log p - log q)^2``: biased, low variance; in the loss its expected gradient is
    ``grad KL(p || q)``, as a reward it vanishes near the reference (second order)."""
    return 0.5 * log_ratio**2


@KL_ESTIMATORS.register("k3", reward=True, log=True, loss=True, nonnegative=True)
def k3(log_ratio: Tensor, logits: Tensor | None, ref_logits: Tensor | None) -> Tensor:
    """``(r - 1) - log r`` with ``r = q / p``: unbiased, never negative; in the loss its
    expected gradient is ``grad KL(q || p)``, as a reward ``grad KL(p||q) - grad KL(q||p)``."""
    return torch.expm1(-log_ratio) + log_ratio  # expm1: accurate for r near 1


@KL_ESTIMATORS.register("full", reward=True, log=True, loss=True, nonnegative=True)
def full(log_ratio: Tensor | None, logits: Tensor | None, ref_logits: Tensor | None) -> Tensor:
    """Exact ``sum_v p_v (log p_v - log q_v)`` over the vocabulary, from both logits: no
    sampling noise over the token (as a reward: no gradient for the sampled token)."""
    if logits is None or ref_logits is None:
        raise ValueError("the 'full' KL estimator needs logits and ref_logits [B, T, V]")
    logp = torch.log_softmax(logits.to(float_dtype(logits.dtype)), dim=-1)
    logq = torch.log_softmax(ref_logits.to(logp.dtype), dim=-1)
    return categorical_kl(logp, logq)


def _estimate(
    role: str,
    field: str,
    estimator: str,
    logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    logits: Tensor | None,
    ref_logits: Tensor | None,
) -> tuple[Tensor, bool]:
    if estimator not in KL_ESTIMATORS.names(**{role: True}):
        raise ValueError(
            f"{field} must be one of {KL_ESTIMATORS.names(**{role: True})}, got {estimator!r}"
        )
    entry = KL_ESTIMATORS[estimator]
    log_ratio = None if logprobs is None else logprobs - ref_logprobs
    return entry.fn(log_ratio, logits, ref_logits), entry.nonnegative


def kl_penalty(
    logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    estimator: str,
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
) -> Tensor:
    """Per-token estimate of KL(pi || ref) -> ``[B, T]``, for the detached reward or the log
    (a ``reward`` / ``log`` estimator; the ``nonnegative`` ones clamped at 0).

    As a DETACHED per-token reward ``-beta * k`` (REINFORCE / PPO), the expected gradient of
    the penalty is ``E_p[k grad log p]``: for k1 that is exactly ``grad KL(p || q)``; for k3 it
    is ``grad KL(p || q) - grad KL(q || p)``, which nearly cancels near the reference (and can
    point away from it); k2's is second order in ``log(p/q)``; ``full`` carries no gradient for
    the sampled token itself. Only k1 regularises as its name says; the others are for logging.
    """
    kl, nonnegative = _estimate(
        "reward", "ppo.kl_estimator", estimator, logprobs, ref_logprobs, logits, ref_logits
    )
    return kl.clamp_min(0.0) if nonnegative else kl


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    estimator: str = "k3",
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
) -> Tensor:
    """Per-token KL loss term WITH its gradient flowing (GRPO's ``beta * KL`` in the loss) ->
    ``[B, T]``; callers aggregate it and add ``ppo.kl_loss_coef`` times it.

    ``logprobs`` (current policy, with grad) and ``ref_logprobs`` ``[B, T]`` of tokens sampled
    from the policy p. Expected gradients, x ~ p, each token's own term (the future tokens'
    dependence is not differentiated, as in GRPO): k3 ``E_p[(1 - q/p) grad log p] =
    grad KL(q || p)`` (mass-covering); k2 ``grad KL(p || q)``, the same divergence as the
    reward's k1; ``full`` exactly each visited position's next-token KL. k1 in the loss has
    expected gradient ``E_p[grad log p] = 0`` (noise only) and is refused.
    """
    kl, _ = _estimate(
        "loss", "ppo.kl_loss_estimator", estimator, logprobs, ref_logprobs, logits, ref_logits
    )
    return kl
