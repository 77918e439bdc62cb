"""The PPO settings checks: every impossible value fails with a one-line error naming the
field, and the pipeline runs them before any stage (the entrypoint's messages are covered by
test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detox_exp.errors import ConfigError
from detox_exp.ppo.checks import check_ppo_config, local_sizes, settings_from
from detox_exp.ppo.settings import PPOSettings
from detox_exp.run_config import check_run_config
from tests.helpers.config import compose_cfg


def check_hyperparameters(values: dict) -> PPOSettings:
    return settings_from(values)


DEFAULTS: dict = {}


def test_defaults_pass() -> None:
    check_hyperparameters(DEFAULTS)


def test_unknown_setting_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"ppo\.lerning_rate"):
        check_hyperparameters({"lerning_rate": 1e-4})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": -1}, "ppo.steps"),
        ({"batch_size": 0}, "ppo.batch_size"),
        ({"mini_batch_size": 0}, "ppo.mini_batch_size"),
        ({"mini_batch_size": 5}, "ppo.mini_batch_size"),
        ({"gradient_accumulation_steps": 3}, "ppo.gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 0}, "ppo.gradient_accumulation_steps"),
        ({"ppo_epochs": 0}, "ppo.ppo_epochs"),
        ({"gamma": 1.01}, "ppo.gamma"),
        ({"lam": -0.5}, "ppo.lam"),
        ({"cliprange": 0.0}, "ppo.cliprange"),
        ({"cliprange_value": -1.0}, "ppo.cliprange_value"),
        ({"kl_estimator": "k4"}, "ppo.kl_estimator"),
        ({"max_grad_norm": 0.0}, "ppo.max_grad_norm"),
        ({"score": {"scale": 1.0, "clipp": 2.0}}, "ppo.score"),
        ({"score": {"clip": 0}}, "ppo.score.clip"),
        ({"forward_batch_size": 0}, "ppo.forward_batch_size"),
        ({"on_nonfinite": "ignore"}, "ppo.on_nonfinite"),
        ({"precision": "bf32"}, "ppo.precision"),
        ({"kl_log_estimator": "k1"}, "ppo.kl_log_estimator"),  # can be negative: not logged
        ({"kl_loss_estimator": "k1"}, "ppo.kl_loss_estimator"),  # expected gradient 0
        ({"kl_loss_coef": -0.1}, "ppo.kl_loss_coef"),
        ({"samples_per_prompt": 0}, "ppo.samples_per_prompt"),
        ({"samples_per_prompt": 3}, "ppo.batch_size"),  # 32 samples: not whole groups of 3
        ({"samples_per_prompt": 16}, "ppo.mini_batch_size"),  # a group larger than 8
        (
            {"samples_per_prompt": 4, "gradient_accumulation_steps": 4},
            "ppo.gradient_accumulation_steps",  # micro-batches of 2 would split groups of 4
        ),
        ({"advantage_estimator": "ppo"}, "ppo.advantage_estimator"),
        ({"advantage_estimator": "rloo"}, "ppo.samples_per_prompt"),  # k = 1: no group
        (
            {"advantage_estimator": "grpo", "samples_per_prompt": 4, "separate_value_model": True},
            "ppo.separate_value_model",
        ),
        ({"loss_agg_mode": "seq-mean"}, "ppo.loss_agg_mode"),
        ({"group_eps": 0.0}, "ppo.group_eps"),
    ],
)
def test_impossible_values_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_hyperparameters(DEFAULTS | changes)
    message = str(error.value)
    assert field in message and "\n" not in message


def test_null_means_off() -> None:
    check_hyperparameters(
        DEFAULTS | {"max_grad_norm": None, "forward_batch_size": None, "score": None}
    )


def sizes(batch: int, mini: int, accum: int, k: int = 1) -> PPOSettings:
    return PPOSettings(
        batch_size=batch,
        mini_batch_size=mini,
        gradient_accumulation_steps=accum,
        samples_per_prompt=k,
    )


def test_local_sizes_split_the_batch_over_processes() -> None:
    assert local_sizes(sizes(32, 8, 2), world_size=1) == (32, 8)
    assert local_sizes(sizes(32, 8, 2), world_size=2) == (16, 4)
    with pytest.raises(ConfigError, match="ppo.batch_size"):
        local_sizes(sizes(30, 6, 1), world_size=4)
    with pytest.raises(ConfigError, match="ppo.mini_batch_size"):
        local_sizes(sizes(32, 4, 1), world_size=8)
    with pytest.raises(ConfigError, match="ppo.gradient_accumulation_steps"):
        local_sizes(sizes(32, 8, 4), world_size=4)


def test_local_sizes_keep_groups_whole_on_each_process() -> None:
    # 32 samples = 8 prompts x 4: two processes get 4 prompts (16 samples) each
    assert local_sizes(sizes(32, 16, 2, k=4), world_size=2) == (16, 8)
    # 16 samples = 4 groups of 4 cannot be shared by 8 processes
    with pytest.raises(ConfigError, match="ppo.batch_size"):
        local_sizes(sizes(16, 16, 1, k=4), world_size=8)
    # a per-process mini-batch of 8 in micro-batches of 2 would split groups of 4
    with pytest.raises(ConfigError, match="ppo.gradient_accumulation_steps"):
        local_sizes(sizes(32, 16, 2, k=4), world_size=2 * 2)


def test_check_ppo_config_reads_the_composed_node(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=demo", "ppo=rloo"], tmp_path)
    settings = check_ppo_config(cfg.ppo)
    assert settings.advantage_estimator == "rloo" and settings.samples_per_prompt >= 2
    assert not settings.uses_critic


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("ppo.mini_batch_size=3", "ppo.mini_batch_size"),
        ("ppo.max_grad_norm=0", "ppo.max_grad_norm"),
        ("ppo.optimizer.lr=-1", "ppo.optimizer.lr"),
        ("ppo.score.clip=0", "ppo.score.clip"),
    ],
)
def test_pipeline_checks_ppo_before_any_stage(tmp_path: Path, override: str, field: str) -> None:
    cfg = compose_cfg(["experiment=demo", "debug=fast", override], tmp_path)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_run_config(cfg)
    assert not (tmp_path / "run").exists()  # nothing written yet


def test_pipeline_skips_ppo_checks_without_the_ppo_stage(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["experiment=demo", "debug=fast", "ppo.mini_batch_size=3", "stages.ppo=false"], tmp_path
    )
    check_run_config(cfg)
