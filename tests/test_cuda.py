"""The CPU suite's key checks again on CUDA (skipped without a GPU): the step decoder and the
sampling loop compute what the transformers model computes, and the real entrypoint runs the
demo end to end in fp32, bf16 and fp16 with finite results and the GPU numbers it reports.

Run on a GPU machine with ``pytest tests/test_cuda.py`` (the demo runs are marked slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from detox_exp import metric_names as M
from detox_exp.models import load_policy
from tests.helpers.decoding import (
    assert_bf16_error_within_bf16_rounding,
    assert_greedy_with_adapter_equals_generate,
    decoding_batch,
    step_logits,
    teacher_tokens,
)
from tests.helpers.run import ROOT, run_cli, trained_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def test_step_decoder_matches_the_model_on_cuda(tiny_t5: Path) -> None:
    _, ids, mask = decoding_batch(tiny_t5, "cuda")
    model = trained_lora(load_policy(str(tiny_t5), full_finetune=True)).to(CUDA)
    tokens = teacher_tokens(ids).to(CUDA)
    want = step_logits(model, ids, mask, tokens, fast=False)
    got = step_logits(model, ids, mask, tokens, fast=True)
    assert got.device.type == "cuda"
    assert want.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_bf16_step_decoder_error_is_within_bf16_rounding_on_cuda(tiny_t5: Path) -> None:
    assert_bf16_error_within_bf16_rounding(tiny_t5, "cuda")


def test_greedy_sampling_equals_generate_on_cuda(tiny_t5: Path) -> None:
    """The sampling loop (step decoder, LoRA folded) picks generate()'s tokens."""
    assert_greedy_with_adapter_equals_generate(tiny_t5, "cuda")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16: refused for T5 (test_real_use)
def test_demo_runs_on_cuda(precision: str, demo_cache: Path, tmp_path: Path) -> None:
    """The whole pipeline (reward training, evaluation before / after, PPO) on the GPU."""
    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        "device=cuda",
        f"precision={precision}",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for phase in ("before", "after"):
        for name in ("toxicity_mean", "rouge_l"):
            assert math.isfinite(summary[f"eval/{phase}/{name}"]), (phase, name)
    assert summary[M.PEAK_CUDA_MB] > 1
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert math.isfinite(step[M.KL]) and step[M.KL] >= 0
        assert math.isfinite(step[M.LOSS_POLICY])
