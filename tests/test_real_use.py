"""Real use beyond the demo (issue #29): the classifier trained on the main process of a
multi-process run, fp16 refused for T5, checkpoints resumed on another device layout,
untied embeddings kept untied, LoRA dropout refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from detox_exp import checkpoint
from detox_exp.errors import ConfigError, DataError, bad_input_message
from detox_exp.models import (
    check_lora,
    check_policy_precision,
    check_precision,
    load_policy,
)
from tests.helpers.cli import check_one_line_error
from tests.helpers.run import ROOT, local_overrides, run_cli, run_ranks


def lora(targets="auto", dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, task_type="SEQ_2_SEQ_LM"
    )


# --- 1. stages.train_reward=true on 2 processes ------------------------------------------


@pytest.mark.slow
def test_two_process_demo_trains_the_reward_model_on_the_main_process(
    demo_cache: Path, tmp_path: Path
) -> None:
    """Rank 0 trains the classifier while rank 1 waits, then both load it and run PPO. With
    the classifier trained under accelerate, its DDP wrapper's constructor ran a collective
    rank 1 never joined: a gloo timeout (distributed.timeout_s, here 120 s)."""
    run_dir = tmp_path / "run"
    result = run_ranks(
        "experiment=demo_small",
        "debug=fast",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        "torch_threads=1",
        "ppo.steps=1",
        "ppo.samples_per_prompt=4",  # batch 8 = one group of 4 per process
        "stages.frontier=false",
        "stages.evaluate_before=false",
        "stages.evaluate_after=false",
        "distributed.timeout_s=120",
        nproc=2,
        port=29551,
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "reward_model" / "metrics.json").read_text())
    # trained once, and as well as on one process (tests/test_e2e.py asserts the same)
    assert metrics["reward_model/eval/accuracy"] > 0.75
    assert metrics["reward_model/eval/auroc"] > metrics["reward_model/eval_before/auroc"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1]  # both processes went on to PPO
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward_model/eval/accuracy"] == metrics["reward_model/eval/accuracy"]


def test_accelerate_is_not_imported() -> None:
    """README: accelerate is not used (and it is not a declared dependency)."""
    sources = [p.read_text() for p in (ROOT / "detox_exp").rglob("*.py")]
    assert not any("import accelerate" in s or "from accelerate" in s for s in sources)
    assert "accelerate" not in (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[0]


# --- 2. fp16 with T5 ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["t5", "mt5", "umt5", "longt5"])
def test_fp16_is_refused_for_t5_family(model_type: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    with pytest.raises(ConfigError) as err:
        check_precision(config, "fp16")
    message = bad_input_message(err.value)
    assert message is not None and "\n" not in message
    assert message.startswith("precision: fp16 overflows in ")
    assert "23918" in message and "fix: use precision=bf16" in message
    check_precision(config, "bf16")
    check_precision(config, "fp32")


def test_fp16_is_allowed_for_bart() -> None:
    from transformers import BartConfig

    check_precision(BartConfig(), "fp16")


def test_fp16_is_refused_when_the_t5_policy_loads(tiny_t5: Path) -> None:
    with pytest.raises(ConfigError, match="^precision: fp16 overflows in 't5'"):
        load_policy(str(tiny_t5), lora=lora(), precision="fp16")
    with pytest.raises(ConfigError, match="^precision: "):
        check_policy_precision(str(tiny_t5), "fp16")  # before any stage, from the config
    check_policy_precision(str(tiny_t5 / "not_built_yet"), "fp16")  # left to load_policy
    check_policy_precision(str(tiny_t5), "fp32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 on CPU: refused)")
def test_fp16_t5_demo_is_one_line_on_cuda(demo_cache: Path, tmp_path: Path) -> None:
    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        "device=cuda",
        "precision=fp16",
        "logger=none",
        "stages.train_reward=false",
        f"hydra.run.dir={tmp_path}",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    check_one_line_error(result, "precision: fp16 overflows in 't5'", "precision=bf16")


def test_the_policy_node_passes_the_run_precision(tmp_path: Path) -> None:
    from tests.helpers.config import compose_cfg

    for overrides in ([], ["experiment=demo"], ["model=flan_t5_large", "precision=bf16"]):
        cfg = compose_cfg(overrides, tmp_path)
        assert cfg.model.policy.precision == cfg.precision


# --- 3. resume under DDP -----------------------------------------------------------------


def test_checkpoint_state_loads_onto_the_cpu(tmp_path: Path, monkeypatch) -> None:
    """The main process saves from its own device; every process loads onto the CPU (then
    load_state_dict moves optimizer state to its parameters' device)."""
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    manager = checkpoint.CheckpointManager(tmp_path, every=1)
    path = manager.save(
        1, {"w": param}, {"optimizer": optimizer.state_dict(), "x": torch.arange(3)}, {}
    )
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    tensors, state, _ = checkpoint.load(path)
    assert seen == ["cpu"]
    assert tensors["w"].device.type == state["x"].device.type == "cpu"
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], torch.ones(3) * 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_saved_on_cuda_resumes_where_the_parameters_are(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(3, device="cuda"))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3, device="cuda")
    optimizer.step()
    tensors = {"w": param}
    state = {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()}
    path = checkpoint.CheckpointManager(tmp_path, every=1).save(1, tensors, state, {})
    tensors, state, _ = checkpoint.load(path)
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    other = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    fresh = torch.optim.Adam([other], lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    assert fresh.state_dict()["state"][0]["exp_avg"].device == other.device
    checkpoint.set_rng_state(state["rng"])


def test_cuda_rng_states_restored_only_for_present_devices(monkeypatch) -> None:
    """A checkpoint written on 4 GPUs, resumed by a process that sees 1: one CUDA state set
    (set_rng_state_all would index devices 1-3, which do not exist)."""
    calls = []

    def set_all(states):
        raise AssertionError(f"{len(states)} CUDA states for 1 device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append((s.device, i)))
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: [torch.zeros(8, dtype=torch.uint8)] * 4
    )
    state = checkpoint.rng_state()
    assert len(state["cuda"]) == 4
    checkpoint.set_rng_state(state)
    assert calls == [(torch.device("cpu"), 0)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    calls.clear()
    checkpoint.set_rng_state(state)
    assert calls == []


# --- 6. untied embeddings stay untied ------------------------------------------------------


def save_untied_t5(out: Path, lm_head: bool) -> Path:
    """A tiny T5 whose config.json says ``tie_word_embeddings: false`` (as FLAN-T5's), with
    an lm_head.weight of its own, or (``lm_head=False``) none stored."""
    from safetensors.torch import load_file, save_file

    from detox_exp.demo.assets import random_t5

    torch.manual_seed(0)
    random_t5(64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    weights.pop("lm_head.weight", None)
    if lm_head:
        weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((out / "config.json").read_text())
    raw |= {"tie_word_embeddings": False, "scale_decoder_outputs": False}
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.fixture()
def untied_t5(tiny_t5: Path, tmp_path: Path) -> Path:
    from transformers import AutoTokenizer

    out = save_untied_t5(tmp_path / "untied", lm_head=True)
    AutoTokenizer.from_pretrained(tiny_t5).save_pretrained(out)
    return out


def test_untied_checkpoint_loads_untied(untied_t5: Path) -> None:
    from safetensors.torch import load_file

    stored = load_file(untied_t5 / "model.safetensors")
    for full in (False, True):
        model = load_policy(str(untied_t5), lora=lora(), full_finetune=full)
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        assert out.weight.data_ptr() != inp.weight.data_ptr()
        assert torch.equal(out.weight, stored["lm_head.weight"])


def test_untied_config_with_a_tied_load_is_refused(untied_t5: Path, monkeypatch) -> None:
    """Forced tie (as a loader that ignores tie_word_embeddings=false would do it)."""
    from detox_exp import models

    real = models.AutoModelForSeq2SeqLM.from_pretrained

    def tied(*args, **kwargs):
        model = real(*args, **kwargs)
        model.lm_head.weight = model.shared.weight
        return model

    monkeypatch.setattr(models.AutoModelForSeq2SeqLM, "from_pretrained", tied)
    with pytest.raises(DataError) as err:
        load_policy(str(untied_t5), lora=lora())
    message = str(err.value)
    assert message.startswith("model.name_or_path: ") and "\n" not in message
    assert "tie_word_embeddings=false" in message and "fix: " in message


def test_untied_config_without_an_lm_head_is_refused(tmp_path: Path) -> None:
    """config.json says untied but no lm_head.weight is stored: transformers 5 ties the
    missing head to the embedding (T5Config always says tie_word_embeddings=True)."""
    path = save_untied_t5(tmp_path / "headless", lm_head=False)
    with pytest.raises(DataError, match="lm_head was loaded as the shared input embedding"):
        load_policy(str(path), lora=lora())


# --- 9. LoRA dropout -----------------------------------------------------------------------


def test_nonzero_lora_dropout_is_refused() -> None:
    for lora_config in ({"r": 8, "lora_alpha": 8, "lora_dropout": 0.05}, lora(dropout=0.1)):
        with pytest.raises(ConfigError, match="^model.lora.lora_dropout: must be 0, got 0"):
            check_lora(lora_config)
    check_lora({"r": 8, "lora_alpha": 8, "lora_dropout": 0})
    check_lora(lora(dropout=0.0))


def test_model_configs_have_no_lora_dropout(tmp_path: Path) -> None:
    from tests.helpers.config import compose_cfg

    for name in sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")):
        cfg = compose_cfg([f"model={name}"], tmp_path)
        assert cfg.model.lora.lora_dropout == 0 and cfg.model.lora.target_modules == "auto"


def test_nonzero_lora_dropout_through_the_cli(standins, tmp_path: Path) -> None:
    overrides = local_overrides(standins, tmp_path) + ["model.lora.lora_dropout=0.05"]
    check_one_line_error(run_cli(*overrides, cwd=ROOT), "model.lora.lora_dropout", "must be 0")
    assert not (tmp_path / "data").exists()  # refused before any stage
