"""Sampling responses and turning them into teacher-forcing tensors with exact masks.

A T5 response from ``generate`` is ``[start, y_1, ..., y_T]`` with the decoder start token
(= pad) first and pad after EOS. We keep ``y`` (without the start token); the response mask
is 1 up to and including the first EOS and 0 after it, so padding never enters the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from detox_exp.ppo.policy import base_config

GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "top_k", "top_p", "temperature")


def pad_queries(
    input_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompt token lists -> (ids [B, S], attention mask [B, S])."""
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, seq in enumerate(input_ids):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def response_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it. [B, T] -> [B, T] float."""
    is_eos = response_ids == eos_id
    # number of EOS tokens strictly before position t; a token is kept while that is 0
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).float()


def decoder_inputs(response_ids: torch.Tensor, start_id: int) -> torch.Tensor:
    """Teacher-forcing inputs: the start token followed by the response shifted right."""
    start = torch.full_like(response_ids[:, :1], start_id)
    return torch.cat([start, response_ids[:, :-1]], dim=1)


def generation_kwargs(gen: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(gen) - set(GENERATION_KEYS)
    if unknown:
        from detox_exp.errors import ConfigError

        raise ConfigError(
            f"model.generation.{sorted(unknown)[0]}",
            "unknown generation setting",
            f"use only {GENERATION_KEYS}",
        )
    return {k: gen[k] for k in GENERATION_KEYS if k in gen}


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    gen: Mapping[str, Any],
    encoder_hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched ``generate`` call (KV cache on). Returns (response_ids, mask), [B, T].

    ``response_ids`` excludes the decoder start token and holds pad after the first EOS.
    ``encoder_hidden`` [B, S, d]: the prompts' encoder output, if already computed.
    """
    config = base_config(model)
    out = model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        use_cache=True,
        **({} if encoder_hidden is None else {"encoder_outputs": BaseModelOutput(encoder_hidden)}),
        **generation_kwargs(gen),
    )
    response_ids = out[:, 1:]
    if response_ids.shape[1] == 0:  # max_new_tokens=0 is rejected in config; be safe
        raise ValueError("generate returned no tokens")
    mask = response_mask(response_ids, tokenizer.eos_token_id)
    return response_ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def decode(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor) -> list[str]:
    """Response texts (special tokens dropped, whitespace stripped)."""
    return [t.strip() for t in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]
