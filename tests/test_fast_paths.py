"""Every speed switch (``fast.*``, detox_exp/fast/) off is the plain path: transformers' own
T5 forward with SDPA attention and its GELU module, the model's forward for every decoded
token, peft's LoRA layers unfolded, unrounded widths. A rollout and one optimisation step
give the same samples, log-probs and weights either way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from detox_exp.errors import ConfigError
from detox_exp.fast import SWITCHES, configure
from tests.test_ppo_properties import ContainsReward, make_trainer

ALL_ON = {f.name: f.default for f in dataclasses.fields(SWITCHES)}
ALL_OFF = {name: (1 if name == "width_multiple" else False) for name in ALL_ON}


@pytest.fixture
def restore_switches():
    saved = dataclasses.asdict(SWITCHES)
    yield
    configure(**saved)


def _rollout_and_step(tiny_t5: Path, tmp_path: Path, switches: dict):
    configure(**switches)
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"), ppo_epochs=1)
    roll = trainer.rollout(list(range(16)))
    trainer.optimize(roll)
    weights = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    return trainer, roll, weights


def test_switches_off_is_the_same_computation(
    tiny_t5: Path, tmp_path: Path, restore_switches
) -> None:
    fast, fast_roll, fast_weights = _rollout_and_step(tiny_t5, tmp_path, ALL_ON)
    plain, plain_roll, plain_weights = _rollout_and_step(tiny_t5, tmp_path, ALL_OFF)
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
    for a, b in zip(fast_weights, plain_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_switches_are_config_errors(restore_switches) -> None:
    with pytest.raises(ConfigError, match="fast.step_decoders"):
        configure(step_decoders=False)
    with pytest.raises(ConfigError, match="fast.fold_lora"):
        configure(fold_lora="yes")
    with pytest.raises(ConfigError, match="fast.width_multiple"):
        configure(width_multiple=0)
