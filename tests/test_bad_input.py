"""Bad input: exit code 2 and ONE line on stderr naming the field and the fix.

Three cases run the real entrypoint (a refusal while composing, one inside the job, one of a
multirun's launcher), for the exit code and the one line on stderr. The others are checked in
process: the config composed as the CLI composes it, then what ``pipeline.run`` does before
its stages do any work, and the line the CLI would print for the error it stops with
(tests/helpers/cli.py: ``check_error_line`` makes the checks ``check_one_line_error`` makes
on a run's stderr)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.cli import check_error_line, check_one_line_error
from tests.helpers.config import compose_cfg
from tests.helpers.run import ROOT, local_overrides, run_cli


def bad_jsonl(tmp_path: Path, records: list, raw: str | None = None) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records))
    return path


# Overrides for the entrypoint called in this process (cli.main): Hydra leaves logging as it
# is. Its logging set-up closes every handler ever made, absl's too (rouge_score's, made by
# an evaluation earlier in this process), and that closes the stream that was sys.stderr
# when absl was imported: pytest's capture.
IN_PROCESS = ["hydra.job_logging.root=null", "hydra.hydra_logging.root=null"]


def refusal(overrides: list[str], tmp_path: Path) -> BaseException:
    """The error a run with ``overrides`` stops with, in process: the config composed as the
    CLI composes it; the checks ``pipeline.run`` runs before any stage (check_run_config,
    check_data_files); then what the stages build from the config, in the pipeline's order:
    the tokenizer, the prepared prompts, the reward scorer and the policy (no training,
    sampling or evaluation, no file written)."""
    from detox_exp.run_config import build, check_data_files, check_run_config

    with pytest.raises(Exception) as info:  # noqa: B017 - whatever the CLI would see
        cfg = compose_cfg(overrides, tmp_path)
        check_run_config(cfg)
        check_data_files(cfg)
        tokenizer = build(cfg.model.tokenizer)
        build(cfg.dataset).prepare(tokenizer)
        build(cfg.reward.scorer, name_or_path=str(cfg.reward.name_or_path))
        build(cfg.model.policy)
    return info.value


# --- through the real CLI: the exit code and the one line on stderr -------------------------


def test_unknown_config_option(tmp_path: Path) -> None:
    result = run_cli("experiment=demo", "ppo.lerning_rate=1", f"hydra.run.dir={tmp_path}", cwd=ROOT)
    check_one_line_error(result, "ppo.lerning_rate", "did you mean ppo.optimizer.lr?")


def test_impossible_value_before_any_stage(tmp_path: Path, standins) -> None:
    """Refused inside the job (Hydra's "Error executing job" line held back), before any
    stage. The other impossible values (model.lora.r=0, seed=abc, eval.num_prompts=0, ...):
    test_types_and_ranges_of_every_group, on the check that ``pipeline.run`` runs first."""
    overrides = local_overrides(standins, tmp_path) + ["ppo.mini_batch_size=3"]
    result = run_cli(*overrides, cwd=ROOT)
    check_one_line_error(result, "ppo.mini_batch_size")
    assert not (tmp_path / "data").exists()  # before any stage: no data prepared
    assert "train" not in result.stdout.lower()  # nor a stage's log lines


def test_slurm_launcher_without_slurm(tmp_path: Path) -> None:
    # without the plugin: install the extra; with it but no cluster: srun is missing
    if shutil.which("srun") or shutil.which("sbatch"):
        pytest.skip("SLURM is reachable here: the sweep would be submitted")
    result = run_cli(
        "-m", "hydra/launcher=slurm", "experiment=demo", f"hydra.sweep.dir={tmp_path}", cwd=ROOT
    )
    message = check_one_line_error(result, "hydra/launcher")
    assert "pip install -e '.[slurm]'" in message or "srun not found" in message


# --- in process: the composed config and the error the run would stop with -----------------


def test_unknown_group_option(tmp_path: Path) -> None:
    check_error_line(refusal(["model=flan_t5_tiny"], tmp_path), "model", "flan_t5_base")


def test_cuda_without_cuda(tmp_path: Path, standins) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    overrides = local_overrides(standins, tmp_path) + ["device=cuda"]
    check_error_line(refusal(overrides, tmp_path), "device", "device=cpu")


def test_missing_dataset_file(tmp_path: Path, standins) -> None:
    overrides = local_overrides(standins, tmp_path) + [f"dataset.path={tmp_path}/nope.jsonl"]
    check_error_line(refusal(overrides, tmp_path), "dataset.path", "not found")


def test_jsonl_without_a_path(tmp_path: Path, standins) -> None:
    # dataset=jsonl builds on dialogsum: its hub id must not survive as the path
    overrides = [o for o in local_overrides(standins, tmp_path) if "dataset.path" not in o]
    check_error_line(refusal(overrides, tmp_path), "dataset.path", "is not set")


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path: Path, standins) -> None:
    good = json.dumps({"id": "a", "dialogue": "x" * 300, "summary": "s", "topic": "t"})
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((good + "\n" + good.replace("x", "\u00e9", 1) + "\n").encode("latin-1"))
    overrides = local_overrides(standins, tmp_path) + [f"dataset.path={path}"]
    check_error_line(refusal(overrides, tmp_path), "latin1.jsonl", "line 2", "not UTF-8")


def test_csv_that_is_not_utf8_names_the_offset(tmp_path: Path, standins) -> None:
    path = tmp_path / "latin1.csv"
    raw = "id,dialogue,summary,topic\na,caf\u00e9 ".encode("latin-1") + b"x" * 300
    path.write_bytes(raw)
    overrides = local_overrides(standins, tmp_path) + [f"dataset.path={path}"]
    offset = raw.index(b"\xe9")
    check_error_line(refusal(overrides, tmp_path), "dataset.path", f"byte offset {offset}")


def test_malformed_jsonl_names_the_line(tmp_path: Path, standins) -> None:
    good = json.dumps({"id": "a", "dialogue": "x" * 300, "summary": "s", "topic": "t"})
    path = bad_jsonl(tmp_path, [], raw=good + "\n" + good + "\n{not json\n")
    overrides = local_overrides(standins, tmp_path) + [f"dataset.path={path}"]
    check_error_line(refusal(overrides, tmp_path), "line 3")


def test_missing_required_column(tmp_path: Path, standins) -> None:
    path = bad_jsonl(tmp_path, [{"id": i, "dialogue": "x" * 300, "topic": "t"} for i in range(5)])
    overrides = local_overrides(standins, tmp_path) + [f"dataset.path={path}"]
    check_error_line(refusal(overrides, tmp_path), "summary", "columns")


def test_nothing_left_after_filtering(tmp_path: Path, standins) -> None:
    overrides = local_overrides(standins, tmp_path) + [
        "dataset.min_chars=5000",
        "dataset.max_chars=6000",
    ]
    check_error_line(refusal(overrides, tmp_path), "dataset", "after filtering")


def test_reward_model_without_nontoxic_label(tmp_path: Path, standins) -> None:
    overrides = local_overrides(standins, tmp_path) + [
        f"reward.name_or_path={standins['reward_badlabels']}"
    ]
    check_error_line(refusal(overrides, tmp_path), "reward.nontoxic_label", "nothate")


def test_policy_not_encoder_decoder(tmp_path: Path, standins) -> None:
    overrides = local_overrides(standins, tmp_path) + [f"model.name_or_path={standins['gpt2']}"]
    check_error_line(refusal(overrides, tmp_path), "model.name_or_path", "encoder-decoder")


def test_missing_local_model_dir(tmp_path: Path, standins) -> None:
    overrides = local_overrides(standins, tmp_path) + [f"model.name_or_path={tmp_path}/no_model"]
    check_error_line(refusal(overrides, tmp_path), "model.name_or_path", "does not exist")


TYPE_AND_RANGE_CASES = [
    ("ppo.batch_size=0", "ppo.batch_size"),
    ("ppo.optimizer.lr=0", "ppo.optimizer.lr"),
    ("ppo.cliprange=0", "ppo.cliprange"),
    ("ppo.gamma=1.5", "ppo.gamma"),
    ("ppo.lam=-0.1", "ppo.lam"),
    ("ppo.kl_estimator=k9", "ppo.kl_estimator"),
    ("model.generation.min_new_tokens=40", "model.generation.min_new_tokens"),
    ("model.generation.top_p=0", "model.generation.top_p"),
    ("+eval.generation.temperature=0", "eval.generation.temperature"),
    ("ppo/kl_controller=adaptive ppo.kl_controller.target=0", "ppo.kl_controller.target"),
    ("ppo.kl_controller.kl_coef=-1", "ppo.kl_controller.kl_coef"),
    ("ppo=grpo ppo.samples_per_prompt=3", "ppo.batch_size"),
    ("ppo.advantage_estimator=ppo2", "ppo.advantage_estimator"),
    ("ppo.score.clip=-1", "ppo.score.clip"),
    ("keep_freed_memory=maybe", "keep_freed_memory"),
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.r=2.5", "model.lora.r"),
    ("model.lora.lora_dropout=x", "model.lora.lora_dropout"),
    ("model.lora.lora_alpha=0", "model.lora.lora_alpha"),
    ("model.full_finetune=maybe", "model.policy.full_finetune"),
    ("seed=abc", "seed"),
    ("torch_threads=-1", "torch_threads"),
    ("torch_threads=two", "torch_threads"),
    ("ppo.cliprange=abc", "ppo.cliprange"),
    ("ppo.optimizer.lr=abc", "ppo.optimizer.lr"),
    ("ppo.steps=1.5", "ppo.steps"),
    ("ppo.whiten_advantages=sometimes", "ppo.whiten_advantages"),
    ("ppo.max_consecutive_skips=0", "ppo.max_consecutive_skips"),
    ("ppo/kl_controller=adaptive ppo.kl_controller.horizon=0", "ppo.kl_controller.horizon"),
    ("eval.num_prompts=0", "eval.num_prompts"),
    ("eval.samples_per_prompt=0", "eval.samples_per_prompt"),
    ("eval.batch_size=1.5", "eval.batch_size"),
    ("eval.toxic_threshold=abc", "eval.toxic_threshold"),
    ("checkpoint.every=x", "checkpoint.every"),
    ("dataset.max_chars=abc", "dataset.max_chars"),
    ("dataset.min_chars=[1]", "dataset.min_chars"),
    ("reward.batch_size=abc", "reward.scorer.batch_size"),
    ("stages.train_reward=true reward.training.epochs=one", "reward.training.epochs"),
    ("logger=wandb logger.wandb=5", "logger.wandb"),
]


@pytest.mark.parametrize(("override", "field"), TYPE_AND_RANGE_CASES)
def test_types_and_ranges_of_every_group(tmp_path: Path, override: str, field: str) -> None:
    """The checks the CLI runs before the first stage (check_run_config), in process: each
    bad value is a ConfigError naming its key, which the CLI prints as one line (exit 2)."""
    from detox_exp.errors import ConfigError
    from detox_exp.run_config import check_run_config

    cfg = compose_cfg(["experiment=demo", *override.split()], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_run_config(cfg)
    assert err.value.field == field, str(err.value)
    assert "Error" not in str(err.value) and "\n" not in str(err.value)
    check_error_line(err.value, field)


def test_full_traceback_on_request(tmp_path: Path, standins, monkeypatch) -> None:
    """With HYDRA_FULL_ERROR=1 the entrypoint lets the error out (Python prints its traceback
    and exits 1) in place of the one line."""
    import sys

    from detox_exp import cli
    from detox_exp.errors import ConfigError

    overrides = local_overrides(standins, tmp_path) + ["ppo.gamma=1.5"]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["detox-exp", *overrides, *IN_PROCESS])
    with pytest.raises(ConfigError, match="^ppo.gamma: "):  # not SystemExit(2)
        cli.main()


def test_job_oserror_is_not_blamed_on_the_run_dir(tmp_path: Path, monkeypatch) -> None:
    # Hydra re-raises a job's exception from run_job: a file the job cannot read is a crash
    # with its traceback, not "choose a writable hydra.run.dir"
    import sys

    import detox_exp.pipeline
    from detox_exp import cli

    def job(cfg):
        (tmp_path / "missing" / "config.json").read_text()

    monkeypatch.setattr(detox_exp.pipeline, "run_task", job)
    argv = ["detox-exp", "logger=none", f"hydra.run.dir={tmp_path}", *IN_PROCESS]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(FileNotFoundError):
        cli.main()


def test_hydra_job_error_line_is_held_until_released() -> None:
    from detox_exp.cli import _HoldJobError

    stream = io.StringIO()
    held = _HoldJobError(stream)
    held.write("progress\n")
    held.write("Error executing job with overrides: ['seed=1']\n")
    assert stream.getvalue() == "progress\n"  # dropped if our one-line error follows
    held.release()  # a crash, or a sweeper that went on: Hydra's line is kept
    assert stream.getvalue().endswith("overrides: ['seed=1']\n")


def test_unreadable_data_is_reported_before_any_work(tmp_path: Path) -> None:
    """A non-UTF-8 dataset=jsonl file with the demo: one line before the demo assets are
    built and before W&B starts (``pipeline.run``, the CLI's job, in process)."""
    from detox_exp.pipeline import run

    good = json.dumps({"id": "a", "dialogue": "x" * 300, "summary": "s", "topic": "t"})
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((good + "\n" + good.replace("x", "\u00e9", 1) + "\n").encode("latin-1"))
    overrides = ["experiment=demo", "dataset=jsonl", f"dataset.path={path}"]
    cfg = compose_cfg(overrides + ["logger.wandb.mode=offline"], tmp_path)
    with pytest.raises(Exception) as err:  # noqa: B017 - whatever the CLI would see
        run(cfg)
    check_error_line(err.value, "latin1.jsonl", "line 2", "not UTF-8")
    cache, run_dir = Path(cfg.paths.cache_dir), Path(cfg.paths.output_dir)
    assert not cache.exists() or not any(cache.rglob("*"))  # no demo asset was built
    assert not (run_dir / "wandb").exists()  # no W&B run was created
