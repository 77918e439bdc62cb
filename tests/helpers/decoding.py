"""Shared by the decoding tests and their CUDA versions (tests/test_cuda.py): batches,
the step decoder's logits, greedy decoding against generate()."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from detox_exp.fast import t5_decoding
from detox_exp.fast.lora_fold import folded_adapter
from detox_exp.generation import pad_queries, sample_responses
from detox_exp.models import load_policy
from detox_exp.seq2seq import encode, expand_groups
from tests.helpers.run import trained_lora

STEPS = 9


def prompt_batch(tiny_t5: Path, device: str = "cpu"):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval().to(device)
    texts = ["a short one", "a much longer prompt about a meeting " * 5, "medium prompt here"]
    ids, mask = pad_queries(tokenizer(texts)["input_ids"], tokenizer.pad_token_id, device)
    return model, tokenizer, ids, mask


def decoding_batch(tiny_t5: Path, device: str = "cpu"):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    texts = ["a short one", "a much longer prompt about a meeting " * 5, "medium prompt here"]
    ids, mask = pad_queries(tokenizer(texts)["input_ids"], tokenizer.pad_token_id, device)
    return tokenizer, ids, mask


def step_logits(model, ids, mask, tokens, fast: bool, k: int = 1) -> torch.Tensor:
    """Logits [steps, P * k, V] for teacher-forced ``tokens`` [P * k, steps], k rows per
    prompt of ``ids`` [P, S], one token at a time: through the flat step decoder, or the
    model's own KV-cached forward (on the prompts' encoder output repeated k times)."""
    out = []
    with torch.no_grad(), folded_adapter(model):
        hidden = encode(model, ids, mask)
        decoder = t5_decoding.prepare(model, hidden, mask, tokens.shape[1], k)
        assert (decoder is not None) or not fast
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for t in range(tokens.shape[1]):
            token = tokens[:, t : t + 1]
            if fast:
                out.append(decoder.step(token).float())
            else:
                logits = model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=expand_groups(hidden, k)),
                    attention_mask=expand_groups(mask, k),
                    decoder_input_ids=token,
                    use_cache=True,
                    past_key_values=cache,
                ).logits
                out.append(logits[:, -1].float())
    return torch.stack(out)


def teacher_tokens(ids: torch.Tensor, k: int = 1) -> torch.Tensor:
    torch.manual_seed(1)
    tokens = torch.randint(2, 300, (ids.shape[0] * k, STEPS))
    tokens[:, 0] = 0  # the decoder start token
    return tokens


def assert_bf16_error_within_bf16_rounding(tiny_t5: Path, device: str, k: int = 1) -> None:
    """bf16 weights (LoRA in fp32) under bf16 autocast, as precision=bf16 runs: the step
    decoder's error against fp32 is no larger than the model's own bf16 forward's (k samples
    per prompt)."""
    _, ids, mask = decoding_batch(tiny_t5, device)
    tokens = teacher_tokens(ids, k).to(device)

    def model(dtype: torch.dtype | None = None) -> torch.nn.Module:
        base = load_policy(str(tiny_t5), full_finetune=True, torch_dtype=dtype)
        return trained_lora(base).to(device)

    want = step_logits(model(), ids, mask, tokens, fast=False, k=k)
    bf16 = model(torch.bfloat16)
    assert {p.dtype for n, p in bf16.named_parameters() if "lora" in n} == {torch.float32}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        theirs = step_logits(bf16, ids, mask, tokens, fast=False, k=k)
        ours = step_logits(bf16, ids, mask, tokens, fast=True, k=k)
    their_error = (theirs - want).abs().max()
    assert their_error > 0  # bf16 really ran
    assert (ours - want).abs().max() <= 2 * their_error


def assert_same_tokens(ours: torch.Tensor, theirs: torch.Tensor, pad: int) -> None:
    """Equal token ids once both are right-padded to the same width."""
    width = max(ours.shape[1], theirs.shape[1])
    ours = torch.nn.functional.pad(ours, (0, width - ours.shape[1]), value=pad)
    theirs = torch.nn.functional.pad(theirs, (0, width - theirs.shape[1]), value=pad)
    assert torch.equal(ours, theirs)


def lora_model(tiny_t5: Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    model, tokenizer, ids, mask = prompt_batch(tiny_t5, device)
    if dtype is not None:
        model = model.to(dtype)
    return trained_lora(model).to(device), tokenizer, ids, mask


def assert_greedy_with_adapter_equals_generate(tiny_t5: Path, device: str) -> None:
    """Greedy decoding through the KV cache with the LoRA update folded in picks the same
    tokens as transformers' generate() with the adapter applied the usual way."""
    model, tokenizer, ids, mask = lora_model(tiny_t5, device=device)
    ours, _ = sample_responses(
        model, tokenizer, ids, mask, {"do_sample": False, "max_new_tokens": 10}, check_every=1
    )
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert ours.device.type == torch.device(device).type
    assert_same_tokens(ours, theirs[:, 1:], tokenizer.pad_token_id)
