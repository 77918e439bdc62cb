"""The T5 attention used on CPU in bf16 (plain matmuls instead of the flash kernel) computes
the same function as transformers' SDPA path: padding and causal masks included, forward and
backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from detox_exp.fast.attention import ATTENTION
from detox_exp.generation import pad_queries, sample_responses
from detox_exp.models import load_policy
from tests.helpers.run import trained_lora


def _inputs(tiny_t5: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    texts = ["a short one", "a much longer prompt about a meeting " * 5, "medium prompt here"]
    ids, mask = pad_queries(tokenizer(texts)["input_ids"], tokenizer.pad_token_id, "cpu")
    torch.manual_seed(0)
    return ids, mask, torch.randint(2, 300, (ids.shape[0], 9))


def _loss_and_grads(model, ids, mask, dec):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def test_policy_loads_with_our_attention(tiny_t5: Path) -> None:
    model = load_policy(str(tiny_t5), full_finetune=True)
    assert model.config._attn_implementation == ATTENTION


def _model(tiny_t5: Path, impl: str, case: str):
    """The tiny T5 with attention ``impl`` and the context to run it in: fp32, bf16 weights,
    or fp32 weights under bf16 autocast (q, k, v in bf16, the position bias in fp32)."""
    model = load_policy(str(tiny_t5), full_finetune=True).eval()
    if case == "bf16":
        model = model.to(torch.bfloat16)
    model.set_attn_implementation(impl)  # also sets the encoder / decoder stacks' copies
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    assert {c._attn_implementation for c in configs} == {impl}
    return model, torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")


CASES = ["bf16", "autocast", "fp32"]


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_sdpa(tiny_t5: Path, case: str) -> None:
    """Same logits and gradients as the SDPA path, measured against an fp32 reference: in
    bf16 our error is of the same size as SDPA's own rounding error."""
    ids, mask, dec = _inputs(tiny_t5)
    reference = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5, attn_implementation="sdpa")
    want, want_grads = _loss_and_grads(reference.eval(), ids, mask, dec)
    errors = {}
    for impl in ("sdpa", ATTENTION):
        model, precision = _model(tiny_t5, impl, case)
        with precision:
            got, grads = _loss_and_grads(model, ids, mask, dec)
        grad_err = max((grads[n] - want_grads[n]).abs().max().item() for n in want_grads)
        errors[impl] = ((got - want).abs().max().item(), grad_err)
    if case == "fp32":  # dispatches to SDPA itself
        assert errors[ATTENTION] == errors["sdpa"]
        assert errors[ATTENTION][0] < 1e-5
    else:
        assert errors["sdpa"][0] > 0  # bf16 rounding is visible
        for ours, theirs in zip(errors[ATTENTION], errors["sdpa"], strict=True):
            assert ours <= 2 * theirs + 1e-3


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_picks_the_same_tokens_as_sdpa(tiny_t5: Path, case: str) -> None:
    """The rollout's KV-cached loop (cross-attention on the matmul path, self-attention with
    one query on SDPA) decodes greedily to the same tokens as with SDPA everywhere."""
    ids, mask, _ = _inputs(tiny_t5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    gen = {"do_sample": False, "max_new_tokens": 12}
    tokens = {}
    for impl in ("sdpa", ATTENTION):
        model, precision = _model(tiny_t5, impl, case)
        with precision:
            tokens[impl], _ = sample_responses(model, tokenizer, ids, mask, gen, check_every=1)
    assert tokens[ATTENTION].shape[1] > 3
    assert torch.equal(tokens[ATTENTION], tokens["sdpa"])


def test_padding_keys_get_no_weight_in_bf16(tiny_t5: Path) -> None:
    """Appending masked padding to the prompts leaves the logits unchanged (masked keys get
    zero attention weight), where the same padding unmasked moves them by O(1)."""
    ids, mask, dec = _inputs(tiny_t5)
    model = load_policy(str(tiny_t5), full_finetune=True).eval().to(torch.bfloat16)
    wider_ids = torch.nn.functional.pad(ids, (0, 16), value=0)
    wider_mask = torch.nn.functional.pad(mask, (0, 16), value=0)
    unmasked = torch.nn.functional.pad(mask, (0, 16), value=1)
    with torch.no_grad():
        narrow = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        wide = model(input_ids=wider_ids, attention_mask=wider_mask, decoder_input_ids=dec).logits
        leak = model(input_ids=wider_ids, attention_mask=unmasked, decoder_input_ids=dec).logits
    # Zero weights add exact zeros, but a CPU kernel may block a longer key axis otherwise:
    # fp32 sums rounded to bf16 can then differ by an ulp (2^-8 of a value), compounded over
    # the 4 layers: allow 4 ulps of the largest logit. Unmasked padding moves them ~50x more.
    ulps = 4 * 2**-8 * narrow.abs().max().item()
    assert (leak - narrow).abs().max().item() > 10 * ulps
    torch.testing.assert_close(wide, narrow, rtol=0, atol=ulps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_pass_uses_its_own_mask(tiny_t5: Path, dtype: torch.dtype) -> None:
    """Nothing of one pass's mask carries over: a second pass with the same shapes but
    another padding mask gives that mask's logits."""
    ids, mask, dec = _inputs(tiny_t5)
    other = mask.clone()
    other[:, 3:] = 0
    model = load_policy(str(tiny_t5), full_finetune=True).eval().to(dtype)
    fresh = load_policy(str(tiny_t5), full_finetune=True).eval().to(dtype)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        got = model(input_ids=ids, attention_mask=other, decoder_input_ids=dec).logits
        want = fresh(input_ids=ids, attention_mask=other, decoder_input_ids=dec).logits
        first = fresh(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert not torch.equal(want, first)  # the masks matter
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lora_input_cast_is_lossless_under_autocast(tiny_t5: Path) -> None:
    """The trainer switches off peft's cast of LoRA inputs to fp32 under autocast (autocast
    casts them straight back): logits and adapter gradients stay bit for bit the same."""
    from peft.helpers import disable_input_dtype_casting

    ids, mask, dec = _inputs(tiny_t5)
    model = load_policy(str(tiny_t5), full_finetune=True, torch_dtype=torch.bfloat16)
    model = trained_lora(model)
    results = []
    for cast in (True, False):
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            disable_input_dtype_casting(model, active=not cast),
        ):
            results.append(_loss_and_grads(model, ids, mask, dec))
    (want, want_grads), (got, got_grads) = results
    assert want_grads and all(g.abs().max() > 0 for g in want_grads.values())
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name


def test_layers_share_one_combined_bias_per_pass(tiny_t5: Path, monkeypatch) -> None:
    """The bias + mask tensor is built once per pass and reused by the other layers, with
    bit-identical logits and gradients to building it in every layer."""
    from detox_exp.fast import attention as models

    ids, mask, dec = _inputs(tiny_t5)
    model = load_policy(str(tiny_t5), full_finetune=True, torch_dtype=torch.bfloat16).eval()
    model.get_input_embeddings().requires_grad_(False)
    for module in model.modules():  # a frozen position bias, as with LoRA
        if hasattr(module, "relative_attention_bias"):
            module.relative_attention_bias.requires_grad_(False)
    built = []
    from transformers.integrations import sdpa_attention

    real = sdpa_attention.create_position_bias_mask

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "create_position_bias_mask", counting)
    shared, shared_grads = _loss_and_grads(model, ids, mask, dec)
    assert len(built) == 3  # encoder self, decoder self, cross: once each, not per layer
    built.clear()
    monkeypatch.setattr(models, "layer_bias", _uncached_layer_bias)
    per_layer, per_layer_grads = _loss_and_grads(model, ids, mask, dec)
    assert len(built) == 3 * model.config.num_layers
    assert torch.equal(shared, per_layer)
    for name, grad in per_layer_grads.items():
        assert torch.equal(shared_grads[name], grad), name


def _uncached_layer_bias(position_bias, attention_mask, causal, query, key):
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    bias = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
    return bias.to(query.dtype)


def test_trained_bias_and_inference_mode(tiny_t5: Path, monkeypatch) -> None:
    """Full fine-tuning under bf16 autocast (the position bias trains, so it is not cached):
    the bias still reaches the scores in their dtype, bit-identical to building it in every
    layer. And inference-mode passes (no version counters) run."""
    from detox_exp.fast import attention as models

    ids, mask, dec = _inputs(tiny_t5)
    model = load_policy(str(tiny_t5), full_finetune=True).eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        cached, cached_grads = _loss_and_grads(model, ids, mask, dec)
    monkeypatch.setattr(models, "layer_bias", _uncached_layer_bias)
    with autocast:
        per_layer, per_layer_grads = _loss_and_grads(model, ids, mask, dec)
    assert torch.equal(cached, per_layer)
    for name, grad in per_layer_grads.items():
        assert torch.equal(cached_grads[name], grad), name
    monkeypatch.undo()
    with autocast, torch.inference_mode():
        inferred = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(inferred.float(), cached)


def test_bias_that_needs_no_combining_is_not_cached_on_itself() -> None:
    """No mask, not causal: the combined bias is the position bias itself; storing it on
    itself would be a reference cycle that outlives the pass."""
    from detox_exp.fast.attention import layer_bias

    position_bias = torch.zeros(1, 1, 1, 5, dtype=torch.bfloat16)
    query = torch.zeros(2, 1, 1, 4, dtype=torch.bfloat16)
    assert layer_bias(position_bias, None, False, query, query) is position_bias
    assert not hasattr(position_bias, "_detox_layer_bias")


@pytest.mark.parametrize(
    ("case", "lossless"),
    [("plain", True), ("dropout_training", False), ("dora", False), ("no_lora", False)],
)
def test_lora_input_cast_is_kept_where_it_is_not_a_round_trip(
    tiny_t5: Path, case: str, lossless: bool
) -> None:
    from peft import LoraConfig, get_peft_model

    from detox_exp.seq2seq import lossless_cast

    model = load_policy(str(tiny_t5), full_finetune=True)
    if case != "no_lora":
        lora = LoraConfig(r=4, lora_dropout=0.1, target_modules=["q", "v"], use_dora=case == "dora")
        model = get_peft_model(model, lora)
    model.train(case == "dropout_training")
    assert lossless_cast(model) is lossless
