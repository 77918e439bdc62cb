"""Other Hugging Face seq2seq policies than T5: tiny random BART and mT5 checkpoints through
the real entrypoint (GAE and RLOO), ``model.lora.target_modules: auto`` and its errors, and
the T5-only fast paths switching themselves off."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from detox_exp.errors import ConfigError
from detox_exp.models import AUTO_TARGETS, load_policy, resolve_targets
from tests.helpers.cli import check_one_line_error
from tests.helpers.run import ROOT, local_overrides, run_cli


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny BART with a RoBERTa-style byte-level BPE tokenizer (BART's own
    conventions: <s>=0, <pad>=1, </s>=2, the decoder starts with </s>)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from detox_exp.demo.assets import roberta_tokenizer
    from detox_exp.demo.corpus import generate_dialogues

    out = tmp_path_factory.mktemp("tiny_bart")
    dialogues = generate_dialogues(200, seed=0)
    texts = [d["dialogue"] for d in dialogues] + [d["summary"] for d in dialogues]
    tokenizer = roberta_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=512,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    BartForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_mt5(tiny_t5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny mT5 with an untied lm_head, as google/mt5-* checkpoints have
    (``tie_word_embeddings: false`` and a stored lm_head.weight), and tiny_t5's tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, MT5Config, MT5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny_mt5")
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    torch.manual_seed(0)
    config = MT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        d_kv=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    MT5ForConditionalGeneration(config).save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"]) * 0.05
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(raw | {"tie_word_embeddings": False}))
    tokenizer.save_pretrained(out)
    return out


def lora(targets) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_2_SEQ_LM")


@pytest.mark.parametrize(
    ("arch", "expected"), [("tiny_t5", {"q", "v"}), ("tiny_mt5", {"q", "v"}), ("tiny_bart", None)]
)
def test_auto_targets_the_attention_query_and_value(arch: str, expected, request) -> None:
    path = request.getfixturevalue(arch)
    model = load_policy(str(path), lora=lora("auto"))
    config = model.peft_config[model.active_adapter]
    assert set(config.target_modules) == (expected or {"q_proj", "v_proj"})
    params = [n for n, _ in model.named_parameters() if ".lora_A" in n]
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in params} == config.target_modules


def test_t5_targets_on_bart_are_one_line_listing_its_linear_layers(tiny_bart: Path) -> None:
    """The old default [q, v] on BART: peft's NoMatchingPeftModuleError (exit 1) before."""
    with pytest.raises(ConfigError) as err:
        load_policy(str(tiny_bart), lora=lora(["q", "v"]))
    message = str(err.value)
    assert message.startswith("model.lora.target_modules: ") and "\n" not in message
    assert "'q', 'v'" in message and "q_proj" in message and "fc1" in message
    assert "fix: use target_modules=auto" in message


def test_targets_partly_unknown_and_regex() -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        )
    )
    assert resolve_targets(bart, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert resolve_targets(bart, r".*decoder.*\.q_proj") == r".*decoder.*\.q_proj"
    assert resolve_targets(bart, "all-linear") == "all-linear"
    with pytest.raises(ConfigError, match="matches 'o_proj'"):
        resolve_targets(bart, ["q_proj", "o_proj"])
    with pytest.raises(ConfigError, match="no module of this 'bart' model matches '"):
        resolve_targets(bart, r".*\.q")  # a regex: full match of module names
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # no query / value projections
    with pytest.raises(ConfigError, match="auto finds no attention"):
        resolve_targets(plain, "auto")
    assert AUTO_TARGETS[0] == ("q", "v")


def test_fast_paths_switch_off_for_bart_with_one_info_line(tiny_bart: Path, caplog) -> None:
    from detox_exp.fast import t5_decoding

    caplog.set_level(logging.INFO, logger="detox_exp.models")
    model = load_policy(str(tiny_bart), lora=lora("auto"))
    lines = [r.getMessage() for r in caplog.records if "fast." in r.getMessage()]
    assert len(lines) == 1 and "'bart'" in lines[0] and "T5 / mT5 only" in lines[0]
    ids = torch.tensor([[0, 5, 6, 2]])
    hidden = model.get_encoder()(input_ids=ids).last_hidden_state
    assert t5_decoding.prepare(model.eval(), hidden, torch.ones_like(ids), 4) is None


@pytest.mark.slow
@pytest.mark.parametrize("ppo", ["default", "rloo"])
@pytest.mark.parametrize("arch", ["tiny_bart", "tiny_mt5"])
def test_policy_runs_end_to_end(arch: str, ppo: str, standins, tmp_path: Path, request) -> None:
    """`detox-exp model.name_or_path=<a BART / mT5 checkpoint>` with the default LoRA
    targets (auto), PPO with GAE and RLOO: trains, evaluates and saves."""
    path = request.getfixturevalue(arch)
    overrides = [o for o in local_overrides(standins, tmp_path) if "model.name_or_path" not in o]
    result = run_cli(*overrides, f"model.name_or_path={path}", f"ppo={ppo}", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(line["objective/kl"])) for line in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "eval/after/toxicity_mean" in summary
    adapter = json.loads((tmp_path / "policy/adapter/adapter_config.json").read_text())
    expected = {"q_proj", "v_proj"} if arch == "tiny_bart" else {"q", "v"}
    assert set(adapter["target_modules"]) == expected
    assert (tmp_path / "policy/merged/config.json").is_file()
    assert (tmp_path / "policy/value_head.safetensors").is_file() == (ppo == "default")


def test_t5_targets_on_bart_through_the_cli(tiny_bart: Path, standins, tmp_path: Path) -> None:
    overrides = [o for o in local_overrides(standins, tmp_path) if "model.name_or_path" not in o]
    result = run_cli(
        *overrides, f"model.name_or_path={tiny_bart}", "model.lora.target_modules=[q,v]", cwd=ROOT
    )
    check_one_line_error(result, "model.lora.target_modules", "q_proj")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_bart_runs_on_cuda(tiny_bart: Path, standins, tmp_path: Path) -> None:
    """fp16 is refused for T5 only: a BART policy trains with it (grad scaler on)."""
    overrides = [o for o in local_overrides(standins, tmp_path) if "model.name_or_path" not in o]
    overrides = [o for o in overrides if o != "device=cpu"]
    result = run_cli(
        *overrides, f"model.name_or_path={tiny_bart}", "device=cuda", "precision=fp16", cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
