"""The real experiment's loading path, offline: tiny stand-ins planted in a temporary Hugging
Face cache under the real ids, then ``experiment=flan_t5_dialogsum debug=fast`` with
``ppo=default`` and ``ppo=grpo`` (the two jobs of one multirun)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.run import ROOT, run_cli

pytestmark = pytest.mark.slow

SHA = "0123456789abcdef0123456789abcdef01234567"


def plant(hub: Path, kind: str, repo_id: str, files_from: Path) -> Path:
    """hub/<kind>--ORG--NAME/snapshots/SHA/ + refs/main holding SHA (the HF cache layout)."""
    root = hub / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / SHA
    shutil.copytree(files_from, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    return snapshot


PPO = ("default", "grpo")  # the jobs of the multirun, in order


@pytest.fixture(scope="module")
def hub_sweep(standins, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``experiment=flan_t5_dialogsum debug=fast`` with each of ``PPO``, as the jobs of one
    multirun: one fresh interpreter (the HF_* settings are read at import) for both."""
    from detox_exp.demo.corpus import generate_dialogues

    tmp_path = tmp_path_factory.mktemp("hub")
    hub = tmp_path / "hf" / "hub"
    plant(hub, "models", "google/flan-t5-base", standins["policy"])
    plant(hub, "models", "facebook/roberta-hate-speech-dynabench-r4-target", standins["reward"])
    data = tmp_path / "dialogsum"
    data.mkdir()
    for split, n, seed in (("train", 60, 11), ("validation", 10, 12), ("test", 20, 13)):
        with open(data / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "dialogue", "summary", "topic"])
            writer.writeheader()
            for row in generate_dialogues(n, seed=seed):
                writer.writerow(row | {"id": f"{split}_{row['id']}"})
    plant(hub, "datasets", "knkarthick/dialogsum", data)

    sweep = tmp_path / "sweep"
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
    }
    result = run_cli(
        "-m",
        "experiment=flan_t5_dialogsum",
        "debug=fast",
        "logger=none",
        "device=cpu",
        f"hydra.sweep.dir={sweep}",
        f"ppo={','.join(PPO)}",
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert sorted((r["job"], r["status"]) for r in rows) == [(0, "ok"), (1, "ok")], rows
    return sweep


@pytest.mark.parametrize("ppo", PPO)
def test_flan_t5_dialogsum_loads_by_hub_id_offline(hub_sweep: Path, ppo: str) -> None:
    run_dir = hub_sweep / str(PPO.index(ppo))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "eval/before/toxicity_mean" in summary and "eval/after/rouge_l" in summary
    # debug=fast: the frontier runs and is written, the beta is the fixed 1 (conf/debug/fast)
    assert (run_dir / "frontier/frontier.jsonl").is_file() and summary["frontier/beta"] == 1.0
    assert "eval/optimum/toxicity_mean" in summary  # 4 samples per held-out prompt
    eval_ids = {json.loads(x)["id"] for x in (run_dir / "data/eval.jsonl").read_text().splitlines()}
    train_ids = {
        json.loads(x)["id"] for x in (run_dir / "data/train.jsonl").read_text().splitlines()
    }
    assert all(i.startswith("test_") for i in eval_ids)  # held out = the test split
    assert all(i.startswith("train_") for i in train_ids)
    card = (run_dir / "policy/merged/README.md").read_text()
    assert (
        "google/flan-t5-base" in card and "facebook/roberta-hate-speech-dynabench-r4-target" in card
    )
    assert "k1 in the reward" in card
    critic = (run_dir / "policy/value_head.safetensors").is_file()
    assert critic == (ppo == "default")  # group estimators have no value head
    if ppo == "grpo":
        assert "advantages grpo" in card
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all("ppo/group/zero_std_fraction" in line for line in lines if "step" in line)


def test_fused_gelu_matches_the_original_activation(tiny_t5: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from detox_exp.fast.activations import fuse_activations

    original = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    fused = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    assert (
        fuse_activations(fused) == original.config.num_layers + original.config.num_decoder_layers
    )
    ids = torch.randint(2, 300, (3, 20))
    dec = torch.randint(2, 300, (3, 7))
    with torch.no_grad():
        want = original(input_ids=ids, decoder_input_ids=dec).logits
        got = fused(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    x = torch.linspace(-6, 6, 1001)
    from transformers.activations import NewGELUActivation

    torch.testing.assert_close(
        fused.decoder.block[0].layer[2].DenseReluDense.act(x),
        NewGELUActivation()(x),
        rtol=0,
        atol=1e-6,
    )
