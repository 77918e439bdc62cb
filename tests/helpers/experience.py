"""A hand-made rollout batch whose every entry says where it came from."""

from __future__ import annotations

import torch

from detox_exp.fast import SWITCHES
from detox_exp.ppo.experience import Experience

WIDTH_MULTIPLE = SWITCHES.width_multiple


def experience_of(query_lengths: list[int], response_lengths: list[int]) -> Experience:
    rows, s, t = len(query_lengths), 3 * WIDTH_MULTIPLE, 2 * WIDTH_MULTIPLE

    def lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
        return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()

    per_token = torch.arange(rows * t, dtype=torch.float32).reshape(rows, t)
    return Experience(
        indices=list(range(rows)),
        samples_per_prompt=1,
        query=torch.arange(rows * s).reshape(rows, s),
        query_mask=lengths_mask(query_lengths, s).long(),
        response=torch.arange(rows * t).reshape(rows, t),
        mask=lengths_mask(response_lengths, t),
        texts=[""] * rows,
        scores=torch.zeros(rows),
        toxicity=torch.zeros(rows),
        logprobs=per_token,
        ref_logprobs=per_token,
        values=per_token + 1,
        entropy=per_token,
        kl=per_token,
        kl_reward=per_token,
        rewards=per_token,
        advantages=per_token + 2,
        returns=per_token + 3,
        timings={},
    )
