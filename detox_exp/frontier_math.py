"""The optimum of the KL-regularised objective, from K reference samples per prompt.

For the objective ``E_pi[r] - beta * KL(pi || ref)`` the optimum is

    pi*_beta(y | x) = ref(y | x) * exp(r(y) / beta) / Z_beta(x)

(Korbak et al. 2022). Given K draws ``y_1..y_K ~ ref(. | x)``, the self-normalised importance
weights ``w_k = exp(r_k / beta) / sum_j exp(r_j / beta)`` turn an expectation under the
reference into one under the optimum: ``E_pi*[f] ~ sum_k w_k f(y_k)``, consistent in K and
valid for any reward (no bound on ``r``, unlike rejection sampling). Likewise

    KL(pi* || ref) = E_pi*[r / beta] - log Z ~ sum_k w_k log(K w_k).

With finite K both are estimates on the K draws: the optimum can only reweight what the
reference sampled, so a drop near 100% or a KL near log K is capped by K.

Every function here is pure (arrays in, numbers out); :mod:`detox_exp.frontier.stage` does
the sampling and the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from detox_exp.metrics import distinct_n, response_collapse

# corpus metrics of the resampled responses
CORPUS_METRICS: dict[str, Callable[[list[str]], float]] = {
    "distinct_1": lambda texts: distinct_n(texts, 1),
    "distinct_2": lambda texts: distinct_n(texts, 2),
    "unique_fraction": lambda texts: response_collapse(texts)["unique_fraction"],
    "top_response_fraction": lambda texts: response_collapse(texts)["top_response_fraction"],
}


def _check(rewards: np.ndarray, beta: float) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=float)
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [P, K], got shape {rewards.shape}")
    if not np.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return rewards


def optimum_weights(rewards: np.ndarray, beta: float) -> np.ndarray:
    """Self-normalised weights of pi*_beta on each prompt's K reference draws.

    Args:
        rewards: ``[P, K]`` rewards of K independent draws from the reference per prompt.
        beta: the KL coefficient (``> 0``).

    Returns:
        ``[P, K]`` weights, each row summing to 1 (``softmax(r / beta)`` over the K draws).
    """
    logits = _check(rewards, beta) / beta
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def optimum_kl(weights: np.ndarray) -> np.ndarray:
    """``KL(pi* || ref)`` per prompt ``[P]`` from the weights: ``sum_k w_k log(K w_k)``
    (``0 log 0 = 0``); 0 for uniform weights, at most ``log K``."""
    w = np.asarray(weights, dtype=float)
    k = w.shape[1]
    terms = np.where(w > 0, w * np.log(np.where(w > 0, k * w, 1.0)), 0.0)
    return terms.sum(axis=1)


def tilted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """``E_pi*[values]`` averaged over prompts: ``mean_p sum_k w_pk v_pk``."""
    return float((np.asarray(values, dtype=float) * weights).sum(axis=1).mean())


def toxicity_drop(rewards: np.ndarray, toxicity: np.ndarray, beta: float) -> float:
    """The optimum's relative cut of the mean toxicity, ``1 - E_pi*[tox] / E_ref[tox]``
    (0 where the reference has no toxicity to cut)."""
    ref = float(np.mean(toxicity))
    if ref <= 0:
        return 0.0
    return 1.0 - tilted_mean(toxicity, optimum_weights(rewards, beta)) / ref


def beta_for_drop(
    rewards: np.ndarray, toxicity: np.ndarray, target: float, low: float, high: float
) -> float | None:
    """The largest beta in ``[low, high]`` whose optimum cuts the mean toxicity by at least
    ``target`` (the least KL spent for that cut), by bisection on ``log beta``; None when
    even ``low`` falls short.

    The cut shrinks as beta grows whenever the reward falls as toxicity rises (pi*_beta is
    an exponential tilt of the reference by ``r`` with natural parameter ``1 / beta``: the
    tilted mean of a decreasing function of ``r`` falls as that parameter grows).
    """
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    if toxicity_drop(rewards, toxicity, high) >= target:
        return high
    if toxicity_drop(rewards, toxicity, low) < target:
        return None
    lo, hi = np.log(low), np.log(high)  # drop(lo) >= target > drop(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if toxicity_drop(rewards, toxicity, float(np.exp(mid))) >= target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(lo))


def resample(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Indices ``[P, M]`` drawn from each prompt's categorical ``weights`` by inverse CDF of
    ``uniforms`` ``[P, M]`` in [0, 1) (the same uniforms for every beta: common random
    numbers, so that the frontier's curves are smooth in beta)."""
    cdf = np.cumsum(weights, axis=1)
    cdf[:, -1] = 1.0
    return np.stack([np.searchsorted(c, u, side="right") for c, u in zip(cdf, uniforms)])


# resamplings behind the optimum's corpus metrics (of one draw per prompt each): 32 x 128
# held-out prompts put the demo's distinct-2 ratio within about 0.01 of 64's
RESAMPLINGS = 32


def resampling_uniforms(seed: int, repeats: int, prompts: int) -> np.ndarray:
    """Uniforms ``[R, P, 1]`` for R resamplings of ONE draw per prompt (:func:`resample`).

    One pick per prompt, not K: K picks from a prompt's K draws repeat the draws the weights
    favour, a duplication the optimum itself (over every response, not K of them) does not
    have, so the corpus metrics of K picks read low. On the demo (seeds 1 / 2 / 3, beta 1,
    128 held-out prompts x 16 draws, 32 resamplings) the optimum's distinct-2 against the
    reference's reads 0.86x / 0.84x / 0.87x with 16 picks, 0.94x / 0.94x / 0.94x with one;
    exact draws of the optimum (rejection: each draw kept with probability exp(r / beta),
    the first 4 kept per prompt against the first 4 drawn) give 0.98x / 0.92x / 0.93x."""
    return np.random.default_rng(seed).random((repeats, prompts, 1))


def resampled_corpus_metrics(
    weights: np.ndarray, texts: Sequence[Sequence[str]], uniforms: np.ndarray
) -> dict[str, float]:
    """:data:`CORPUS_METRICS` averaged over R resamplings of M draws per prompt by
    ``weights`` ``[P, K]`` (``uniforms`` ``[R, P, M]``; :func:`resampling_uniforms`: M = 1)."""
    sums = dict.fromkeys(CORPUS_METRICS, 0.0)
    for u in uniforms:
        picked = resample(weights, u)
        corpus = [texts[p][i] for p in range(len(texts)) for i in picked[p]]
        for name, metric in CORPUS_METRICS.items():
            sums[name] += metric(corpus)
    return {name: total / len(uniforms) for name, total in sums.items()}


@dataclass
class ReferenceCorpus:
    """The reference's corpus metrics over all P * K draws (``full``) and over the R
    resamplings by uniform weights (``resampled``): the scale and the baseline that the
    optimum's resampled corpus metrics are read against (:func:`optimum_metrics`)."""

    full: dict[str, float]
    resampled: dict[str, float]

    @classmethod
    def of(cls, texts: Sequence[Sequence[str]], uniforms: np.ndarray) -> ReferenceCorpus:
        corpus = [t for group in texts for t in group]
        full = {name: metric(corpus) for name, metric in CORPUS_METRICS.items()}
        k = len(texts[0])  # draws per prompt (the uniforms pick M of them)
        flat = np.full((len(texts), k), 1.0 / k)
        return cls(full, resampled_corpus_metrics(flat, texts, uniforms))


def optimum_metrics(
    beta: float,
    rewards: np.ndarray,
    toxicity: np.ndarray,
    texts: Sequence[Sequence[str]],
    per_sample: dict[str, np.ndarray],
    reference: ReferenceCorpus,
    threshold: float,
    uniforms: np.ndarray,
) -> dict[str, float]:
    """The optimum's metrics at ``beta`` from K reference draws of P prompts.

    Args:
        rewards, toxicity: ``[P, K]`` of the draws.
        texts: ``[P][K]`` the draws' responses.
        per_sample: other ``[P, K]`` per-response metrics (e.g. ``rouge_l``), whose optimum
            value is their tilted mean.
        reference: the reference's corpus metrics (:meth:`ReferenceCorpus.of`, computed
            once with the same ``uniforms`` for every beta).
        threshold: toxicity above which a response counts as toxic.
        uniforms: ``[R, P, M]`` uniforms for R resamplings of M draws per prompt
            (:func:`resampling_uniforms`: M = 1).

    Returns:
        ``toxicity_mean``, ``toxic_fraction``, ``reward_mean``, each ``per_sample`` key
        (tilted means), ``kl_to_reference`` (nats per response), and the corpus metrics.
        A corpus metric depends on the corpus size and on repeats, so it is read on R
        resamplings of one draw per prompt by the weights, against the same resamplings by
        uniform weights (a corpus of the same size), and scaled onto the reference's P * K
        draws: ``ref_value * mean(weighted) / mean(uniform)``.
    """
    w = optimum_weights(rewards, beta)
    toxicity = np.asarray(toxicity, dtype=float)
    out = {
        "toxicity_mean": tilted_mean(toxicity, w),
        "toxic_fraction": tilted_mean(toxicity > threshold, w),
        "reward_mean": tilted_mean(rewards, w),
        "kl_to_reference": float(optimum_kl(w).mean()),
    }
    out |= {name: tilted_mean(values, w) for name, values in per_sample.items()}
    weighted = resampled_corpus_metrics(w, texts, uniforms)
    for name, value in weighted.items():
        flat = reference.resampled[name]
        out[name] = reference.full[name] * (value / flat if flat > 0 else 1.0)
    return out
