"""The flat T5 decoding step computes what the transformers model computes, token by token:
fp32 to round-off (LoRA folded or not, gated or plain feed-forward, padded prompts), bf16 to
within bf16's own error, and it steps aside for models it does not mirror."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from detox_exp.fast import t5_decoding
from detox_exp.fast.lora_fold import folded_adapter
from detox_exp.models import load_policy
from detox_exp.ppo.policy import encode
from detox_exp.ppo.rollout import pad_queries, sample_responses
from tests.conftest import trained_lora

STEPS = 9


def _batch(tiny_t5: Path, device: str = "cpu"):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    texts = ["a short one", "a much longer prompt about a meeting " * 5, "medium prompt here"]
    ids, mask = pad_queries(tokenizer(texts)["input_ids"], tokenizer.pad_token_id, device)
    return tokenizer, ids, mask


def _step_logits(model, ids, mask, tokens, fast: bool) -> torch.Tensor:
    """Logits [steps, B, V] for teacher-forced ``tokens`` [B, steps], one token at a time:
    through the flat step decoder, or the model's own KV-cached forward."""
    out = []
    with torch.no_grad(), folded_adapter(model):
        hidden = encode(model, ids, mask)
        decoder = t5_decoding.prepare(model, hidden, mask, tokens.shape[1])
        assert (decoder is not None) or not fast
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for t in range(tokens.shape[1]):
            token = tokens[:, t : t + 1]
            if fast:
                out.append(decoder.step(token).float())
            else:
                logits = model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                    attention_mask=mask,
                    decoder_input_ids=token,
                    use_cache=True,
                    past_key_values=cache,
                ).logits
                out.append(logits[:, -1].float())
    return torch.stack(out)


def _tokens(ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)
    tokens = torch.randint(2, 300, (ids.shape[0], STEPS))
    tokens[:, 0] = 0  # the decoder start token
    return tokens


@pytest.mark.parametrize(
    ("feed_forward", "targets"),
    [
        ("gated-gelu", ("q", "v")),
        ("gated-gelu", ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
        ("relu", ("q", "v", "wi")),
        ("gated-gelu", ()),
    ],
)
@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_fp32_step_logits_match_the_model(
    tiny_t5: Path, feed_forward: str, targets: tuple[str, ...], family: str
) -> None:
    """T5 scales the tied output embedding, mT5 does not: both mirrored."""
    tokenizer, ids, mask = _batch(tiny_t5)
    torch.manual_seed(0)
    config_class, model_class = {
        "t5": (T5Config, T5ForConditionalGeneration),
        "mt5": (MT5Config, MT5ForConditionalGeneration),
    }[family]
    config = config_class(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        d_kv=16,
        feed_forward_proj=feed_forward,
        decoder_start_token_id=0,
    )
    model = model_class(config).eval()
    if targets:
        model = trained_lora(model, targets)
    tokens = _tokens(ids)
    want = _step_logits(model, ids, mask, tokens, fast=False)
    got = _step_logits(model, ids, mask, tokens, fast=True)
    scale = want.abs().max().item()
    assert scale > 1.0  # non-trivial logits
    # float32 round-off grows with the logits' scale (mT5's are not scaled by d_model^-0.5,
    # so they are ~6x T5's): agree to 1e-5 of the largest logit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_unfolded_lora_matches_too(tiny_t5: Path) -> None:
    """With folding off (adapter applied as x A^T B^T s beside the stacked projections)."""
    tokenizer, ids, mask = _batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    tokens = _tokens(ids)
    with torch.no_grad():
        hidden = encode(model, ids, mask)
        decoder = t5_decoding.prepare(model, hidden, mask, STEPS)  # not folded
        layer = decoder.layers[0]
        assert layer.qkv.a is not None and len(layer.qkv.updates) == 2  # q and v
        got = torch.stack([decoder.step(tokens[:, t : t + 1]) for t in range(STEPS)])
    want = _step_logits(model, ids, mask, tokens, fast=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def assert_bf16_error_within_bf16_rounding(tiny_t5: Path, device: str) -> None:
    """bf16 weights (LoRA in fp32) under bf16 autocast, as precision=bf16 runs: the step
    decoder's error against fp32 is no larger than the model's own bf16 forward's."""
    _, ids, mask = _batch(tiny_t5, device)
    tokens = _tokens(ids).to(device)

    def model(dtype: torch.dtype | None = None) -> torch.nn.Module:
        base = load_policy(str(tiny_t5), full_finetune=True, torch_dtype=dtype)
        return trained_lora(base).to(device)

    want = _step_logits(model(), ids, mask, tokens, fast=False)
    bf16 = model(torch.bfloat16)
    assert {p.dtype for n, p in bf16.named_parameters() if "lora" in n} == {torch.float32}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        theirs = _step_logits(bf16, ids, mask, tokens, fast=False)
        ours = _step_logits(bf16, ids, mask, tokens, fast=True)
    their_error = (theirs - want).abs().max()
    assert their_error > 0  # bf16 really ran
    assert (ours - want).abs().max() <= 2 * their_error


def test_bf16_error_is_within_bf16_rounding(tiny_t5: Path) -> None:
    assert_bf16_error_within_bf16_rounding(tiny_t5, "cpu")


def test_sampling_picks_the_same_tokens_either_way(tiny_t5: Path) -> None:
    """Greedy and seeded sampling through sample_responses: same tokens with and without
    the step decoder (fp32, LoRA folded)."""
    tokenizer, ids, mask = _batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    for gen in (
        {"do_sample": False, "max_new_tokens": 12},
        {"max_new_tokens": 12, "top_k": 0, "top_p": 1.0},
    ):
        responses = []
        for fast in (True, False):
            torch.manual_seed(3)
            response, _ = sample_responses(
                model, tokenizer, ids, mask, gen, check_every=1, step_decoder=fast
            )
            responses.append(response)
        assert torch.equal(responses[0], responses[1]), gen


def test_steps_past_the_cache_are_refused(tiny_t5: Path) -> None:
    _, ids, mask = _batch(tiny_t5)
    model = load_policy(str(tiny_t5), full_finetune=True).eval()
    with torch.no_grad():
        decoder = t5_decoding.prepare(model, encode(model, ids, mask), mask, 2)
        token = torch.zeros(ids.shape[0], 1, dtype=torch.long)
        decoder.step(token)
        decoder.step(token)
        with pytest.raises(IndexError, match="max_steps=2"):
            decoder.step(token)


def test_models_it_does_not_mirror_fall_back(tiny_t5: Path) -> None:
    _, ids, mask = _batch(tiny_t5)
    hidden = torch.zeros(ids.shape[0], ids.shape[1], 32)
    training = load_policy(str(tiny_t5), full_finetune=True).train()  # dropout on
    assert t5_decoding.prepare(training, hidden, mask, 4) is None
    dora = load_policy(str(tiny_t5), full_finetune=True).eval()
    dora = get_peft_model(
        dora, LoraConfig(r=4, target_modules=["q", "v"], use_dora=True, task_type="SEQ_2_SEQ_LM")
    )
    assert t5_decoding.prepare(dora.eval(), hidden, mask, 4) is None
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=50,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        )
    ).eval()
    assert t5_decoding.prepare(bart, hidden, mask, 4) is None


def test_merged_adapters_are_used_only_while_active(tiny_t5: Path) -> None:
    """A merged adapter lives in the base weight: mirrored while active; when disabled,
    peft unmerges it, which the step decoder does not, so it steps aside."""
    _, ids, mask = _batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    tokens = _tokens(ids)
    want = _step_logits(model, ids, mask, tokens, fast=False)
    model.base_model.merge_adapter()
    torch.testing.assert_close(
        _step_logits(model, ids, mask, tokens, fast=True), want, rtol=1e-5, atol=2e-5
    )
    with torch.no_grad(), model.disable_adapter():
        assert t5_decoding.prepare(model, encode(model, ids, mask), mask, 4) is None


def test_dropout_anywhere_and_prompt_learning_fall_back(tiny_t5: Path) -> None:
    from peft import PrefixTuningConfig

    _, ids, mask = _batch(tiny_t5)
    hidden = torch.zeros(ids.shape[0], ids.shape[1], 32)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    assert t5_decoding.prepare(model, hidden, mask, 4) is not None
    next(m for m in model.modules() if isinstance(m, torch.nn.Dropout)).train()
    assert t5_decoding.prepare(model, hidden, mask, 4) is None
    prefix = get_peft_model(
        load_policy(str(tiny_t5), full_finetune=True),
        PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
    ).eval()
    assert t5_decoding.prepare(prefix, hidden, mask, 4) is None
