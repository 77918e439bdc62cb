"""The flat T5 decoding step computes what the transformers model computes, token by token:
fp32 to round-off (LoRA folded or not, gated or plain feed-forward, padded prompts, k samples
per prompt), bf16 to within bf16's own error, and it steps aside for models it does not
mirror. Its fused weights are reused until a weight changes, and a prompt's cross-attention
keys / values are stored once for its k samples."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from detox_exp.fast import SWITCHES, t5_decoding
from detox_exp.fast.lora_fold import folded_adapter
from detox_exp.generation import sample_responses
from detox_exp.models import load_policy
from detox_exp.seq2seq import encode
from tests.helpers.decoding import (
    STEPS,
    assert_bf16_error_within_bf16_rounding,
    decoding_batch,
    step_logits,
    teacher_tokens,
)
from tests.helpers.run import trained_lora


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
    tokenizer, ids, mask = decoding_batch(tiny_t5)
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
    tokens = teacher_tokens(ids)
    want = step_logits(model, ids, mask, tokens, fast=False)
    got = step_logits(model, ids, mask, tokens, fast=True)
    scale = want.abs().max().item()
    assert scale > 1.0  # non-trivial logits
    # float32 round-off grows with the logits' scale (mT5's are not scaled by d_model^-0.5,
    # so they are ~6x T5's): agree to 1e-5 of the largest logit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_unfolded_lora_matches_too(tiny_t5: Path) -> None:
    """With folding off (adapter applied as x A^T B^T s beside the stacked projections)."""
    tokenizer, ids, mask = decoding_batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    tokens = teacher_tokens(ids)
    with torch.no_grad():
        hidden = encode(model, ids, mask)
        decoder = t5_decoding.prepare(model, hidden, mask, STEPS)  # not folded
        layer = decoder.layers[0]
        assert layer.qkv.a is not None and len(layer.qkv.updates) == 2  # q and v
        got = torch.stack([decoder.step(tokens[:, t : t + 1]) for t in range(STEPS)])
    want = step_logits(model, ids, mask, tokens, fast=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_bf16_error_is_within_bf16_rounding(tiny_t5: Path, k: int) -> None:
    assert_bf16_error_within_bf16_rounding(tiny_t5, "cpu", k)


def test_sampling_picks_the_same_tokens_either_way(tiny_t5: Path) -> None:
    """Greedy and seeded sampling through sample_responses: same tokens with and without
    the step decoder (fp32, LoRA folded)."""
    tokenizer, ids, mask = decoding_batch(tiny_t5)
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
    _, ids, mask = decoding_batch(tiny_t5)
    model = load_policy(str(tiny_t5), full_finetune=True).eval()
    with torch.no_grad():
        decoder = t5_decoding.prepare(model, encode(model, ids, mask), mask, 2)
        token = torch.zeros(ids.shape[0], 1, dtype=torch.long)
        decoder.step(token)
        decoder.step(token)
        with pytest.raises(IndexError, match="max_steps=2"):
            decoder.step(token)


def test_models_it_does_not_mirror_fall_back(tiny_t5: Path) -> None:
    _, ids, mask = decoding_batch(tiny_t5)
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
    _, ids, mask = decoding_batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    tokens = teacher_tokens(ids)
    want = step_logits(model, ids, mask, tokens, fast=False)
    model.base_model.merge_adapter()
    torch.testing.assert_close(
        step_logits(model, ids, mask, tokens, fast=True), want, rtol=1e-5, atol=2e-5
    )
    with torch.no_grad(), model.disable_adapter():
        assert t5_decoding.prepare(model, encode(model, ids, mask), mask, 4) is None


def test_dropout_anywhere_and_prompt_learning_fall_back(tiny_t5: Path) -> None:
    from peft import PrefixTuningConfig

    _, ids, mask = decoding_batch(tiny_t5)
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


# --------------------------------------------------------------- k samples per prompt
K = 3


@pytest.mark.parametrize("adapter", ["folded", "unfolded", "disabled"])
def test_samples_share_one_copy_of_each_prompts_keys_values(
    tiny_t5: Path, adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k samples per prompt: the same logits as the model's forward on the prompts' encoder
    output repeated k times, with the cross-attention keys / values stored for P rows (the
    k queries of a prompt read them in place), not P * k."""
    monkeypatch.setattr(SWITCHES, "fold_lora", adapter == "folded")
    _, ids, mask = decoding_batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    tokens = teacher_tokens(ids, K)
    with model.disable_adapter() if adapter == "disabled" else torch.no_grad():
        want = step_logits(model, ids, mask, tokens, fast=False, k=K)
        got = step_logits(model, ids, mask, tokens, fast=True, k=K)
        with torch.no_grad(), folded_adapter(model):
            decoder = t5_decoding.prepare(model, encode(model, ids, mask), mask, STEPS, K)
    assert (decoder.layers[0].qkv.a is not None) == (adapter == "unfolded")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    (prompts, width), heads = ids.shape, model.config.num_heads
    for layer in decoder.layers:
        for kv in (layer.cross_k, layer.cross_v):
            assert kv.shape[:3] == (prompts, heads, width)  # [P, H, S, dh]
            assert kv.untyped_storage().nbytes() == kv.numel() * kv.element_size()
    assert decoder.cross_bias.shape[0] == prompts
    assert len({tuple(row.tolist()) for row in got[:, :K].argmax(-1).T}) > 1  # k rows differ


# --------------------------------------------------------------- fused weights, reused
def _fused(decoder: t5_decoding.T5StepDecoder) -> dict[str, torch.Tensor | None]:
    """The tensors the decoder built by concatenation (layer 0): q|k|v, wi_0|wi_1 and the
    stacked LoRA A matrices of q|k|v (None when folded or disabled)."""
    layer = decoder.layers[0]
    return {"qkv": layer.qkv.weight, "wi": layer.wi.weight, "lora_a": layer.qkv.a}


def _prepare(model, ids, mask, k: int = 1) -> t5_decoding.T5StepDecoder:
    with torch.no_grad(), folded_adapter(model):
        return t5_decoding.prepare(model, encode(model, ids, mask), mask, STEPS, k)


def _assert_follows_the_model(model, ids, mask) -> None:
    tokens = teacher_tokens(ids)
    torch.testing.assert_close(
        step_logits(model, ids, mask, tokens, fast=True),
        step_logits(model, ids, mask, tokens, fast=False),
        rtol=1e-5,
        atol=2e-5,
    )


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("fused_optimizer", [False, True])
def test_fused_weights_are_reused_until_a_weight_changes(
    tiny_t5: Path, fold: bool, fused_optimizer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two calls without an update share every fused tensor (the same objects, the same
    memory); an optimizer step (AdamW, also its fused form, which writes without bumping
    ``_version``), an in-place change of a frozen weight and ``load_state_dict`` each give
    new fused tensors where a source changed, and the logits follow the new weights."""
    monkeypatch.setattr(SWITCHES, "fold_lora", fold)
    _, ids, mask = decoding_batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    saved = {n: p.detach().clone() for n, p in model.state_dict().items()}
    first, second = _prepare(model, ids, mask), _prepare(model, ids, mask)
    cross = model.base_model.model.decoder.block[0].layer[1].EncDecAttention
    for decoder in (first, second):  # read in place once per call: no copy, nothing cached
        assert decoder.layers[0].cross_kv[0].weight is cross.k.weight
        if not fold:
            assert decoder.layers[0].cross_kv[1].weight is cross.v.base_layer.weight
    first, second = _fused(first), _fused(second)
    for name, tensor in first.items():
        assert second[name] is tensor, name
        if tensor is not None:
            assert second[name].data_ptr() == tensor.data_ptr()
    assert (first["lora_a"] is None) == fold

    # an optimizer step moves the LoRA matrices (on q and v): under folding q|k|v is re-fused
    # (and its stale copy freed at the step), wi_0|wi_1 (no LoRA) is not; unfolded only the
    # A stack is new
    first_qkv = weakref.ref(first.pop("qkv"))
    del second, decoder
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, fused=fused_optimizer)
    for param in trainable:
        param.grad = torch.randn_like(param)
    optimizer.step()
    assert (first_qkv() is None) == fold
    stepped = _fused(_prepare(model, ids, mask))
    assert stepped["wi"] is first["wi"]
    if fold:
        assert stepped["qkv"] is not first_qkv()
    else:
        assert stepped["qkv"] is first_qkv()
        assert stepped["lora_a"] is not first["lora_a"]
    _assert_follows_the_model(model, ids, mask)

    # an in-place change of a frozen weight (no LoRA on k, wi_0)
    block = model.base_model.model.decoder.block[0]
    with torch.no_grad():
        block.layer[0].SelfAttention.k.weight.mul_(1.5)
        block.layer[-1].DenseReluDense.wi_0.weight.mul_(1.5)
    changed = _fused(_prepare(model, ids, mask))
    assert changed["qkv"] is not stepped["qkv"] and changed["wi"] is not stepped["wi"]
    _assert_follows_the_model(model, ids, mask)

    # loading weights (in place, as load_state_dict does): the first weights again
    model.load_state_dict(saved)
    loaded = _fused(_prepare(model, ids, mask))
    assert loaded["qkv"] is not changed["qkv"] and loaded["wi"] is not changed["wi"]
    torch.testing.assert_close(loaded["wi"], first["wi"], rtol=0, atol=0)
    _assert_follows_the_model(model, ids, mask)


@pytest.mark.parametrize("fold", [True, False])
def test_the_cache_never_serves_another_adapter_state(
    tiny_t5: Path, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alternating the adapter on and off (peft's disable_adapter(), as the reference and
    frontier sampling do) and changing its scaling: every call mirrors the model in the state
    it is in, folded or not."""
    monkeypatch.setattr(SWITCHES, "fold_lora", fold)
    _, ids, mask = decoding_batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    tokens = teacher_tokens(ids)
    on = step_logits(model, ids, mask, tokens, fast=False)
    with model.disable_adapter():
        off = step_logits(model, ids, mask, tokens, fast=False)
    assert (on - off).abs().max() > 1e-2  # the adapter matters
    for enabled in (True, False, True, False, True):
        with torch.no_grad() if enabled else model.disable_adapter():
            got = step_logits(model, ids, mask, tokens, fast=True)
        torch.testing.assert_close(got, on if enabled else off, rtol=1e-5, atol=2e-5)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.scaling["default"] *= 2
    _assert_follows_the_model(model, ids, mask)


def test_the_cache_follows_the_compute_dtype(tiny_t5: Path) -> None:
    """fp32 weights decoded under bf16 autocast get bf16 copies (kept for the next bf16
    call), and an fp32 call after them gets fp32 weights again."""
    _, ids, mask = decoding_batch(tiny_t5)
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True).eval())
    fp32 = _fused(_prepare(model, ids, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _fused(_prepare(model, ids, mask))
        assert _fused(_prepare(model, ids, mask))["wi"] is bf16["wi"]
        o = _prepare(model, ids, mask).layers[0].o.weight  # a cast copy, kept too
        assert o.dtype == torch.bfloat16 and _prepare(model, ids, mask).layers[0].o.weight is o
    assert bf16["qkv"].dtype == bf16["wi"].dtype == torch.bfloat16
    again = _fused(_prepare(model, ids, mask))
    assert again["wi"].dtype == torch.float32 and again["wi"] is not fp32["wi"]
    _assert_follows_the_model(model, ids, mask)
