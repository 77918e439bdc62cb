"""Tests for detox_exp.ppo.core and detox_exp.ppo.advantages against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detox_exp.errors import ConfigError
from detox_exp.kl import KL_ESTIMATORS, kl_penalty
from detox_exp.kl_control import AdaptiveKLController, FixedKLController
from detox_exp.ppo.advantages import compute_gae, compute_rewards, group_advantages
from detox_exp.ppo.core import (
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    in_row_chunks,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    process_scores,
    value_loss,
)

LN2 = math.log(2.0)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# --- masked statistics (trl tests/test_core.py example) ----------------------------------


def test_masked_mean_and_var():
    x, mask = t([1.0, 2.0, 3.0, 4.0]), t([0, 1, 1, 0])
    assert_close(masked_mean(x, mask), 2.5)
    # deviations -0.5, 0.5: sum of squares 0.5, / (n - 1) = 0.5, / n = 0.25
    assert_close(masked_var(x, mask), 0.5)
    assert_close(masked_var(x, mask, unbiased=False), 0.25)
    assert_close(masked_mean(x, mask.bool()), 2.5)


def test_masked_mean_dim_and_garbage_outside_mask():
    x, mask = t([[1.0, 2.0], [3.0, 4.0]]), t([[1, 0], [1, 1]])
    assert_close(masked_mean(x, mask, dim=1), [1.0, 3.5])
    assert_close(masked_mean(x, mask, dim=0), [2.0, 4.0])
    # nan / -inf at padded positions never leak into the result
    x_bad = t([[1.0, math.nan], [3.0, -math.inf]])
    assert_close(masked_mean(x_bad, t([[1, 0], [1, 0]])), 2.0)


def test_masked_var_errors():
    with pytest.raises(ValueError, match="no non-zero"):
        masked_var(t([1.0, 2.0]), t([0, 0]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([1.0, 2.0]), t([0, 1]))
    assert_close(masked_var(t([1.0, 2.0]), t([0, 1]), unbiased=False), 0.0)


def test_masked_whiten():
    x, mask = t([1.0, 2.0, 3.0, 4.0]), t([0, 1, 1, 0])
    # mean 2.5, unbiased var 0.5 -> (2 - 2.5) / sqrt(0.5) = -0.70710678
    w = masked_whiten(x, mask, eps=0.0)
    assert_close(w[1:3], [-0.70710678, 0.70710678])
    w = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert_close(w[1:3], [2.5 - 0.70710678, 2.5 + 0.70710678])


# --- log-probs, entropy ------------------------------------------------------------------


def test_logprobs_from_logits():
    # logits [0, ln 3] -> probs [0.25, 0.75]
    logits = t([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    assert_close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.5)]])
    # bf16 logits are computed in float32
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_entropy_from_logits():
    v = 7
    assert_close(entropy_from_logits(torch.zeros(2, 3, v)), torch.full((2, 3), math.log(v)))
    # probs [0.25, 0.75]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    assert_close(entropy_from_logits(t([[[0.0, math.log(3.0)]]])), [[0.5623351446]])
    # shift-invariant and stable for huge logits
    assert_close(entropy_from_logits(t([[[1000.0, 1000.0 + math.log(3.0)]]])), [[0.5623351446]])


# --- KL estimators -----------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # token 0: p = 0.5, q = 0.25 -> r = q/p = 0.5; token 1: p = 0.25, q = 0.5 -> r = 2
    logp, logq = t([[math.log(0.5), math.log(0.25)]]), t([[math.log(0.25), math.log(0.5)]])
    assert_close(kl_penalty(logp, logq, "k1"), [[LN2, -LN2]])
    assert_close(kl_penalty(logp, logq, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])  # 0.2402265
    # (r - 1) - ln r: -0.5 + ln 2 = 0.1931472, 1 - ln 2 = 0.3068528
    assert_close(kl_penalty(logp, logq, "k3"), [[0.1931472, 0.3068528]])
    # full: p = [0.5, 0.5], q = [0.25, 0.75]: 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3) = 0.1438410
    logits, ref_logits = t([[[0.0, 0.0]]]), t([[[0.0, math.log(3.0)]]])
    full = kl_penalty(t([[0.0]]), t([[0.0]]), "full", logits=logits, ref_logits=ref_logits)
    assert_close(full, [[0.1438410]])


def test_kl_estimators_nonnegative_and_full_matches_torch():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(4, 6, 11) * 3, torch.randn(4, 6, 11) * 3
    labels = torch.distributions.Categorical(logits=logits).sample()
    logp, logq = logprobs_from_logits(logits, labels), logprobs_from_logits(ref_logits, labels)
    assert (kl_penalty(logp, logq, "k3") >= 0).all()
    assert (kl_penalty(logp, logq, "k2") >= 0).all()
    full = kl_penalty(logp, logq, "full", logits=logits, ref_logits=ref_logits)
    assert full.shape == (4, 6) and (full >= 0).all()
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Categorical(logits=ref_logits),
    )
    assert_close(full, expected, atol=1e-5)
    # identical models: zero KL under every estimator
    same = torch.zeros(4, 6)
    for estimator in KL_ESTIMATORS.names():
        kl = kl_penalty(logp, logp, estimator, logits=logits, ref_logits=logits)
        assert_close(kl, same, atol=1e-6)
    # k3 stays >= 0 for ratios extremely close to 1
    tiny = torch.tensor([1e-7, -1e-7, 1e-4, -1e-4, 30.0, -30.0])
    assert (kl_penalty(tiny, torch.zeros(6), "k3") >= 0).all()


def test_kl_estimator_errors():
    with pytest.raises(ValueError, match=r"ppo\.kl_estimator.*k1.*full"):
        kl_penalty(t([0.0]), t([0.0]), "k4")
    with pytest.raises(ValueError, match="logits"):
        kl_penalty(t([[0.0]]), t([[0.0]]), "full")


# --- rewards -----------------------------------------------------------------------------


def test_compute_rewards_k1_by_hand():
    logp = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -2.0, -2.0], [-2.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    scores = t([2.0, -1.0])
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref = [[0.5, 0, -1], [1, -1, -1]] -> masked [[0.5, 0, -1], [1, 0, 0]]
    assert_close(kl, [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    # -0.1 * kl, score at the last response token (index 2 in row 0, index 0 in row 1)
    assert_close(rewards, [[-0.05, 0.0, 2.1], [-1.1, 0.0, 0.0]])


def test_compute_rewards_k3_and_padding():
    # row 0 has 2 tokens: p = 0.5, q = 0.25 (k3 = ln 2 - 0.5); p = q (k3 = 0); pad has garbage
    logp = t([[math.log(0.5), -1.0, math.nan], [-1.0, -1.0, -1.0]])
    ref = t([[math.log(0.25), -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rewards, kl = compute_rewards(t([1.0, 3.0]), logp, ref, mask, kl_coef=0.5, estimator="k3")
    assert_close(kl, [[LN2 - 0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(rewards, [[-0.5 * (LN2 - 0.5), 1.0, 0.0], [0.0, 0.0, 3.0]])
    # the default is k1 (the estimator whose reward gradient is grad KL): ln 2 at token 0
    rewards, kl = compute_rewards(t([1.0, 3.0]), logp, ref, mask, kl_coef=0.5)
    assert_close(kl, [[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(rewards, [[-0.5 * LN2, 1.0, 0.0], [0.0, 0.0, 3.0]])


def test_last_token_index_and_empty_row():
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 0]
    with pytest.raises(ValueError, match="no response tokens"):
        compute_rewards(
            t([1.0, 1.0]), torch.zeros(2, 2), torch.zeros(2, 2), t([[1, 0], [0, 0]]), 0.1
        )


# --- GAE ---------------------------------------------------------------------------------


def naive_gae(rewards, values, lengths, gamma, lam):
    """Plain per-row loop: episode of `length` steps, V = 0 after the last step."""
    adv = [[0.0] * len(r) for r in rewards]
    for b, length in enumerate(lengths):
        gae = 0.0
        for i in reversed(range(length)):
            next_value = values[b][i + 1] if i + 1 < length else 0.0
            delta = rewards[b][i] + gamma * next_value - values[b][i]
            gae = delta + gamma * lam * gae
            adv[b][i] = gae
    return adv


def test_gae_hand_three_steps():
    # gamma = lam = 0.5, rewards [1, 0, 2], V = [1, 1, 1]; padded position holds garbage.
    # t=2: delta = 2 + 0 - 1 = 1,               A2 = 1
    # t=1: delta = 0 + 0.5 * 1 - 1 = -0.5,      A1 = -0.5 + 0.25 * 1 = -0.25
    # t=0: delta = 1 + 0.5 * 1 - 1 = 0.5,       A0 = 0.5 + 0.25 * -0.25 = 0.4375
    # row 1 has one step: A0 = 3 - 1 = 2
    rewards = t([[1.0, 0.0, 2.0, 5.0], [3.0, 9.0, 9.0, 9.0]])
    values = t([[1.0, 1.0, 1.0, 7.0], [1.0, 4.0, 4.0, 4.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(adv, [[0.4375, -0.25, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert_close(ret, [[1.4375, 0.75, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])


def test_gae_matches_naive_loop():
    torch.manual_seed(1)
    batch, gen_len, gamma, lam = 6, 9, 0.99, 0.95
    lengths = [9, 1, 4, 7, 2, 9]
    mask = (torch.arange(gen_len)[None, :] < torch.tensor(lengths)[:, None]).double()
    rewards, values = torch.randn(batch, gen_len).double(), torch.randn(batch, gen_len).double()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    expected = t(naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    assert_close(adv, expected, atol=1e-10)
    assert_close(ret, (expected + values) * mask, atol=1e-10)
    # lambda = 1 gives discounted return-to-go; lambda = 0 gives one-step TD errors
    _, ret1 = compute_gae(rewards, values, mask, 1.0, 1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    assert_close(ret1, rtg, atol=1e-10)


# --- losses ------------------------------------------------------------------------------


def test_policy_loss_clipping_by_hand():
    # ratios [1.5, 0.5, 1.0, 0.5 | 3.0 padded], advantages [1, 1, -1, -1 | 10], clip 0.2
    # tok0: pg1 = -1.5, pg2 = -1.2 -> -1.2 (clipped)   tok1: pg1 = -0.5, pg2 = -0.8 -> -0.5
    # tok2: pg1 = pg2 = 1 -> 1                         tok3: pg1 = 0.5, pg2 = 0.8 -> 0.8 (clipped)
    ratio = t([[1.5, 0.5, 1.0, 0.5, 3.0]])
    logprobs = torch.log(ratio).requires_grad_()
    old = torch.zeros(1, 5, dtype=torch.float64)
    adv = t([[1.0, 1.0, -1.0, -1.0, 10.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    assert_close(loss, (-1.2 - 0.5 + 1.0 + 0.8) / 4)  # 0.025
    assert_close(stats["clipfrac"], 0.5)
    assert_close(stats["ratio_mean"], (1.5 + 0.5 + 1.0 + 0.5) / 4)  # 0.875
    # k3: (r - 1) - ln r per token; k1: -ln r
    approxkl = ((0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4  # 0.1202066
    assert_close(stats["approxkl"], approxkl)
    assert_close(stats["policykl"], (-math.log(1.5) - 2 * math.log(0.5)) / 4)  # 0.2452071
    # clipped tokens and padding get no gradient; d/dlogp (-A r) / 4 = -A r / 4 elsewhere
    loss.backward()
    assert_close(logprobs.grad, [[0.0, -0.5 / 4, 1.0 / 4, 0.0, 0.0]])
    assert not stats["clipfrac"].requires_grad


def test_value_loss_clipping_by_hand():
    # old V = 1, clip 0.2: V = 1.5 -> clipped 1.2; V = 0.9 unclipped; V = 2.0 -> 1.2
    # tok0: l1 = (1.5 - 2)^2 = 0.25, l2 = (1.2 - 2)^2 = 0.64 -> 0.64 (clipped term larger)
    # tok1: l1 = l2 = 0.81   tok2: l1 = (2 - 1)^2 = 1.0, l2 = 0.04 -> 1.0
    values = t([[1.5, 0.9, 2.0, 100.0]])
    old = t([[1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert_close(loss, 0.5 * (0.64 + 0.81 + 1.0) / 3)  # 0.4083333
    assert_close(stats["clipfrac"], 1 / 3)
    assert_close(stats["mse"], (0.25 + 0.81 + 1.0) / 3)


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    assert_close(explained_variance(returns, returns, mask), 1.0)
    # residual [0, 0, 1]: var 2/9; var(returns) = 2/3 -> 1 - 1/3 = 2/3
    assert_close(explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask), 2 / 3)
    assert math.isnan(explained_variance(t([[0.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]])).item())


# --- scores and running moments ----------------------------------------------------------


def test_running_moments_matches_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 1, 7, 3)]
    running = RunningMoments()
    for i, batch in enumerate(batches):
        batch_mean, batch_std = running.update(torch.tensor(batch, dtype=torch.float32))
        seen = np.concatenate(batches[: i + 1])
        assert batch_mean == pytest.approx(batch.astype(np.float32).mean(), abs=1e-5)
        expected_std = batch.astype(np.float32).std(ddof=1) if batch.size > 1 else 0.0
        assert batch_std == pytest.approx(expected_std, abs=1e-5)
        assert running.count == seen.size
        assert running.mean == pytest.approx(seen.mean(), abs=1e-5)
        assert running.var == pytest.approx(seen.var(), abs=1e-5)
        assert running.std == pytest.approx(seen.std(ddof=1), abs=1e-5)
    restored = RunningMoments()
    restored.load_state_dict(running.state_dict())
    assert restored.state_dict() == running.state_dict() and restored.std == running.std


def test_process_scores():
    scores = t([0.3, -0.8, 0.1])
    assert_close(process_scores(scores, scale=2.0, clip=1.0), [0.6, -1.0, 0.2])
    assert_close(process_scores(scores), scores)
    # first batch [1, 2, 3]: running mean 2, std (ddof 1) 1 -> [-1, 0, 1]
    running = RunningMoments()
    normed = process_scores(t([1.0, 2.0, 3.0]), normalize=True, running=running)
    assert_close(normed, [-1.0, 0.0, 1.0])
    assert running.count == 3
    with pytest.raises(ValueError, match="RunningMoments"):
        process_scores(scores, normalize=True)
    with pytest.raises(ValueError, match="clip"):
        process_scores(scores, clip=0.0)


# --- KL controllers ----------------------------------------------------------------------


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    with pytest.raises(ConfigError, match=r"ppo\.kl_controller\.kl_coef"):
        FixedKLController(-1.0)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 1)  # 12 / 6 - 1 = 1 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 / 10000))  # 0.200004
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(3.0, 256)  # 3 / 6 - 1 = -0.5 -> clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))  # 0.198976
    ctl.update(6.6, 100)  # 6.6 / 6 - 1 = 0.1, inside the clip
    assert ctl.value == pytest.approx(0.198976 * (1 + 0.1 * 100 / 10000))
    restored = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


@pytest.mark.parametrize("target", [0.2, 0.4, 1.2])
def test_adaptive_kl_controller_reaches_its_target_in_a_closed_loop(target: float) -> None:
    """The controller in the loop with a stand-in policy whose KL drifts towards what the
    coefficient allows (the optimum's KL falls as beta grows: kl*(beta) = 0.6 / beta; a
    fifth of the way per step, with 20% multiplicative noise), at the demo's settings
    (init 1, horizon 128, 120 steps of 32 samples; on the demo itself: the measurement in
    conf/ppo/kl_controller/adaptive.yaml): the last third of the run averages within 15% of
    the target."""
    rng = np.random.default_rng(0)
    ctl = AdaptiveKLController(1.0, target=target, horizon=128)
    kl, seen = 0.0, []
    for _ in range(120):
        kl += 0.2 * (0.6 / ctl.value - kl)
        observed = kl * rng.lognormal(0.0, 0.2)
        ctl.update(observed, 32)
        seen.append(observed)
    assert abs(np.mean(seen[-40:]) / target - 1) < 0.15, (target, ctl.value, seen[-5:])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_kl_coef": -0.1, "target": 6.0, "horizon": 1.0}, "init_kl_coef"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 1.0}, "target"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": -5.0}, "horizon"),
    ],
)
def test_adaptive_kl_controller_validation(kwargs, field):
    with pytest.raises(ConfigError, match=rf"ppo\.kl_controller\.{field}"):
        AdaptiveKLController(**kwargs)


def test_adaptive_kl_controller_rejects_nan_kl():
    with pytest.raises(ValueError, match="nan"):
        AdaptiveKLController(0.1, 6.0, 10000).update(float("nan"), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunks_give_bit_identical_logprobs_and_entropy(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 50) * 3).to(dtype)  # 5 rows: the last chunk is short
    labels = torch.randint(0, 50, (5, 7))
    chunked = in_row_chunks(logprobs_from_logits, logits, labels, rows=2)
    assert chunked.dtype == torch.float32 and chunked.shape == (5, 7)
    assert torch.equal(chunked, logprobs_from_logits(logits, labels))
    entropy = in_row_chunks(entropy_from_logits, logits, rows=2)
    assert torch.equal(entropy, entropy_from_logits(logits))


# --- group advantages and loss aggregation -------------------------------------------------


def test_group_advantages_by_hand():

    scores = t([[1.0, 2.0, 3.0, 6.0], [0.7, 0.7, 0.7, 0.7]])
    # rloo: s_i - mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2
    assert_close(group_advantages(scores, "rloo")[0], [-8 / 3, -4 / 3, 0.0, 4.0])
    # dr_grpo: s - mean (mean 3)
    assert_close(group_advantages(scores, "dr_grpo")[0], [-2.0, -1.0, 0.0, 3.0])
    # grpo: (s - 3) / (unbiased std sqrt(14 / 3) + eps)
    std = math.sqrt(14 / 3)
    assert_close(group_advantages(scores, "grpo", eps=0.0)[0], [-2 / std, -1 / std, 0.0, 3 / std])
    # a group whose scores are all equal carries no signal: exactly 0 (not round-off)
    for estimator in ("rloo", "grpo", "dr_grpo"):
        assert torch.equal(
            group_advantages(scores, estimator)[1], torch.zeros(4, dtype=scores.dtype)
        )
    # 0.1 has no exact binary mean: (s - mean) alone would not be 0
    assert torch.equal(
        group_advantages(t([[0.1] * 3]), "grpo"), torch.zeros(1, 3, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(t([[1.0], [2.0]]), "rloo")


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_aggregate_loss_by_hand_and_parts_add_up(mode: str) -> None:
    from detox_exp.ppo.core import aggregate_loss

    loss = t([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    expected = {
        "token-mean": 21.0 / 6,  # (1 + 2 + 3 + 4 + 5 + 6) / 6 tokens
        "seq-mean-token-mean": (2.0 + 4.0 + 5.5) / 3,
        "seq-mean-token-sum": (6.0 + 4.0 + 11.0) / 3,
        "seq-mean-token-sum-norm": 21.0 / (3 * 8),  # horizon 8
    }[mode]
    whole = aggregate_loss(loss, mask, mode, horizon=8)
    assert_close(whole, expected)
    # split into parts (micro-batches / processes) with the whole's counts: the parts add up
    parts = [
        aggregate_loss(loss[rows], mask[rows], mode, num_seqs=3, num_tokens=6, horizon=8)
        for rows in ([0, 1], [2])
    ]
    assert_close(sum(parts), expected)
    if mode == "token-mean":  # a mean of the parts' own means differs: (2.5 + 5.5) / 2 = 4
        own = [aggregate_loss(loss[rows], mask[rows], mode) for rows in ([0, 1], [2])]
        assert_close(sum(own) / 2, 4.0)
