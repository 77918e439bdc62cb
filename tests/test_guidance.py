"""The value-guidance math (detox_exp.guidance) on an exact toy: a categorical "language" of
at most 3 tokens from {a, b, EOS} whose reference and reward make every sequence, V(s, a)
and the optimum pi* enumerable."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from detox_exp.guidance import (
    distill_loss,
    guided_logits,
    log_value,
    reward_atoms,
    scorer_loss,
    token_divergence,
    two_hot,
)

VOCAB, EOS, MAX_LEN = 3, 2, 3
ATOMS = torch.tensor([-3.0, -1.0, -0.25, 0.0])


def prefixes() -> list[tuple[int, ...]]:
    """Every prefix a sequence can continue from (no EOS in it, shorter than MAX_LEN)."""
    return [p for n in range(MAX_LEN) for p in itertools.product(range(EOS), repeat=n)]


def sequences() -> list[tuple[int, ...]]:
    """Every complete sequence: ends with EOS, or reaches MAX_LEN tokens."""
    out = []
    for p in prefixes():
        for a in range(VOCAB):
            y = (*p, a)
            if a == EOS or len(y) == MAX_LEN:
                out.append(y)
    return out


class Toy:
    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ref_logits = {p: torch.randn(VOCAB, generator=g) * 1.5 for p in prefixes()}
        self.reward = {
            y: ATOMS[int(torch.randint(len(ATOMS), (1,), generator=g))] for y in sequences()
        }

    def logp(self, logits: dict, y: tuple[int, ...]) -> torch.Tensor:
        return sum(logits[y[:t]].log_softmax(-1)[y[t]] for t in range(len(y)))

    def completions(self, s: tuple[int, ...], a: int) -> list[tuple[int, ...]]:
        return [y for y in sequences() if y[: len(s) + 1] == (*s, a)]

    def atom_probs(self, s: tuple[int, ...], a: int) -> torch.Tensor:
        """P_ref(r = atom_b | s, a) [K], by enumeration."""
        p = torch.zeros(len(ATOMS))
        ys = self.completions(s, a)
        weights = torch.stack(
            [
                (self.logp(self.ref_logits, y) - self.logp(self.ref_logits, (*s, a))).exp()
                for y in ys
            ]
        )
        for w, y in zip(weights, ys):
            p[int((self.reward[y] == ATOMS).nonzero())] += w
        return p

    def value(self, s: tuple[int, ...], a: int, beta: float) -> torch.Tensor:
        ys = self.completions(s, a)
        return sum(
            (self.logp(self.ref_logits, y) - self.logp(self.ref_logits, (*s, a))).exp()
            * torch.exp(self.reward[y] / beta)
            for y in ys
        )


@pytest.mark.parametrize("beta", [0.3, 1.0, 4.0])
def test_with_the_exact_scorer_guided_decoding_is_the_optimum(beta: float) -> None:
    toy = Toy()
    teacher = {}
    for s in prefixes():
        atom_logits = torch.stack(
            [toy.atom_probs(s, a).clamp_min(1e-30).log() for a in range(VOCAB)]
        )
        lv = log_value(atom_logits, ATOMS, beta)
        exact = torch.stack([toy.value(s, a, beta) for a in range(VOCAB)]).log()
        torch.testing.assert_close(lv, exact, atol=1e-5, rtol=1e-5)
        teacher[s] = guided_logits(toy.ref_logits[s], lv)
    ys = sequences()
    log_tilt = torch.stack([toy.logp(toy.ref_logits, y) + toy.reward[y] / beta for y in ys])
    optimum = (log_tilt - torch.logsumexp(log_tilt, 0)).exp()
    guided = torch.stack([toy.logp(teacher, y) for y in ys]).exp()
    torch.testing.assert_close(guided, optimum, atol=1e-6, rtol=1e-5)
    assert guided.sum().item() == pytest.approx(1.0, abs=1e-6)


def expected_scorer_loss(toy: Toy, theta: dict) -> torch.Tensor:
    """E_{y ~ ref}[sum_t CE(theta(s_t, y_t), two_hot(r(y)))], by enumeration."""
    total = torch.zeros(())
    for y in sequences():
        w = toy.logp(toy.ref_logits, y).exp()
        target = two_hot(toy.reward[y].reshape(1), ATOMS)
        for t in range(len(y)):
            total = total + w * scorer_loss(theta[(y[:t], y[t])][None], target)
    return total


def test_the_scorer_loss_is_minimised_by_the_true_conditional_distribution() -> None:
    toy = Toy(seed=1)
    pairs = [(s, a) for s in prefixes() for a in range(VOCAB)]
    truth = {sa: toy.atom_probs(*sa).clamp_min(1e-12).log().requires_grad_() for sa in pairs}
    loss = expected_scorer_loss(toy, truth)
    loss.backward()
    for sa in pairs:  # CE's gradient is P(s, a) * (softmax(theta) - E[target | s, a]) = 0
        assert truth[sa].grad.abs().max() < 1e-6, sa
    # and it is the minimum: any move away costs (the loss is convex in the logits)
    g = torch.Generator().manual_seed(0)
    moved = {
        sa: (v.detach() + 0.3 * torch.randn(len(ATOMS), generator=g)) for sa, v in truth.items()
    }
    assert expected_scorer_loss(toy, moved) > loss + 1e-4


def test_two_hot_keeps_the_mean_and_reward_atoms_span_the_data() -> None:
    atoms = torch.tensor([-2.0, -1.0, 0.0])
    r = torch.tensor([-2.0, -1.5, -0.25, 0.0, 5.0, -7.0])
    target = two_hot(r, atoms)
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    torch.testing.assert_close(target @ atoms, r.clamp(-2, 0))
    data = torch.tensor([0.0, -0.01, -0.02, -0.03, -5.0])
    grid = reward_atoms(data, 4)
    assert grid[0] == -5.0 and grid[-1] == 0.0 and torch.all(grid[1:] > grid[:-1])


def test_the_distillation_gradient_is_the_sequence_kl_gradient() -> None:
    """On the teacher's samples, the expected per-token full-vocabulary forward KL has the
    gradient of KL(teacher || student) over whole sequences."""
    toy = Toy(seed=2)
    beta = 0.5
    teacher = {}
    for s in prefixes():
        lv = torch.stack([toy.value(s, a, beta) for a in range(VOCAB)]).log()
        teacher[s] = guided_logits(toy.ref_logits[s], lv)
    g = torch.Generator().manual_seed(3)
    student = {s: torch.randn(VOCAB, generator=g).requires_grad_() for s in prefixes()}
    ys = sequences()
    seq_kl = sum(
        toy.logp(teacher, y).exp() * (toy.logp(teacher, y) - toy.logp(student, y)) for y in ys
    )
    seq_grads = torch.autograd.grad(seq_kl, list(student.values()))
    token_loss = torch.zeros(())
    for y in ys:
        s_logits = torch.stack([student[y[:t]] for t in range(len(y))])[None]
        t_logits = torch.stack([teacher[y[:t]] for t in range(len(y))])[None]
        mask = torch.ones(1, len(y))
        token_loss = token_loss + toy.logp(teacher, y).exp() * distill_loss(
            s_logits, t_logits, mask
        )
    token_grads = torch.autograd.grad(token_loss, list(student.values()))
    for a, b in zip(seq_grads, token_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(token_loss, seq_kl, atol=1e-6, rtol=1e-5)


def test_token_divergence_directions() -> None:
    s = torch.tensor([[0.0, 1.0, -1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0]])
    ps, pt = s.softmax(-1), t.softmax(-1)
    forward = (pt * (pt.log() - ps.log())).sum()
    reverse = (ps * (ps.log() - pt.log())).sum()
    assert token_divergence(s, t, "forward").item() == pytest.approx(forward.item(), rel=1e-6)
    assert token_divergence(s, t, "reverse").item() == pytest.approx(reverse.item(), rel=1e-6)
    assert token_divergence(s, s).item() == pytest.approx(0.0, abs=1e-7)
    assert not math.isnan(token_divergence(s, t).item())
