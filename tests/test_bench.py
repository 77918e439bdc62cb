"""The benchmark experiment on a DIR from scripts/make_bench_dir.py writes its perf numbers."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from tests.helpers.run import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_bench_experiment(tmp_path: Path, monkeypatch, capsys) -> None:
    bench = tmp_path / "bench"
    # `python scripts/make_bench_dir.py ...`, run as __main__ in this process (where its
    # imports are loaded already: a fresh interpreter would spend ~10 s on them)
    argv = ["make_bench_dir.py", "--size", "small", "--out", str(bench), "--prompts", "40"]
    monkeypatch.setattr(sys, "argv", argv)
    script = runpy.run_path(str(ROOT / "scripts" / "make_bench_dir.py"), run_name="__main__")
    # the policy has the shape the size names, and the count printed is the saved model's
    from transformers import AutoModelForSeq2SeqLM

    policy = AutoModelForSeq2SeqLM.from_pretrained(bench / "policy")
    for key, value in script["SIZES"]["small"]["t5"].items():
        assert getattr(policy.config, key) == value, key
    n_params = sum(p.numel() for p in policy.parameters())
    printed = re.search(r"policy ([\d.]+)M parameters, (\d+) prompts", capsys.readouterr().out)
    assert printed is not None
    assert printed.group(1) == f"{n_params / 1e6:.1f}"
    n_prompts = len((bench / "prompts.jsonl").read_text().splitlines())
    assert int(printed.group(2)) == n_prompts and 0 < n_prompts <= 40
    tokenizer = json.loads((bench / "policy" / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"  # trl 0.11.4 loads it
    result = run_cli(
        "experiment=bench",
        f"model.name_or_path={bench}/policy",
        f"reward.name_or_path={bench}/reward",
        "dataset=jsonl",
        f"dataset.path={bench}/prompts.jsonl",
        "ppo.steps=3",
        f"hydra.run.dir={tmp_path}/run",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["perf/samples_per_s"] == pytest.approx(16 / summary["perf/median_step_s"])
    assert summary["perf/peak_rss_mb"] > 100
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["tokens/response_len_mean"] == 32 for x in lines)  # exactly 32 new tokens
    assert not (tmp_path / "run" / "eval").exists()  # no evaluation
