"""The KL penalty's EXPECTED GRADIENT, computed exactly on a tabular softmax policy.

One prompt, one token, six actions: p = softmax(theta) is the policy, q the reference. For
every way the project can put a KL term in the objective (a detached per-token reward with
ppo.kl_estimator, the group estimators' sequence reward, or a loss term with ppo.kl_loss_*),
the expected gradient of the project's own loss is the p-weighted sum over all actions (or
all groups of actions) of each one's gradient, with the score set to 0. It must equal the
gradient of the divergence the config comments promise.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from detox_exp.kl import kl_loss
from detox_exp.ppo import advantages as adv
from detox_exp.ppo import core

V = 6
OFFSETS = (0.1, 0.3, 1.0)


def tabular(offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy logits theta with grad, reference logits), ``offset`` apart."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(V, generator=gen, dtype=torch.float64)
    direction = torch.randn(V, generator=gen, dtype=torch.float64)
    theta = (ref + offset * direction / direction.std()).requires_grad_(True)
    return theta, ref


def kl_pq(theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    logp, logq = theta.log_softmax(-1), ref.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum()


def kl_qp(theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    logp, logq = theta.log_softmax(-1), ref.log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum()


def true_gradient(divergence, theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(divergence(theta, ref), theta)[0]


def one_token(theta: torch.Tensor, ref: torch.Tensor, action: int):
    """[1, 1] log-probs of ``action`` (with grad), its reference log-prob and the logits."""
    logp = theta.log_softmax(-1)[action].reshape(1, 1)
    ref_logp = ref.log_softmax(-1)[action].reshape(1, 1)
    return logp, ref_logp, theta.detach().reshape(1, 1, V), ref.reshape(1, 1, V)


def expected_gradient(theta: torch.Tensor, loss_of_action) -> torch.Tensor:
    """sum_a p(a) grad loss(a): the exact expectation over the one sampled token."""
    p = theta.detach().softmax(-1)
    total = torch.zeros(V, dtype=torch.float64)
    for action in range(V):
        total += p[action] * torch.autograd.grad(loss_of_action(action), theta)[0]
    return total


def reward_gradient(theta: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_a~p[grad of the PPO loss] with the KL as a detached reward (GAE, zero values)."""
    mask = torch.ones(1, 1)

    def loss(action: int) -> torch.Tensor:
        logp, ref_logp, logits, ref_logits = one_token(theta, ref, action)
        rewards, _ = adv.compute_rewards(
            torch.zeros(1), logp.detach(), ref_logp, mask, 1.0, estimator, logits, ref_logits
        )
        advantages, _ = adv.compute_gae(rewards, torch.zeros(1, 1), mask, gamma=1.0, lam=0.95)
        return core.policy_loss(logp, logp.detach(), advantages, mask, cliprange=0.2)[0]

    return expected_gradient(theta, loss)


def loss_term_gradient(theta: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_a~p[grad of the KL loss term] (ppo.kl_loss_coef = 1, token-mean)."""

    def loss(action: int) -> torch.Tensor:
        logp, ref_logp, _, ref_logits = one_token(theta, ref, action)
        logits = theta.reshape(1, 1, V)  # with grad, for `full`
        terms = kl_loss(logp, ref_logp, estimator, logits, ref_logits)
        return core.aggregate_loss(terms, torch.ones(1, 1))

    return expected_gradient(theta, loss)


def group_gradient(theta: torch.Tensor, ref: torch.Tensor, estimator: str, k: int = 2):
    """E over all k-tuples of actions of the loss gradient with group advantages of the
    sequence reward -KL (k1), as the critic-free trainer computes them."""
    p = theta.detach().softmax(-1)
    total = torch.zeros(V, dtype=torch.float64)
    mask = torch.ones(k, 1)
    for actions in itertools.product(range(V), repeat=k):
        parts = [one_token(theta, ref, a) for a in actions]
        logp = torch.cat([part[0] for part in parts])
        ref_logp = torch.cat([part[1] for part in parts])
        rewards, _ = adv.compute_rewards(torch.zeros(k), logp.detach(), ref_logp, mask, 1.0)
        advantages = adv.group_advantages(rewards.sum(1).view(1, k), estimator).view(k, 1)
        loss, _ = core.policy_loss(logp, logp.detach(), advantages, mask, cliprange=0.2)
        weight = math.prod(p[a].item() for a in actions)
        total += weight * torch.autograd.grad(loss, theta)[0]
    return total


def compare(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(cosine, norm ratio) of an expected gradient against the true one."""
    cosine = torch.nn.functional.cosine_similarity(estimate, truth, dim=0).item()
    return cosine, (estimate.norm() / truth.norm()).item()


@pytest.mark.parametrize("offset", OFFSETS)
def test_default_reward_penalty_follows_grad_kl(offset: float) -> None:
    theta, ref = tabular(offset)
    truth = true_gradient(kl_pq, theta, ref)
    cosine, ratio = compare(reward_gradient(theta, ref, "k1"), truth)
    assert cosine > 0.99 and abs(ratio - 1) < 0.05, (cosine, ratio)
    for estimator in ("rloo", "dr_grpo"):  # unbiased group baselines keep the gradient
        cosine, ratio = compare(group_gradient(theta, ref, estimator), truth)
        scale = 1.0 if estimator == "rloo" else 0.5  # dr_grpo: s - mean = (k - 1) / k of rloo
        assert cosine > 0.99 and abs(ratio - scale) < 0.05 * scale, (estimator, cosine, ratio)


def test_k3_and_k2_as_rewards_do_not_follow_grad_kl() -> None:
    """The estimators that are right for the VALUE are wrong in the reward (the check above
    can fail): k3's expected gradient is grad KL(p||q) - grad KL(q||p)."""
    for offset in OFFSETS:
        theta, ref = tabular(offset)
        truth = true_gradient(kl_pq, theta, ref)
        k3 = reward_gradient(theta, ref, "k3")
        expected = truth - true_gradient(kl_qp, theta, ref)
        torch.testing.assert_close(k3, expected, rtol=1e-6, atol=1e-9)
        for estimator in ("k3", "k2"):
            cosine, ratio = compare(reward_gradient(theta, ref, estimator), truth)
            assert not (cosine > 0.99 and abs(ratio - 1) < 0.05), (estimator, offset)
            if offset < 1.0:  # near the reference most of the pull toward it is gone
                assert ratio < 0.5, (estimator, offset, ratio)
    # `full` in the reward carries no gradient for the sampled token itself
    theta, ref = tabular(1.0)
    cosine, ratio = compare(reward_gradient(theta, ref, "full"), true_gradient(kl_pq, theta, ref))
    assert not (cosine > 0.99 and abs(ratio - 1) < 0.05)


@pytest.mark.parametrize("offset", OFFSETS)
def test_kl_loss_terms_follow_the_documented_divergence(offset: float) -> None:
    theta, ref = tabular(offset)
    for estimator, divergence in (("k2", kl_pq), ("k3", kl_qp), ("full", kl_pq)):
        cosine, ratio = compare(
            loss_term_gradient(theta, ref, estimator), true_gradient(divergence, theta, ref)
        )
        assert cosine > 0.999 and abs(ratio - 1) < 1e-6, (estimator, cosine, ratio)
    with pytest.raises(ValueError, match="kl_loss_estimator"):
        kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), "k1")  # expected gradient 0


def test_kl_only_objective_moves_the_policy_to_the_reference() -> None:
    theta, ref = tabular(1.0)
    kls = []
    for _ in range(100):
        kls.append(kl_pq(theta, ref).item())
        step = reward_gradient(theta, ref, "k1")
        with torch.no_grad():
            theta -= 2.0 * step
    assert all(b < a for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.01 * kls[0]
