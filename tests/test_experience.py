"""Experience.minibatch: the chosen rows, right padding trimmed to fast.width_multiple."""

from __future__ import annotations

import torch

from tests.helpers.experience import WIDTH_MULTIPLE, experience_of


def test_minibatch_rows_and_trimmed_widths() -> None:
    exp = experience_of(query_lengths=[40, 10, 17, 5], response_lengths=[30, 3, 17, 1])
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
