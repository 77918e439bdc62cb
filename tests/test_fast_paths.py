"""Every speed switch (``fast.*``, detox_exp/fast/) off is the plain path: transformers' own
T5 forward with SDPA attention and its GELU module, the model's forward for every decoded
token, peft's LoRA layers unfolded, unrounded widths. A rollout and one optimisation step
give the same samples, log-probs and gradients either way."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch

from detox_exp.errors import ConfigError
from detox_exp.fast import SWITCHES, configure
from tests.helpers.trainers import (
    CharSumReward,
    assert_grads_close,
    make_trainer,
    record_step_grads,
)

ALL_ON = {f.name: f.default for f in dataclasses.fields(SWITCHES)}
ALL_OFF = {name: (1 if name == "width_multiple" else False) for name in ALL_ON}


@pytest.fixture
def restore_switches():
    saved = dataclasses.asdict(SWITCHES)
    yield
    configure(**saved)


def _rollout_and_step(tiny_t5: Path, tmp_path: Path, switches: dict):
    """A rollout and one epoch of 4 SGD steps: plain SGD keeps the two paths' round-off at
    round-off (an Adam step would turn it into steps of up to lr, see GRAD_TOL)."""
    configure(**switches)
    trainer = make_trainer(
        tiny_t5,
        tmp_path,
        CharSumReward(),
        ppo_epochs=1,
        optimizer=partial(torch.optim.SGD, lr=1e-2),
    )
    grads = record_step_grads(trainer.optimizer)
    roll = trainer.rollout(list(range(16)))
    trainer.optimize(roll)
    return trainer, roll, grads


def test_switches_off_is_the_same_computation(
    tiny_t5: Path, tmp_path: Path, restore_switches
) -> None:
    fast, fast_roll, fast_grads = _rollout_and_step(tiny_t5, tmp_path, ALL_ON)
    plain, plain_roll, plain_grads = _rollout_and_step(tiny_t5, tmp_path, ALL_OFF)
    gelu = {type(m).__name__ for m in plain.policy.modules()} & {"NewGELUActivation"}
    assert gelu and "FusedGELUTanh" not in {type(m).__name__ for m in plain.policy.modules()}
    assert plain.policy.config._attn_implementation == "sdpa"
    width = int(plain_roll.mask.sum(1).max())
    assert plain_roll.response.shape[1] == width  # no rounding
    assert fast_roll.response.shape[1] % 16 == 0 and fast_roll.response.shape[1] >= width
    assert torch.equal(fast_roll.response[:, :width], plain_roll.response)
    assert torch.equal(fast_roll.mask[:, :width], plain_roll.mask)
    for key in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(
            getattr(fast_roll, key)[:, :width] * plain_roll.mask,
            getattr(plain_roll, key) * plain_roll.mask,
            rtol=0,
            atol=1e-5,
        )
    assert len(fast_grads) == len(plain_grads) == 4  # 16 samples in minibatches of 4
    for a, b in zip(fast_grads, plain_grads, strict=True):
        assert_grads_close(a, b)


def test_bad_switches_are_config_errors(restore_switches) -> None:
    with pytest.raises(ConfigError, match="fast.step_decoders"):
        configure(step_decoders=False)
    with pytest.raises(ConfigError, match="fast.fold_lora"):
        configure(fold_lora="yes")
    with pytest.raises(ConfigError, match="fast.width_multiple"):
        configure(width_multiple=0)
