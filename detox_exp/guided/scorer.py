"""The prefix scorer: per next token, the distribution of the completion's reward under the
reference, read from the frozen reference decoder's last state (:mod:`detox_exp.guidance`).

Form: atom logits, for the K reward atoms b,

    z_b(s, a) = (W h_s)_b · e_a / sqrt(d) + g_b (u_a · h_s) + c_{a, b} + prior_b,

where ``h_s`` is the reference decoder's last state at prefix s (after an optional MLP) and
``e_a`` the model's frozen output embedding of token a. ``W`` [K d, d] reads the state
against every token's embedding; ``u_a`` [V, d] is a free direction per token (the linear
per-token head of a scalar value, which tells apart tokens the embedding puts together),
spread over the atoms by ``g`` [K]; ``c`` [V, K] is a per-token bias. One matrix product
per term scores the whole vocabulary at once (what guided decoding needs); the parameters
grow with K d^2 + V (d + K), not V d K. It starts as the constant predictor (W = 0, u = 0,
c = 0, prior = the data's atom frequencies), so an untrained scorer guides nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from detox_exp.guidance import fill_tail, log_value


class PrefixScorer(nn.Module):
    """Atom logits per (prefix state, token); see the module docstring."""

    def __init__(
        self, embedding: Tensor, atoms: Tensor, prior: Tensor, hidden_size: int = 0
    ) -> None:
        super().__init__()
        vocab, d = embedding.shape
        self.register_buffer("embedding", embedding.detach().float().clone())
        self.register_buffer("atoms", atoms.float().clone())
        k = len(atoms)
        self.mlp = (
            nn.Sequential(nn.Linear(d, hidden_size), nn.GELU(), nn.Linear(hidden_size, d))
            if hidden_size
            else None
        )
        self.proj = nn.Linear(d, k * d, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.token_dir = nn.Parameter(torch.zeros(vocab, d))
        self.atom_gain = nn.Parameter(torch.linspace(-1, 1, k))
        self.token_bias = nn.Parameter(torch.zeros(vocab, k))
        self.prior = nn.Parameter(prior.float().clamp_min(1e-6).log())
        self.d, self.k = d, k

    def _features(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(the state after the MLP [..., d], its per-atom queries [..., K, d])."""
        h = hidden.float()
        if self.mlp is not None:
            h = h + self.mlp(h)
        return h, self.proj(h).view(*h.shape[:-1], self.k, self.d) / math.sqrt(self.d)

    def atom_logits(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Atom logits [..., K] of the realised ``tokens`` [...] after states [..., d]."""
        h, q = self._features(hidden)
        e = self.embedding[tokens]  # [..., d]
        direction = (self.token_dir[tokens] * h).sum(-1, keepdim=True)  # [..., 1]
        return (
            (q * e.unsqueeze(-2)).sum(-1)
            + direction * self.atom_gain
            + self.token_bias[tokens]
            + self.prior
        )

    def all_atom_logits(self, hidden: Tensor) -> Tensor:
        """Atom logits [N, K, V] of every token after states [N, d] (atoms before tokens:
        the layout of the one matrix product below; :meth:`atom_logits` computes the same
        numbers term by term, tests/test_guided.py)."""
        h, q = self._features(hidden)  # [N, d], [N, K, d]
        n = h.shape[0]
        out = torch.matmul(q.reshape(n * self.k, self.d), self.embedding.T).view(n, self.k, -1)
        # the free direction is one product for all atoms ([N, V], spread by g): K times
        # cheaper than a K-row product, the product above's size
        direction = torch.matmul(h, self.token_dir.T)  # [N, V]
        out.addcmul_(self.atom_gain[None, :, None], direction[:, None, :])
        return out.add_((self.token_bias + self.prior).T)  # [K, V] per-token biases

    def log_values(self, hidden: Tensor, beta: float, chunk_elements: int = 2**25) -> Tensor:
        """``log V_beta(s, a)`` [..., V] for states [..., d], in chunks of rows so that the
        [rows, K, V] intermediate stays under ``chunk_elements`` floats."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = max(1, chunk_elements // (self.embedding.shape[0] * self.k))
        parts = [
            log_value(self.all_atom_logits(flat[i : i + rows]), self.atoms, beta, dim=1)
            for i in range(0, len(flat), rows)
        ]
        return torch.cat(parts).view(*hidden.shape[:-1], -1)

    def candidate_log_values(
        self,
        hidden: Tensor,
        ref_logits: Tensor,
        beta: float,
        candidates: int,
        chunk_elements: int = 2**21,
        scale: float = 1.0,
    ) -> Tensor:
        """``log V_beta(s, a)`` [..., V] scored at the reference's ``candidates`` most likely
        next tokens only (the others: :func:`~detox_exp.guidance.fill_tail`), for states
        [..., d] and the reference's logits [..., V]: a [K, d] x [d, C] product per state
        instead of [K, d] x [d, V]. The candidates' embedding rows are gathered for a chunk
        of states at a time, under ``chunk_elements`` floats per table (one [rows x C, d]
        gather for FLAN-T5-base's 64 samples is 39 MB, and fresh buffers that size are paged
        in again on every call: ``benchmarks/micro.py``). ``scale``: the exponent on ``V``
        (:mod:`detox_exp.guided.calibrate`), applied before the tail is filled in, so that
        the tail keeps its reference share under the scaled guide too."""
        vocab = ref_logits.shape[-1]
        h, q = self._features(hidden.reshape(-1, hidden.shape[-1]))  # [N, d], [N, K, d]
        log_ref, index = ref_logits.reshape(-1, vocab).float().log_softmax(-1).topk(candidates)
        rows = max(1, chunk_elements // (candidates * self.d))
        parts = [
            self._candidates(h[i : i + rows], q[i : i + rows], index[i : i + rows], beta)
            for i in range(0, len(h), rows)
        ]
        values = fill_tail(scale * torch.cat(parts), log_ref, index, vocab)
        return values.view(*ref_logits.shape)

    def _candidates(self, h: Tensor, q: Tensor, index: Tensor, beta: float) -> Tensor:
        """``log V`` [n, C] of the tokens ``index`` [n, C] after states with features ``h``
        [n, d], ``q`` [n, K, d]."""
        flat = index.flatten()  # index_select: a plain gather, far cheaper than x[index]

        def rows(table: Tensor) -> Tensor:
            return table.index_select(0, flat).view(*index.shape, -1)

        z = torch.einsum("nkd,ncd->nkc", q, rows(self.embedding))
        direction = torch.einsum("nd,ncd->nc", h, rows(self.token_dir))
        z = z + self.atom_gain[None, :, None] * direction[:, None, :]
        z = z + (rows(self.token_bias) + self.prior).transpose(1, 2)  # [n, K, C]
        return log_value(z, self.atoms, beta, dim=1)


class Guide:
    """The teacher's guidance, ``scale * log V_beta(s, a)`` [..., V] of a frozen
    :class:`PrefixScorer` for decoder states [..., d] and the reference's logits [..., V]
    (the callable that :func:`detox_exp.generation.sample_responses` takes): over the whole
    vocabulary (``candidates`` 0, exact) or the reference's ``candidates`` most likely tokens;
    ``scale``: the exponent on ``V`` (:mod:`detox_exp.guided.calibrate`; 1: the scorer's)."""

    def __init__(
        self, scorer: PrefixScorer, beta: float, candidates: int = 0, scale: float = 1.0
    ) -> None:
        self.scorer, self.beta, self.candidates, self.scale = scorer, beta, candidates, scale

    def __call__(self, hidden: Tensor, ref_logits: Tensor) -> Tensor:
        if 0 < self.candidates < ref_logits.shape[-1]:
            return self.scorer.candidate_log_values(
                hidden, ref_logits, self.beta, self.candidates, scale=self.scale
            )
        return self.scale * self.scorer.log_values(hidden, self.beta)


def save_guide(guide: Guide, path: Path) -> None:
    """Write ``guide`` (its scorer, beta and candidates) to ``path`` (atomically: a crash
    leaves the previous file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scorer = guide.scorer
    hidden = 0 if scorer.mlp is None else scorer.mlp[0].out_features
    saved = {
        "state": scorer.state_dict(),
        "hidden_size": hidden,
        "beta": guide.beta,
        "candidates": guide.candidates,
        "scale": guide.scale,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)


def load_guide(path: Path, device: torch.device | str = "cpu") -> Guide:
    """The :class:`Guide` written by :func:`save_guide`, its scorer frozen (a file without
    ``candidates`` guides over every token, one without ``scale`` at scale 1, as it was
    trained)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved["state"]
    scorer = PrefixScorer(
        state["embedding"], state["atoms"], state["prior"].exp(), int(saved["hidden_size"])
    )
    scorer.load_state_dict(state)
    scorer = scorer.to(device).eval().requires_grad_(False)
    candidates, scale = int(saved.get("candidates", 0)), float(saved.get("scale", 1.0))
    return Guide(scorer, float(saved["beta"]), candidates, scale)
