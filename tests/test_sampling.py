"""The KV-cached sampling loop: same warping as transformers, exact inverse-CDF sampling,
greedy decoding identical to ``generate``, and exact EOS masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from detox_exp.errors import ConfigError
from detox_exp.generation import make_sampling, sample_from_logits, sample_responses
from tests.helpers.decoding import (
    assert_greedy_with_adapter_equals_generate,
    assert_same_tokens,
    lora_model,
    prompt_batch,
)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.5), (1.0, 0, 0.01)],
)
def test_warp_matches_transformers(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    ours = make_sampling({"temperature": temperature, "top_k": top_k, "top_p": top_p}).warp(
        logits, step=0, eos_id=1
    )
    hf = LogitsProcessorList()
    if temperature != 1.0:
        hf.append(TemperatureLogitsWarper(temperature))
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        hf.append(TopPLogitsWarper(top_p))
    theirs = hf(torch.zeros(8, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert (~torch.isinf(ours)).sum(1).min() >= 1  # at least one token always survives


def test_min_new_tokens_bans_eos_only_before_the_minimum() -> None:
    logits = torch.zeros(2, 6)
    sampling = make_sampling({"min_new_tokens": 3})
    assert torch.isinf(sampling.warp(logits, step=2, eos_id=1)[:, 1]).all()
    assert not torch.isinf(sampling.warp(logits, step=3, eos_id=1)).any()
    assert not torch.isinf(logits).any()  # the input is not modified


def test_inverse_cdf_sampling_has_the_right_frequencies() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().expand(200_000, -1)  # log(0) = -inf: never drawn
    generator = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, generator)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[1] == 0
    # binomial standard error <= 0.0012; 5 sigma
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.006)


@pytest.mark.parametrize(
    ("gen", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": 0}, "temperature"),
        ({"num_beams": 4}, "num_beams"),
    ],
)
def test_impossible_settings_name_the_field(gen: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"eval\.generation\.{field}"):
        make_sampling(gen, "eval.generation")


def test_greedy_decoding_equals_generate(tiny_t5: Path) -> None:
    model, tokenizer, ids, mask = prompt_batch(tiny_t5)
    ours, ours_mask = sample_responses(
        model, tokenizer, ids, mask, {"do_sample": False, "max_new_tokens": 12}
    )
    theirs = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=0
    )[:, 1:]
    assert_same_tokens(ours, theirs, tokenizer.pad_token_id)
    assert ours_mask.shape[1] <= 12


def test_sampled_responses_respect_lengths_and_eos(tiny_t5: Path) -> None:
    model, tokenizer, ids, mask = prompt_batch(tiny_t5)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    gen = {"max_new_tokens": 10, "min_new_tokens": 4, "top_k": 0, "top_p": 1.0}
    for _ in range(5):
        response, rmask = sample_responses(model, tokenizer, ids, mask, gen)
        assert response.shape == rmask.shape and response.shape[1] <= 10
        assert not (response[:, :4] == eos).any()  # min_new_tokens
        for row, row_mask in zip(response, rmask, strict=True):
            n = int(row_mask.sum())
            assert (row[n:] == pad).all()  # pad after the first EOS
            assert (row[: n - 1] != eos).all()  # no EOS before the end of the kept tokens
            assert n == len(row) or row[n - 1] == eos


def _q_weight(model) -> torch.Tensor:
    return model.get_base_model().decoder.block[0].layer[0].SelfAttention.q.base_layer.weight


def test_folded_adapter_gives_the_same_logits_and_restores_weights(tiny_t5: Path) -> None:
    from detox_exp.fast.lora_fold import folded_adapter

    model, _, ids, mask = lora_model(tiny_t5)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    dec = torch.randint(2, 300, (ids.shape[0], 6))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        with folded_adapter(model):
            got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            assert (
                base.decoder.block[0].layer[0].SelfAttention.q.base_layer.weight.requires_grad
                is False
            )
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    # (W + sBA) x vs Wx + sB(Ax): fp32 reassociation only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, param in model.named_parameters():
        original, values = before[name]
        assert param is original and torch.equal(param, values), name


@pytest.mark.parametrize("case", ["autocast", "bf16_weights", "adapter_disabled"])
def test_folding_is_skipped_where_it_would_be_wrong(tiny_t5: Path, case: str) -> None:
    """In bf16 / under autocast, W + delta would round small updates away; inside
    disable_adapter() folding would switch the adapter back on."""
    from detox_exp.fast.lora_fold import folded_adapter

    model, _, _, _ = lora_model(tiny_t5, torch.bfloat16 if case == "bf16_weights" else None)
    original = _q_weight(model)
    outer = {
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
        "bf16_weights": torch.autocast("cpu", enabled=False),
        "adapter_disabled": model.disable_adapter(),
    }[case]
    with outer, folded_adapter(model):
        assert _q_weight(model) is original


def test_sampling_loop_with_a_trained_adapter_equals_generate(tiny_t5: Path) -> None:
    assert_greedy_with_adapter_equals_generate(tiny_t5, "cpu")
