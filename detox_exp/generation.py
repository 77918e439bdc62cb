"""Sampling responses and turning them into teacher-forcing tensors with exact masks.

A response is ``[y_1, ..., y_T]`` (the decoder start token is not part of it) with pad after
the first EOS; the response mask is 1 up to and including the first EOS and 0 after it, so
padding never enters the loss. Sampling is our own KV-cached loop rather than
``generate``: it draws one uniform number per row and token (inverse CDF) instead of one per
vocabulary entry, and skips ``generate``'s per-step processor machinery.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from detox_exp.config_keys import similar_keys
from detox_exp.errors import ConfigError, UnknownKeyError
from detox_exp.fast import SWITCHES, t5_decoding
from detox_exp.fast.lora_fold import folded_adapter
from detox_exp.fast.widths import round_up
from detox_exp.guidance import guided_logits
from detox_exp.seq2seq import base_config, base_model, encode, expand_groups


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache (``past_key_values`` became ``cache``)."""
    forward = type(base_model(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "top_k", "top_p", "temperature")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings (``model.generation``); the defaults sample from the policy itself."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0

    def warp(self, logits: torch.Tensor, step: int, eos_id: int) -> torch.Tensor:
        """The sampling distribution's logits at decoding ``step`` (0-based), in the order
        ``transformers`` applies them: min length (EOS banned), temperature, top-k, top-p."""
        if step < self.min_new_tokens:
            logits = logits.clone()
            logits[:, eos_id] = -float("inf")
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if self.top_p < 1.0:
            # keep the smallest set of most likely tokens whose probability reaches top_p
            sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cum <= 1 - self.top_p
            drop_sorted[:, -1] = False  # always keep the most likely token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, -float("inf"))
        return logits


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None):
    """One token per row from ``softmax(logits)`` [B, V] -> [B], by inverse-CDF sampling.

    Draws one uniform number per row (``torch.multinomial`` draws one per vocabulary entry);
    the cumulative sum is in float64 so that rare tokens keep their probability.
    """
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)
    u = torch.rand(
        (logits.shape[0], 1), dtype=torch.float64, device=logits.device, generator=generator
    )
    # searchsorted(..., right=True) skips zero-probability tokens (flat cdf steps)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return token.clamp_(max=logits.shape[-1] - 1).squeeze(1)


def pad_queries(
    input_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompt token lists -> (ids [B, S], attention mask [B, S]); ``S`` is the
    longest prompt rounded up to ``multiple``."""
    width = round_up(max(len(ids) for ids in input_ids), multiple)
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


def make_sampling(gen: Mapping[str, Any], field: str = "model.generation") -> Sampling:
    """Validated decoding settings from a ``model.generation``-style mapping."""
    sampling = Sampling(**generation_kwargs(gen, field))
    checks = [
        (sampling.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (
            0 <= sampling.min_new_tokens <= sampling.max_new_tokens,
            "min_new_tokens",
            f"must be in [0, max_new_tokens={sampling.max_new_tokens}]",
        ),
        (sampling.top_k >= 0, "top_k", "must be >= 0 (0: off)"),
        (0 < sampling.top_p <= 1, "top_p", "must be in (0, 1]"),
        (sampling.temperature > 0, "temperature", "must be > 0"),
    ]
    for ok, key, problem in checks:
        if not ok:
            value = getattr(sampling, key)
            raise ConfigError(f"{field}.{key}", f"{problem}, got {value}", "fix the value")
    return sampling


def generation_kwargs(gen: Mapping[str, Any], field: str = "model.generation") -> dict[str, Any]:
    unknown = set(gen) - set(GENERATION_KEYS)
    if unknown:
        key = f"{field}.{sorted(unknown)[0]}"
        known = [f"{field}.{k}" for k in GENERATION_KEYS]
        raise UnknownKeyError(key, similar_keys(key, known), choices=known)
    return {k: gen[k] for k in GENERATION_KEYS if k in gen}


def _decode_step(
    model: torch.nn.Module,
    encoder_hidden: torch.Tensor,
    query_mask: torch.Tensor,
    max_steps: int,
    k: int,
    step_decoder: bool,
    need_states: bool,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """One decoding step: the previous tokens [B, 1] -> (the logits [B, V] in float32, the
    decoder's last state [B, d], None where not needed), by the T5 step decoder where it
    mirrors ``model`` (``step_decoder``), else by the model's forward with a KV cache (one row
    per sample). Call inside ``folded_adapter(model)``."""
    fast = step_decoder and t5_decoding.prepare(model, encoder_hidden, query_mask, max_steps, k)
    if fast:

        def fast_step(token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return fast.step(token).float(), fast.last_hidden

        return fast_step
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())  # updated in place
    encoder_outputs = BaseModelOutput(last_hidden_state=expand_groups(encoder_hidden, k))
    expanded_mask, cache_kwarg = expand_groups(query_mask, k), _cache_kwarg(model)

    def forward_step(token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = model(
            encoder_outputs=encoder_outputs,
            attention_mask=expanded_mask,
            decoder_input_ids=token,
            use_cache=True,
            return_dict=True,
            output_hidden_states=need_states,
            **{cache_kwarg: cache},
        )
        state = out.decoder_hidden_states[-1][:, -1] if need_states else None
        return out.logits[:, -1].float(), state

    return forward_step


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    gen: Mapping[str, Any],
    encoder_hidden: torch.Tensor | None = None,
    check_every: int = 4,
    step_decoder: bool | None = None,
    samples_per_prompt: int = 1,
    generator: torch.Generator | None = None,
    guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    record: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    states: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched sampling with a KV cache. Returns (response_ids, mask), both [P * k, T].

    ``query_ids``, ``query_mask`` [P, S]: one row per prompt; ``samples_per_prompt`` k
    responses are drawn for each (rows p * k ... p * k + k - 1 belong to prompt p), from
    one encoder pass per prompt. ``response_ids`` excludes the decoder start token and holds
    pad after the first EOS.
    ``encoder_hidden`` [P, S, d]: the prompts' encoder output, if already computed. The loop
    stops once every row has ended, checked every ``check_every`` tokens (one host sync).
    ``step_decoder``: decode T5 with :mod:`detox_exp.fast.t5_decoding` (same logits, a
    fraction of the per-token overhead; None: the ``fast.step_decoder`` switch); other
    models, or False, use the model's forward.
    ``generator``: the random stream to sample from (on the queries' device); None: torch's
    global one.
    ``guide``: value guidance (:mod:`detox_exp.guidance`): maps the decoder's last state
    [B, d] and the model's logits [B, V] to ``log V(s, a)`` [B, V]; tokens are drawn from
    ``model(a | s) V(s, a)`` (then warped as configured). Call it on the reference (adapter
    disabled).
    ``record``: a list that receives each step's (model logits, logits after the guide)
    [B, V], before warping: the distributions the samples were drawn from, for a caller
    that needs them at every response position (value-guided distillation).
    ``states``: a list that receives each step's decoder last state [B, d] (the prefix
    scorer's inputs, without a second pass over the responses).
    """
    sampling = make_sampling(gen)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if encoder_hidden is None:
        encoder_hidden = encode(model, query_ids, query_mask)
    batch = query_ids.shape[0] * samples_per_prompt
    start_id = base_config(model).decoder_start_token_id
    token = torch.full((batch, 1), start_id, device=query_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=query_ids.device)
    tokens = []
    if step_decoder is None:
        step_decoder = SWITCHES.step_decoder
    need_states = guide is not None or states is not None
    with folded_adapter(model):
        decode_step = _decode_step(
            model,
            encoder_hidden,
            query_mask,
            sampling.max_new_tokens,
            samples_per_prompt,
            step_decoder,
            need_states,
        )
        for step in range(sampling.max_new_tokens):
            model_logits, hidden_state = decode_step(token)
            logits = model_logits
            if guide is not None:
                logits = guided_logits(logits, guide(hidden_state, logits))
            if record is not None:
                record.append((model_logits, logits))
            if states is not None:
                states.append(hidden_state)
            logits = sampling.warp(logits, step, eos_id)
            if sampling.do_sample:
                next_token = sample_from_logits(logits, generator)
            else:
                next_token = logits.argmax(-1)
            next_token = next_token.masked_fill(done, pad_id)
            tokens.append(next_token)
            done |= next_token == eos_id
            token = next_token[:, None]
            if (step + 1) % check_every == 0 and bool(done.all()):
                break
    response_ids = torch.stack(tokens, dim=1)
    mask = response_mask(response_ids, eos_id)
    return response_ids.masked_fill(mask == 0, pad_id), mask


def decode(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor) -> list[str]:
    """Response texts (special tokens dropped, whitespace stripped)."""
    return [t.strip() for t in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]
