"""PPO math as pure functions of tensors: masked statistics, log-probabilities, the losses
and their aggregation modes. Rewards and advantage estimators: :mod:`detox_exp.ppo.
advantages`; the KL estimators: :mod:`detox_exp.kl`; the KL controllers:
:mod:`detox_exp.kl_control`.

Shapes: ``B`` = batch, ``T`` = response length, ``V`` = vocabulary size. ``mask`` is a bool or
float tensor ``[B, T]`` with 1 for real response tokens (right-padded: ``1 ... 1 0 ... 0``).
Values outside the mask never reach a result (they may even be ``nan`` or ``-inf``).

Sources: Schulman et al. 2017 "Proximal Policy Optimization Algorithms" (clipped objective),
Schulman et al. 2016 "High-Dimensional Continuous Control Using GAE" (advantages),
Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences" (KL reward and
adaptive KL coefficient), http://joschu.net/blog/kl-approx.html (KL estimators k1/k2/k3),
huggingface/trl v0.11.4 ``trl/core.py`` and vwxyzjn/cleanrl ``ppo.py`` (implementations).
"""

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from detox_exp.kl import float_dtype
from detox_exp.registry import Registry

LOSS_AGG_MODES = Registry("ppo.loss_agg_mode")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero.

    ``x`` and ``mask`` broadcast together (typically both ``[B, T]``). ``dim=None`` gives a
    scalar; an int reduces that dimension only. An empty mask gives ``nan`` (0 / 0).
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum()
    return total.sum(dim) / count.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of ``x`` over the masked positions (``x``, ``mask``: ``[B, T]``).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` with ``n = mask.sum()``.
    """
    n = mask.bool().sum().item()
    if n == 0:
        raise ValueError("masked_var: mask has no non-zero entries, the variance is undefined")
    if unbiased and n == 1:
        raise ValueError(
            "masked_var: the unbiased variance needs at least 2 masked values, mask has 1 "
            "(pass unbiased=False for the population variance)"
        )
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with masked mean and unbiased masked variance.

    ``x``, ``mask``: ``[B, T]`` -> ``[B, T]``. ``shift_mean=False`` adds the mean back (only the
    scale changes). Positions outside the mask are transformed too; callers mask them.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` ``[B, T]`` under ``logits`` ``[B, T, V]`` -> ``[B, T]``.

    Computed in at least float32. ``labels`` must be valid token ids (no -100).
    """
    logp = torch.log_softmax(logits.to(float_dtype(logits.dtype)), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def in_row_chunks(fn: Callable[..., Tensor], *tensors: Tensor, rows: int = 2) -> Tensor:
    """``fn(*tensors)`` computed ``rows`` batch rows at a time and concatenated.

    For row-independent functions of [B, T, V] logits (log-probs, entropy) the result is
    bit-identical, and the float32 temporaries (17 MB each for 16 x 32 x 8192) stay in cache
    instead of being allocated and written per op: 15 -> 7 ms for log-probs + entropy of the
    benchmark batch on CPU (``benchmarks/micro.py``).
    """
    chunks = [
        fn(*(t[start : start + rows] for t in tensors))
        for start in range(0, tensors[0].shape[0], rows)
    ]
    return torch.cat(chunks)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last non-zero entry in each row of ``mask`` ``[B, T]`` -> ``[B]`` (long).

    Raises ValueError if a row is empty (no response token to carry the score).
    """
    keep = mask.bool()
    if not bool(keep.any(dim=-1).all()):
        raise ValueError("mask has a row with no response tokens; every response needs >= 1")
    positions = torch.arange(1, keep.shape[-1] + 1, device=mask.device)
    return (keep * positions).argmax(dim=-1)


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    num_seqs: float | None = None,
    num_tokens: float | None = None,
    horizon: int | None = None,
) -> Tensor:
    """Token losses ``[B, T]`` -> a scalar by the registered ``loss_agg_mode`` (verl's names).

    ``num_seqs`` / ``num_tokens`` are the sizes of the WHOLE minibatch this part belongs to
    (over micro-batches and processes; default: this part's own), so that the parts' losses
    add up to the loss of the whole: a sum divided by the global count, not a mean of means.
    ``horizon``: the generation's ``max_new_tokens`` (default: the width T).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"ppo.loss_agg_mode: unknown {mode!r}")
    keep = mask.bool()
    loss_mat = torch.where(keep, loss_mat, torch.zeros((), dtype=loss_mat.dtype))
    return LOSS_AGG_MODES[mode].fn(
        loss_mat,
        keep,
        loss_mat.shape[0] if num_seqs is None else num_seqs,
        keep.sum() if num_tokens is None else num_tokens,
        horizon or loss_mat.shape[1],
    )


@LOSS_AGG_MODES.register("token-mean")
def token_mean(loss: Tensor, keep: Tensor, num_seqs: float, num_tokens: float, horizon: int):
    """``sum(loss) / num_tokens``: every token weighs the same (DAPO)."""
    return loss.sum() / num_tokens


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def seq_mean_token_mean(
    loss: Tensor, keep: Tensor, num_seqs: float, num_tokens: float, horizon: int
):
    """The mean over sequences of each one's token mean (GRPO)."""
    return (loss.sum(1) / keep.sum(1).clamp_min(1)).sum() / num_seqs


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def seq_mean_token_sum(
    loss: Tensor, keep: Tensor, num_seqs: float, num_tokens: float, horizon: int
):
    """The mean over sequences of each one's token sum."""
    return loss.sum() / num_seqs


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss: Tensor, keep: Tensor, num_seqs: float, num_tokens: float, horizon: int
):
    """``sum(loss) / (num_seqs * horizon)``, a constant divisor (Dr. GRPO)."""
    return loss.sum() / (num_seqs * horizon)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    agg: Callable[[Tensor, Tensor], Tensor] = masked_mean,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``logprobs`` (current policy, with grad), ``old_logprobs`` (rollout policy), ``advantages``,
    ``mask``: ``[B, T]``. ``agg(token_losses, mask)`` reduces the token losses (default: their
    masked mean; see ``aggregate_loss``). Returns ``(loss, stats)``; the scalar stats are
    detached token means: ``clipfrac``, ``approxkl`` (k3 of KL(old || new)), ``policykl``
    (k1), ``ratio_mean``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    # Policy loss
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = agg(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask),
            # calculate approx_kl http://joschu.net/blog/kl-approx.html (k3, as cleanrl)
            "approxkl": masked_mean((ratio - 1) - log_ratio, mask),
            "policykl": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    agg: Callable[[Tensor, Tensor], Tensor] = masked_mean,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss as in OpenAI baselines PPO2 / trl: ``0.5 * agg(max(l1, l2))``.

    ``values`` (current, with grad), ``old_values`` (rollout), ``returns``, ``mask``: ``[B, T]``;
    ``agg`` as in ``policy_loss``.
    ``l1 = (V - R)^2``, ``l2 = (V_old + clamp(V - V_old, -c, c) - R)^2``. Returns
    ``(loss, stats)`` with detached ``clipfrac`` (fraction where the clipped term is larger)
    and ``mse`` (masked mean of ``l1``).
    """
    vpredclipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * agg(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask),
            "mse": masked_mean(vf_losses1, mask),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) ``[B, T, V]`` -> ``[B, T]``: ``logsumexp(z) - sum p * z``."""
    logits = logits.to(float_dtype(logits.dtype))
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the mask (scalar); ``nan`` if
    ``Var(returns) == 0``. 1 is a perfect value function, <= 0 no better than a constant."""
    var_y = masked_var(returns, mask, unbiased=False)
    if var_y.item() == 0:
        return torch.full((), math.nan, dtype=var_y.dtype, device=var_y.device)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_y


class RunningMoments:
    """Running mean / variance over all values seen, merged batch by batch with Chan et al.'s
    parallel form of Welford's algorithm (float64 Python scalars, so it is exact to
    checkpoint). ``mean``, ``var`` (population) and ``std`` (with Bessel's correction)."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    @property
    def std(self) -> float:
        if self.count < 2:
            return 0.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the values of ``x`` (any shape) in; returns this batch's (mean, std)."""
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        batch_mean = x.mean().item()
        batch_var = x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        # M2 = M2_a + M2_b + delta^2 * n_a * n_b / n  (Chan, Golub & LeVeque 1979)
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.count = int(state["count"])


def process_scores(
    scores: Tensor,
    scale: float = 1.0,
    clip: float | None = None,
    normalize: bool = False,
    running: RunningMoments | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Reward-model scores ``[B]`` -> scores used as the final-token reward ``[B]``.

    Multiplies by ``scale``; if ``normalize``, first merges the batch into ``running`` (this
    mutates it) and returns ``(s - running.mean) / (running.std + eps)``; then clips to
    ``[-clip, clip]`` when ``clip`` is not None.
    """
    if clip is not None and clip <= 0:
        raise ValueError(f"process_scores: clip must be > 0 or None, got {clip}")
    scores = scores * scale
    if normalize:
        if running is None:
            raise ValueError("process_scores: normalize=True needs a RunningMoments `running`")
        running.update(scores)
        scores = (scores - running.mean) / (running.std + eps)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores
