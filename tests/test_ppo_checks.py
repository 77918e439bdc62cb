"""The PPO settings checks: every impossible value fails with a one-line error naming the
field, and the pipeline runs them before any stage (the entrypoint's messages are covered by
test_bad_input.py)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from detox_exp.errors import ConfigError
from detox_exp.pipeline import check_run_config
from detox_exp.ppo.checks import check_hyperparameters, local_sizes
from detox_exp.ppo.trainer import PPOTrainer
from tests.test_config import compose_cfg

DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(PPOTrainer).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def test_defaults_pass() -> None:
    check_hyperparameters(DEFAULTS)


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


def test_local_sizes_split_the_batch_over_processes() -> None:
    assert local_sizes(32, 8, 2, world_size=1) == (32, 8)
    assert local_sizes(32, 8, 2, world_size=2) == (16, 4)
    with pytest.raises(ConfigError, match="ppo.batch_size"):
        local_sizes(30, 6, 1, world_size=4)
    with pytest.raises(ConfigError, match="ppo.mini_batch_size"):
        local_sizes(32, 6, 1, world_size=4)
    with pytest.raises(ConfigError, match="ppo.gradient_accumulation_steps"):
        local_sizes(32, 8, 4, world_size=4)


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
