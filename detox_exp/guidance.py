"""Value guidance for the KL-regularised objective (pure torch math).

The optimum of ``E_pi[r] - beta KL(pi || ref)`` is ``pi*(y) ∝ ref(y) exp(r(y) / beta)``, and
it factorises per token exactly:

    pi*(a | s) = ref(a | s) V(s, a) / V(s),   V(s, a) = E_ref[exp(r / beta) | s, a],

with ``V(s) = sum_a ref(a | s) V(s, a)`` (the product telescopes to ``exp(r(y) / beta) /
V(start)``). The prefix scorer learns, per next token, the DISTRIBUTION of the completion's
reward under the reference over a fixed grid of reward atoms (Q#'s distributional form:
one fit serves every beta), by cross-entropy against the reward of reference rollouts
projected onto the two nearest atoms; ``V_beta(s, a) = sum_b p_b(s, a) exp(atom_b / beta)``.
Guided decoding samples ``ref(a | s) V(s, a)``; distillation moves the policy to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detox_exp.kl import categorical_kl


def reward_atoms(rewards: Tensor, n_atoms: int) -> Tensor:
    """A grid of ``n_atoms`` reward values at evenly spaced quantiles of the observed
    ``rewards`` (so the atoms sit where the user's classifier puts its scores: near 0 and
    dense for a diffuse real classifier, at both ends for a confident one), deduplicated and
    sorted, always including the minimum and maximum."""
    if n_atoms < 2:
        raise ValueError(f"n_atoms must be >= 2, got {n_atoms}")
    q = torch.linspace(0, 1, n_atoms, dtype=torch.float64)
    atoms = torch.quantile(rewards.double().flatten(), q)
    return torch.unique(atoms).float()


def two_hot(rewards: Tensor, atoms: Tensor) -> Tensor:
    """Each reward [N] as a distribution [N, K] over the atoms: the weight split between the
    two neighbouring atoms so that its mean is the reward (clamped to the grid's range)."""
    r = rewards.float().clamp(atoms[0], atoms[-1])
    upper = torch.searchsorted(atoms, r, right=False).clamp(1, len(atoms) - 1)
    lower = upper - 1
    gap = atoms[upper] - atoms[lower]
    w_upper = ((r - atoms[lower]) / gap).clamp(0, 1)
    target = torch.zeros(len(r), len(atoms), dtype=torch.float32, device=r.device)
    target.scatter_add_(1, lower[:, None], (1 - w_upper)[:, None])
    target.scatter_add_(1, upper[:, None], w_upper[:, None])
    return target


def scorer_loss(atom_logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of predicted atom distributions [N, K] (logits) against targets [N, K]
    (two-hot), mean over rows. Its minimiser, per (prefix, token), is the
    conditional expectation of the target, i.e. the reward's conditional distribution on
    the atoms."""
    return -(target * atom_logits.log_softmax(-1)).sum(-1).mean()


def log_value(atom_logits: Tensor, atoms: Tensor, beta: float, dim: int = -1) -> Tensor:
    """``log V(s, a) = log sum_b p_b exp(atom_b / beta)`` from atom logits (atoms along
    ``dim``), as ``logsumexp(z + atoms / beta) - logsumexp(z)``: stable in log space
    (exp(r / beta) spans many orders of magnitude at small beta) and without materialising
    the log-probabilities."""
    shape = [1] * atom_logits.dim()
    shape[dim] = len(atoms)
    tilt = (atoms / beta).view(shape)
    return torch.logsumexp(atom_logits + tilt, dim=dim) - torch.logsumexp(atom_logits, dim=dim)


def fill_tail(
    candidate_values: Tensor, candidate_log_ref: Tensor, index: Tensor, vocab: int
) -> Tensor:
    """``log V`` [N, V] from its values at C candidate tokens: ``candidate_values`` [N, C] at
    the token ids ``index`` [N, C], whose reference log-probabilities are
    ``candidate_log_ref`` [N, C]. Every other token gets the candidates' reference-weighted
    mean value, ``log(sum_c ref(c) V(c) / sum_c ref(c))``: the guide reweights the candidates
    among themselves exactly and leaves the rest of the vocabulary its reference share. With
    every token a candidate this is the full ``log V``; the error is confined to the
    reference's mass outside the candidates (FUDGE's preconditioning on the base model's top
    tokens, Yang & Klein 2021, without cutting the tail)."""
    tail = torch.logsumexp(candidate_log_ref + candidate_values, -1) - torch.logsumexp(
        candidate_log_ref, -1
    )
    out = tail.unsqueeze(-1).repeat(1, vocab)
    return out.scatter_(1, index, candidate_values)


def guided_logits(ref_logits: Tensor, log_values: Tensor) -> Tensor:
    """Unnormalised log-probabilities of ``pi_g(a | s) ∝ ref(a | s) V(s, a)`` [..., V] (a
    constant per prefix, e.g. the max of log V, does not change the distribution)."""
    return ref_logits.float().log_softmax(-1) + log_values


def token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, direction: str = "forward"
) -> Tensor:
    """Per-token divergence over the full vocabulary [..., V] -> [...]:
    ``forward`` KL(teacher || student), ``reverse`` KL(student || teacher)."""
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.float().log_softmax(-1)
    if direction == "forward":
        return categorical_kl(log_t, log_s)
    if direction == "reverse":
        return categorical_kl(log_s, log_t)
    raise ValueError(f"direction must be forward or reverse, got {direction!r}")


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, direction: str = "forward"
) -> Tensor:
    """The distillation loss of a batch of prefixes [B, T, V]: the per-token full-vocabulary
    divergence summed over each response's tokens (``mask`` [B, T]) and averaged over
    responses. With ``forward`` on the teacher's own samples, its expected gradient is
    exactly the gradient of the sequence-level KL(teacher || student)."""
    per_token = token_divergence(student_logits, teacher_logits.detach(), direction)
    return (per_token * mask).sum() / mask.shape[0]
