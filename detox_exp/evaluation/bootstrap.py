"""Paired bootstrap confidence intervals of before -> after changes: per-example
statistics (:func:`paired_bootstrap_ci`) and corpus-level ones such as distinct-n
(:func:`paired_bootstrap_corpus`). Plain numpy; the prompts are the resampled unit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["paired_bootstrap_ci", "paired_bootstrap_corpus"]

_BOOTSTRAP_STATISTICS: tuple[str, ...] = ("mean", "median")


def _paired_arrays(
    before: np.ndarray, after: np.ndarray, n_resamples: int, confidence: float, statistic: str
) -> tuple[np.ndarray, np.ndarray]:
    """``before`` and ``after`` as float64 arrays, once every argument of
    :func:`paired_bootstrap_ci` is checked (its ``Raises``)."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise ValueError(f"eval.bootstrap.n_resamples must be an integer, got {n_resamples!r}")
    if n_resamples < 1:
        raise ValueError(f"eval.bootstrap.n_resamples must be >= 1, got {n_resamples}")
    if not isinstance(confidence, (int, float, np.floating)) or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"eval.bootstrap.confidence must be strictly between 0 and 1, got {confidence!r}"
        )
    if statistic not in _BOOTSTRAP_STATISTICS:
        raise ValueError(
            f"eval.bootstrap.statistic must be one of {_BOOTSTRAP_STATISTICS}, got {statistic!r}"
        )

    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.ndim != 1 or a.ndim != 1:
        raise ValueError(
            f"before and after must be 1-D per-prompt arrays, got shapes {b.shape} and {a.shape}"
        )
    if b.shape[0] != a.shape[0]:
        raise ValueError(
            "before and after must be paired (same prompts, same length), got lengths "
            f"{b.shape[0]} and {a.shape[0]}"
        )
    if b.shape[0] < 2:
        raise ValueError(f"paired bootstrap needs at least 2 paired values, got {b.shape[0]}")
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(a))):
        raise ValueError("before and after must contain only finite values")
    return b, a


def paired_bootstrap_ci(
    before: np.ndarray,
    after: np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
) -> dict[str, float]:
    """Paired percentile-bootstrap CI for the change ``after - before``.

    ``before[i]`` and ``after[i]`` must be the same metric for the same prompt ``i``
    (e.g. toxicity of the reference-model and PPO-model responses). Prompt indices are
    resampled with replacement (the same indices for both arrays, preserving pairing)
    using ``np.random.default_rng(seed)``; all resamples are drawn at once as an
    ``[n_resamples, n]`` index matrix.

    With ``statistic="mean"`` (default) the statistic is ``mean(after - before)``, which
    equals ``mean(after) - mean(before)``. With ``statistic="median"`` it is the median of
    the paired differences, and the relative quantities use medians of ``before`` and
    ``after``.

    Args:
        before: Per-prompt values before training, shape ``[n]``.
        after: Per-prompt values after training, shape ``[n]``, same prompts/order.
        n_resamples: Number of bootstrap resamples (``eval.bootstrap.n_resamples``).
        confidence: Two-sided confidence level in ``(0, 1)`` (``eval.bootstrap.confidence``).
        seed: Seed for ``np.random.default_rng`` (``eval.bootstrap.seed``).
        statistic: ``"mean"`` or ``"median"`` (``eval.bootstrap.statistic``).

    Returns:
        ``delta``: observed statistic of ``after - before``.
        ``ci_low``, ``ci_high``: percentile CI of the resampled delta.
        ``rel_delta``: ``delta / stat(before)`` (``nan`` if ``stat(before) == 0``).
        ``rel_ci_low``, ``rel_ci_high``: percentile CI of the per-resample relative change
        ``stat(after_s) / stat(before_s) - 1``; resamples with ``stat(before_s) == 0`` are
        ignored (``nan`` if all are).
        ``p_value``: two-sided bootstrap p-value, ``2 *`` the fraction of resampled deltas
        on the other side of 0 from the observed delta (``<= 0`` if ``delta > 0``,
        ``>= 0`` if ``delta < 0``), capped at 1; ``1.0`` if ``delta == 0``. Its resolution
        is ``2 / n_resamples``, so it can be exactly 0.

    Raises:
        ValueError: If the inputs are not 1-D, differ in length, have fewer than 2
            elements or contain non-finite values, or if ``n_resamples``, ``confidence``
            or ``statistic`` are invalid.
    """
    b, a = _paired_arrays(before, after, n_resamples, confidence, statistic)
    n = b.shape[0]
    stat = np.mean if statistic == "mean" else np.median
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    return _bootstrap_summary(
        float(stat(diff)),
        float(stat(b)),
        stat(diff[idx], axis=1),
        stat(b[idx], axis=1),
        stat(a[idx], axis=1),
        confidence,
    )


def _bootstrap_summary(
    delta: float,
    base: float,
    delta_s: np.ndarray,
    before_s: np.ndarray,
    after_s: np.ndarray,
    confidence: float,
) -> dict[str, float]:
    """CI, relative change and p-value from the observed ``delta`` and its resamples (see
    :func:`paired_bootstrap_ci` for the definitions)."""
    rel_delta = delta / base if base != 0.0 else float("nan")
    alpha = 1.0 - float(confidence)
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    ci_low, ci_high = (float(v) for v in np.percentile(delta_s, q))

    valid = before_s != 0.0
    if np.any(valid):
        rel_s = after_s[valid] / before_s[valid] - 1.0
        rel_ci_low, rel_ci_high = (float(v) for v in np.percentile(rel_s, q))
    else:
        rel_ci_low = rel_ci_high = float("nan")

    if delta > 0.0:
        p_value = 2.0 * float(np.mean(delta_s <= 0.0))
    elif delta < 0.0:
        p_value = 2.0 * float(np.mean(delta_s >= 0.0))
    else:
        p_value = 1.0
    p_value = min(p_value, 1.0)

    return {
        "delta": delta,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "rel_delta": rel_delta,
        "rel_ci_low": rel_ci_low,
        "rel_ci_high": rel_ci_high,
        "p_value": p_value,
    }


def paired_bootstrap_corpus(
    before: Sequence[Any],
    after: Sequence[Any],
    metric: Callable[[Sequence[Any]], float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of a CORPUS-level metric (distinct-n, a fraction over all samples):
    the prompts are resampled with replacement (the same indices before and after) and
    ``metric`` is recomputed on each resample, rather than averaging per-prompt values.

    ``before[i]``, ``after[i]``: prompt i's items (e.g. its k responses) before / after;
    ``metric`` maps a list of such items to a float. Same output keys as
    :func:`paired_bootstrap_ci`, with ``delta = metric(after) - metric(before)``.

    Resampling with replacement repeats prompts, and a repeated prompt repeats its n-grams
    and responses, so the resampled distinct-n / unique fraction are biased low (by an amount
    that differs before and after). Each phase's resampled values are therefore re-centred on
    its observed value before the percentile CI is taken (a bootstrap bias correction).
    """
    if len(before) != len(after):
        raise ValueError(
            f"before and after must be paired, got lengths {len(before)} and {len(after)}"
        )
    n = len(before)
    if n < 2:
        raise ValueError(f"paired bootstrap needs at least 2 paired values, got {n}")
    if not 0.0 < confidence < 1.0 or n_resamples < 1:
        raise ValueError("eval.bootstrap: need n_resamples >= 1 and 0 < confidence < 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    before_s = np.array([metric([before[i] for i in row]) for row in idx])
    after_s = np.array([metric([after[i] for i in row]) for row in idx])
    base, final = metric(list(before)), metric(list(after))
    before_s += base - before_s.mean()
    after_s += final - after_s.mean()
    return _bootstrap_summary(final - base, base, after_s - before_s, before_s, after_s, confidence)
