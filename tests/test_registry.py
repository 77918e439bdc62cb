"""The registries of estimators and modes: registration, lookup, the checks and the docs
that read them, and the docs' recipe for adding an estimator."""

from __future__ import annotations

import runpy

import pytest
import torch

from detox_exp.errors import ConfigError
from detox_exp.kl import KL_ESTIMATORS
from detox_exp.ppo import advantages as estimators
from detox_exp.ppo.checks import settings_from, sweep_choice
from detox_exp.registry import Registry
from tests.helpers.run import ROOT


def test_register_look_up_and_filter() -> None:
    registry = Registry("ppo.example")

    @registry.register("a", critic=True)
    def a() -> int:
        """First."""
        return 1

    registry.register("b", critic=False)(lambda: 2)
    assert registry.names() == ("a", "b") and registry.names(critic=False) == ("b",)
    assert registry["a"].fn is a and registry["a"].critic is True and "a" in registry
    with pytest.raises(ValueError, match=r"ppo\.example: unknown 'c', use one of \('a', 'b'\)"):
        registry["c"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(a)
    assert "| `a` | yes | First. |" in registry.markdown({"critic": "critic"})


def test_the_checks_and_the_sweep_read_the_registries() -> None:
    assert estimators.ADVANTAGE_ESTIMATORS.names() == ("gae", "rloo", "grpo", "dr_grpo")
    assert estimators.ADVANTAGE_ESTIMATORS.names(needs_critic=True) == ("gae",)
    assert KL_ESTIMATORS.names(log=True) == ("k3", "full")
    assert KL_ESTIMATORS.names(loss=True) == ("k2", "k3", "full")
    assert sweep_choice("ppo.advantage_estimator") == "choice(gae, rloo, grpo, dr_grpo)"
    with pytest.raises(ConfigError, match=r"ppo\.advantage_estimator.*'gae', 'rloo'"):
        settings_from({"advantage_estimator": "ppo2"})
    assert settings_from({"advantage_estimator": "gae"}).uses_critic
    grpo = settings_from({"advantage_estimator": "grpo", "samples_per_prompt": 4})
    assert not grpo.uses_critic


def test_group_estimators_give_token_advantages_and_sequence_returns() -> None:
    """per_group: the rule on the sequence rewards (score + summed KL penalty), spread on
    every token of the sample; the return is the sequence reward."""
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    entry = estimators.ADVANTAGE_ESTIMATORS["dr_grpo"]
    advantages, returns = entry.fn(rewards, mask, None, k=2, eps=1e-6, gamma=1.0, lam=1.0)
    # group 1: sequence rewards 1 and 2 -> -0.5, +0.5; group 2: 1 and 1 -> exactly 0
    torch.testing.assert_close(advantages, torch.tensor([[-0.5, -0.5], [0.5, 0.0], [0, 0], [0, 0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0], [2.0, 0.0], [1, 1], [1, 1]]))


def test_the_docs_tables_are_the_registries() -> None:
    tables = runpy.run_path(str(ROOT / "scripts" / "registry_tables.py"))["tables"]()
    design = (ROOT / "docs" / "design.md").read_text()
    for title, table in tables.items():
        assert f"### {title}\n\n{table}\n" in design, f"rerun scripts/registry_tables.py: {title}"


def test_an_added_estimator_is_checked_swept_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe of docs/design.md ("Registries"): one decorated function makes an estimator
    the config checks accept, the sweep offers and the trainer's advantages use (registered
    on a copy of the registry, gone after the test)."""
    monkeypatch.setattr(
        estimators.ADVANTAGE_ESTIMATORS, "_entries", dict(estimators.ADVANTAGE_ESTIMATORS._entries)
    )

    @estimators.ADVANTAGE_ESTIMATORS.register("rloo_std", needs_critic=False)
    @estimators.per_group
    def rloo_std(scores: torch.Tensor, eps: float) -> torch.Tensor:
        """Leave-one-out baseline, divided by the group's std."""
        k = scores.shape[1]
        loo = (scores - scores.mean(dim=1, keepdim=True)) * (k / (k - 1))
        return loo / (scores.std(dim=1, keepdim=True) + eps)

    settings = settings_from({"advantage_estimator": "rloo_std", "samples_per_prompt": 4})
    assert not settings.uses_critic
    assert "rloo_std" in sweep_choice("ppo.advantage_estimator")
    scores = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    loo = (scores - 2.0) * 4 / 3
    expected = loo / (scores.std() + 1e-6)
    torch.testing.assert_close(estimators.group_advantages(scores, "rloo_std"), expected)
