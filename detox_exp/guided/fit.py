"""The prefix scorer's data and fit (``algorithm=guided``, before distillation step 1).

Rows: one per response token (EOS included) of reference rollouts on train prompts, each
the reference decoder's state before the token, the token, and the response's reward. The
prompts the frontier stage sampled come with its scored draws, tokenised again; the rest are
sampled fresh. The fit: reward atoms and prior from the rollouts' rewards, then Adam on the
cross-entropy against each reward's two-hot projection (:mod:`detox_exp.guidance`), and the
calibration on held-out prompts against the constant predictor (``guided/scorer/*``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detox_exp import metric_names as M
from detox_exp.generation import decode, pad_queries, response_mask
from detox_exp.guidance import reward_atoms, scorer_loss, two_hot
from detox_exp.guided.scorer import PrefixScorer
from detox_exp.utils import progress

log = logging.getLogger(__name__)

ROW_KEYS = ("states", "tokens")  # the scorer's inputs per response token


@dataclass
class Rollouts:
    """Where the scorer's rows come from: ``sample(indices, generator, k, "reference",
    states=list)`` -> (query, query mask, responses, response mask), appending the decoder's
    last state of every step to the list; ``reference_pass(query, query_mask, responses,
    k)`` -> (logits, last decoder states) of drawn texts; ``queries(indices)`` -> (query, mask),
    the run's ``reward`` scorer and ``tokenizer``, ``max_new_tokens`` and ``device``;
    ``draws``: (texts [P][K], rewards [P, K]) of train prompts 0 .. P - 1 from the reference
    with the run's generation settings, scored (the frontier stage's)."""

    sample: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    reference_pass: Callable[..., tuple[Tensor, Tensor]]
    queries: Callable[[list[int]], tuple[Tensor, Tensor]]
    reward: Any
    tokenizer: Any
    max_new_tokens: int
    device: torch.device
    draws: tuple[list[list[str]], Tensor] | None = None

    def drawn(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(query, query mask, responses, response mask, rewards) of ``indices`` from
        ``draws``: the texts tokenised again as the decoder reads them (EOS last; one cut at
        ``max_new_tokens`` has none, as a sampled one)."""
        texts, rewards = self.draws
        ids = self.tokenizer([t for i in indices for t in texts[i]])["input_ids"]
        cut = [row[: self.max_new_tokens] for row in ids]
        response, present = pad_queries(cut, self.tokenizer.pad_token_id, self.device)
        mask = response_mask(response, self.tokenizer.eos_token_id) * present
        query, query_mask = self.queries(indices)
        return query, query_mask, response, mask, rewards[indices].flatten().to(self.device)

    def token_rows(
        self,
        indices: list[int],
        generator: torch.Generator,
        k: int,
        per_batch: int,
        drawn: bool = False,
    ) -> dict[str, Tensor]:
        """k reference samples of each of ``indices`` (``drawn``: their ``draws``), scored,
        ``per_batch`` prompts at a time, as one row per response token: the reference
        decoder's state before it ``states`` [N, d], the token ``tokens`` [N], and the
        response's reward ``rewards`` [N]; plus per response its reward ``sequence_rewards``,
        its prompt ``prompts`` and its number of tokens ``lengths`` (a response's rows are
        consecutive, and a prompt's responses)."""
        if drawn:
            k = self.draws[1].shape[1]
        keys = ("states", "tokens", "rewards", "sequence_rewards", "prompts", "lengths")
        out: dict[str, list] = {key: [] for key in keys}
        bar = progress(total=len(indices), desc="scorer rollouts", unit="prompt")
        for start in range(0, len(indices), per_batch):
            chunk = indices[start : start + per_batch]
            if drawn:  # text only: one reference pass gives the states
                query, query_mask, response, mask, reward = self.drawn(chunk)
                _, states = self.reference_pass(query, query_mask, response, k)
            else:  # the states come from sampling
                steps: list[Tensor] = []
                query, query_mask, response, mask = self.sample(
                    chunk, generator, k, "reference", states=steps
                )
                states = torch.stack(steps, 1).float()
                texts = decode(self.tokenizer, response)
                reward = self.reward.score(texts).reward.to(self.device)
            keep = mask.bool()
            out["states"].append(states[keep])
            out["tokens"].append(response[keep])
            out["rewards"].append(reward[:, None].expand_as(mask)[keep])
            out["sequence_rewards"].append(reward)
            out["prompts"].append(torch.tensor(chunk, device=mask.device).repeat_interleave(k))
            out["lengths"].append(keep.sum(1))
            bar.update(len(chunk))
        bar.close()
        return {key: torch.cat(value) for key, value in out.items()}


@dataclass
class ReferenceSamples:
    """The scorer's training rollouts as responses (``distill.prefixes=reference`` distils on
    them): per response its prompt ``prompts`` [n] and number of tokens ``lengths`` [n]
    (EOS included), and every response's tokens one after the other ``tokens``
    [sum(lengths)]; a prompt's responses are consecutive."""

    prompts: Tensor
    lengths: Tensor
    tokens: Tensor

    @classmethod
    def of(cls, rows: Mapping[str, Tensor]) -> ReferenceSamples:
        """The responses of :meth:`Rollouts.token_rows`' rows (on the CPU)."""
        return cls(*(rows[key].cpu() for key in ("prompts", "lengths", "tokens")))

    def groups(self, k: int) -> list[list[int]]:
        """The responses in groups of k of one prompt each (a prompt's responses in
        consecutive runs of k; a remainder short of k is left out)."""
        out, start = [], 0
        for _, run in itertools.groupby(self.prompts.tolist()):
            end = start + len(list(run))
            out += [list(range(i, i + k)) for i in range(start, end - k + 1, k)]
            start = end
        return out

    def responses(
        self, rows: list[int], pad_token_id: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(responses [B, T] padded with ``pad_token_id``, their mask [B, T]) of ``rows``."""
        offsets = torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])
        cut = [self.tokens[offsets[r] : offsets[r + 1]].tolist() for r in rows]
        return pad_queries(cut, pad_token_id, device)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"prompts": self.prompts, "lengths": self.lengths, "tokens": self.tokens}, path)

    @classmethod
    def load(cls, path: Path) -> ReferenceSamples:
        return cls(**torch.load(path, weights_only=True))


def _rows(
    rollouts: Rollouts,
    s: Mapping[str, Any],
    num_prompts: int,
    gen: torch.Generator,
    stream: torch.Generator,
) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """(the training rows, the held-out rows, how many of the training rollouts are the
    frontier's draws): ``rollout_prompts`` train prompts in an order drawn from ``gen``, the
    drawn ones first, a ``heldout_fraction`` of the fresh ones held out."""
    order = torch.randperm(num_prompts, generator=gen).tolist()
    total = min(s["rollout_prompts"], num_prompts)
    n_heldout = max(1, int(total * s["heldout_fraction"]))
    n_drawn = 0 if rollouts.draws is None else len(rollouts.draws[0])
    drawn = list(range(min(n_drawn, total - n_heldout)))
    fresh = [i for i in order if i >= len(drawn)][: total - len(drawn)]
    k, per = s["rollout_samples"], max(1, s["batch_prompts"])
    parts = (
        [rollouts.token_rows(fresh[:-n_heldout], stream, k, per)] if len(fresh) > n_heldout else []
    )
    reused = 0
    if drawn:
        parts.append(rollouts.token_rows(drawn, stream, k, per, drawn=True))
        reused = len(parts[-1]["sequence_rewards"])
        log.info("prefix scorer: the frontier's draws of %d prompts reused", len(drawn))
    train = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    held = rollouts.token_rows(fresh[-n_heldout:], stream, k, per)
    return train, held, reused


def fit_prefix_scorer(
    rollouts: Rollouts,
    settings: Mapping[str, Any],
    num_prompts: int,
    embedding: Tensor,
    beta: float,
    seed: int,
    stream: torch.Generator,
) -> tuple[PrefixScorer, dict[str, float], ReferenceSamples]:
    """Reference rollouts on ``rollout_prompts`` of the ``num_prompts`` train prompts (a
    held-out share of freshly sampled ones kept for calibration; the prompts of
    ``rollouts.draws`` come with their draws), sampled from ``stream``; the reward atoms and
    prior from their rewards, then ``epochs`` passes of Adam over their tokens in shuffled
    batches of ``batch_tokens`` (``settings``: ``algorithm.prefix_scorer``). Returns the
    frozen scorer, its ``guided/scorer/*`` statistics and the training rollouts."""
    s = settings
    gen = torch.Generator().manual_seed(seed + 7919)  # the scorer's own streams
    train, held, reused = _rows(rollouts, s, num_prompts, gen, stream)
    device = train["states"].device
    atoms = reward_atoms(train["sequence_rewards"], s["n_atoms"]).to(device)
    prior = two_hot(train["sequence_rewards"], atoms).mean(0)
    scorer = PrefixScorer(embedding, atoms, prior, s["hidden_size"]).to(device)
    opt = torch.optim.Adam(scorer.parameters(), lr=s["lr"])
    n = len(train["tokens"])
    batches = range(0, n, s["batch_tokens"])
    bar = progress(total=s["epochs"] * len(batches), desc="prefix scorer", unit="batch")
    for _ in range(s["epochs"]):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in batches:
            rows = perm[start : start + s["batch_tokens"]]
            logits = scorer.atom_logits(*(train[key][rows] for key in ROW_KEYS))
            loss = scorer_loss(logits, two_hot(train["rewards"][rows], atoms))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    scorer = scorer.eval().requires_grad_(False)
    stats = calibration(scorer, held, prior, beta)
    stats[M.SCORER_ROLLOUTS] = float(len(train["sequence_rewards"]))
    stats[M.SCORER_ATOMS] = float(len(atoms))
    stats[M.SCORER_REUSED] = float(reused)
    log.info(
        "prefix scorer: held-out cross-entropy %.4f (constant %.4f), value correlation %.3f",
        stats[M.SCORER_LOSS_HELDOUT],
        stats[M.SCORER_LOSS_CONSTANT],
        stats[M.SCORER_VALUE_CORR],
    )
    return scorer, stats, ReferenceSamples.of(train)


@torch.no_grad()
def calibration(
    scorer: PrefixScorer, held: Mapping[str, Tensor], prior: Tensor, beta: float
) -> dict[str, float]:
    """On held-out prompts' token rows: the cross-entropy per token against the constant
    predictor (the training rewards' atom frequencies ``prior``), and the correlation of the
    predicted V(s, a) with the realised exp(r / beta)."""
    target = two_hot(held["rewards"], scorer.atoms)
    logits = torch.cat(
        [
            scorer.atom_logits(*(held[key][i : i + 4096] for key in ROW_KEYS))
            for i in range(0, len(held["tokens"]), 4096)
        ]
    )
    constant = prior.clamp_min(1e-6).log().to(logits.device).expand_as(logits)
    value = logits.softmax(-1) @ torch.exp(scorer.atoms / beta)
    realised = torch.exp(held["rewards"] / beta)
    corr = torch.corrcoef(torch.stack([value, realised]))[0, 1].item()
    return {
        M.SCORER_LOSS_HELDOUT: scorer_loss(logits, target).item(),
        M.SCORER_LOSS_CONSTANT: scorer_loss(constant, target).item(),
        M.SCORER_VALUE_CORR: corr,
    }
