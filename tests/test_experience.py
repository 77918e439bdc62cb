"""Experience.minibatch: the chosen rows, right padding trimmed to fast.width_multiple."""

from __future__ import annotations

import torch

from detox_exp.fast import SWITCHES
from detox_exp.ppo.experience import Experience

WIDTH_MULTIPLE = SWITCHES.width_multiple


def _experience(query_lengths: list[int], response_lengths: list[int]) -> Experience:
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


def test_minibatch_rows_and_trimmed_widths() -> None:
    exp = _experience(query_lengths=[40, 10, 17, 5], response_lengths=[30, 3, 17, 1])
    mb = exp.minibatch(torch.tensor([1, 2]))
    # longest prompt 17 -> 32 columns, longest response 17 -> 32 (of 48 and 32)
    assert mb.query.shape == (2, 32) and mb.query_mask.shape == (2, 32)
    assert mb.response.shape == (2, 32) and mb.mask.shape == (2, 32)
    assert torch.equal(mb.query, exp.query[[1, 2], :32])
    assert torch.equal(mb.returns, exp.returns[[1, 2]])
    mb = exp.minibatch(torch.tensor([3, 1]))  # prompts 5 and 10, responses 1 and 3
    assert mb.query.shape == (2, WIDTH_MULTIPLE) and mb.response.shape == (2, WIDTH_MULTIPLE)
    assert torch.equal(mb.advantages, exp.advantages[[3, 1], :WIDTH_MULTIPLE])
    assert torch.equal(mb.values, exp.values[[3, 1], :WIDTH_MULTIPLE])
    assert torch.equal(mb.logprobs, exp.logprobs[[3, 1], :WIDTH_MULTIPLE])
    # trimming never drops a kept token
    assert mb.mask.sum() == exp.mask[[3, 1]].sum()
    assert mb.query_mask.sum() == exp.query_mask[[3, 1]].sum()
