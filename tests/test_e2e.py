"""End-to-end: the real entrypoint on the offline demo at test size (experiment=demo_small,
debug=fast), in a subprocess (the demo run itself in a fresh ``python -m detox_exp``, the
others forked from a pre-imported one)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from detox_exp.run_config import STAGES
from tests.helpers.run import ROOT, run_cli
from tests.wandb_file import read_wandb_records

pytestmark = pytest.mark.slow

SUMMARY_KEYS = [
    f"eval/{phase}/{name}"
    for phase in ("before", "after")
    for name in ("toxicity_mean", "toxicity_std", "toxic_fraction", "rouge_l")
]


@pytest.fixture(scope="module")
def demo_run(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo_run")
    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        f"hydra.run.dir={run_dir}",
        "logger.wandb.mode=offline",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
        fresh=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout)
    (run_dir / "stderr.txt").write_text(result.stderr)
    return run_dir


def test_summary_has_before_and_after_metrics(demo_run: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
        assert isinstance(summary[key], float)
    assert 0.0 <= summary["eval/before/toxicity_mean"] <= 1.0
    assert summary["reward_model/eval/accuracy"] > 0.75  # clearly above chance (0.5)
    assert summary["perf/median_step_s"] > 0 and summary["perf/peak_rss_mb"] > 100


def test_metrics_jsonl_has_every_ppo_step(demo_run: Path) -> None:
    from detox_exp import metric_names as M

    lines = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if M.KL in line]
    assert steps == [1, 2]
    for line in lines:
        if M.KL in line:  # the demo: GRPO, 8 samples per prompt
            for key in M.PPO_STEP_METRICS + M.GROUP_STEP_METRICS:
                assert key in line, key
            assert not any(key in line for key in M.CRITIC_STEP_METRICS)


def test_policy_saved_and_loadable(demo_run: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    merged = demo_run / "policy" / "merged"
    model = AutoModelForSeq2SeqLM.from_pretrained(merged)
    assert model.config.is_encoder_decoder
    assert not (demo_run / "policy" / "value_head.safetensors").exists()  # RLOO: no critic
    assert (demo_run / "policy" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("folder, library", [("merged", "transformers"), ("adapter", "peft")])
def test_model_cards_name_what_was_used(demo_run: Path, folder: str, library: str) -> None:
    """Each saved folder's card, as the hub reads it: front matter with the library and the
    held-out evaluation as a model-index; the reward model PPO used (the run's own trained
    classifier, not the untrained one the config starts from); not peft's template."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(demo_run / "policy" / folder / "README.md")
    summary = json.loads((demo_run / "summary.json").read_text())
    assert card.data.library_name == library
    assert "detox_exp" in card.data.tags
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["toxicity_mean"] == summary["eval/after/toxicity_mean"]
    assert results["rouge_l"] == summary["eval/after/rouge_l"]
    assert card.data.base_model is None  # a local path is no hub id
    assert card.text.lstrip().startswith("# detox_exp PPO policy")
    assert f"- reward model: `{demo_run / 'reward_model'}`" in card.text
    assert "More Information Needed" not in card.content


def test_console_shows_stages_table_and_final_lines_not_library_noise(demo_run: Path) -> None:
    out = (demo_run / "stdout.txt").read_text()
    err = (demo_run / "stderr.txt").read_text()
    assert "| toxicity_mean |" in out and "W&B run:" in out and str(demo_run) in out
    for number, stage in enumerate(STAGES, start=1):
        assert f"stage {number}/{len(STAGES)}: {stage}" in out, stage
    (folder,) = demo_run.glob("wandb/offline-run-*")
    assert out.rstrip().endswith(f"upload it with: wandb sync {folder}")
    # no datasets / transformers bars, warnings or library log lines on the console (CI: no
    # terminal, so no bars of our own either); the log file keeps the library lines
    assert err.strip() == "", err[-3000:]
    assert not any("Warning" in line for line in out.splitlines()), out[-3000:]
    # which library speaks (a warning, a log line) varies with its version: any will do
    loggers = re.findall(r"^\[[^]]+\]\[([^]]+)\]", (demo_run / "cli.log").read_text(), re.M)
    assert any(not name.startswith("detox_exp") for name in loggers), sorted(set(loggers))


def test_offline_wandb_run_is_whole(demo_run: Path) -> None:
    """The offline run file of a run of real size (its summary has as many keys as the
    shipped demo's, over W&B's 100-key limit on artifact metadata) holds the config, every
    step, the final summary (the stage times come last), the metric definitions and the
    model artifact, and the exit code."""
    from detox_exp import metric_names as M
    from tests.wandb_file import read_artifacts, read_metric_definitions

    summary = json.loads((demo_run / "summary.json").read_text())
    assert len(summary) >= 150
    files = list(demo_run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    config = records["config"]
    assert config["task_name"] == "debug" and config["ppo"]["steps"] == 2
    assert "objective/kl" in records["history_keys"]
    assert set(summary) <= records["summary_keys"]
    assert any(k.startswith("time/stage/") for k in summary)
    assert records["exit_code"] == 0
    assert read_metric_definitions(files[0])["objective/*"]["step_metric"] == "step"
    (model,) = [a for a in read_artifacts(files[0]) if a["type"] == "model"]
    assert "README.md" in model["paths"] and "model.safetensors" in model["paths"]
    metadata = model["metadata"]
    assert metadata["reward_model"] == str(demo_run / "reward_model")
    assert metadata[M.eval_key("after", "toxicity_mean")] == summary["eval/after/toxicity_mean"]
    assert metadata["advantage_estimator"] == "rloo" and len(metadata) <= 100


def test_standalone_evaluation_of_a_saved_policy(
    demo_run: Path, demo_cache: Path, tmp_path: Path
) -> None:
    """Evaluation only, on the saved merged policy and the trained reward model."""
    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        "stages.train_reward=false",
        "stages.ppo=false",
        "stages.evaluate_after=false",
        f"model.name_or_path={demo_run}/policy/merged",
        f"reward.name_or_path={demo_run}/reward_model",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    original = json.loads((demo_run / "summary.json").read_text())
    assert "eval/after/toxicity_mean" not in summary and not (tmp_path / "metrics.jsonl").exists()
    # the same prompts and sampling seed as the original run's "after" evaluation
    assert summary["eval/before/toxicity_mean"] == pytest.approx(
        original["eval/after/toxicity_mean"], abs=0.1
    )


@pytest.mark.parametrize("ppo", ["grpo", "default"])
def test_other_estimators_run_end_to_end(
    demo_run: Path, demo_cache: Path, tmp_path: Path, ppo: str
) -> None:
    """`detox-exp experiment=demo ppo=grpo` (critic-free) and `ppo=default` (GAE, here with
    the demo's 8 samples per prompt sharing one encoder pass), with the reward model that
    demo_run trained."""
    from detox_exp import metric_names as M

    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        "logger=none",
        f"ppo={ppo}",
        "stages.train_reward=false",
        f"reward.name_or_path={demo_run}/reward_model",
        f"hydra.run.dir={tmp_path}",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    critic = ppo == "default"
    for line in lines:
        assert 0.0 <= line[M.GROUP_ZERO_STD] <= 1.0 and line[M.GROUP_REWARD_STD] >= 0.0
        assert (M.LOSS_VALUE in line) == critic and line[M.KL] >= 0.0
    assert (tmp_path / "policy" / "value_head.safetensors").exists() == critic
    config = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert f"advantage_estimator: {'gae' if critic else ppo}" in config
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "eval/delta/distinct_2_ci_low" in summary
