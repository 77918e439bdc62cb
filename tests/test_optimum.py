"""Rejection sampling of the KL-regularised optimum from reference draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detox_exp.evaluation.optimum import main, rejection_optimum

REF = np.array([0.5, 0.3, 0.2])  # a reference policy over three responses
REWARD = np.log(np.array([1.0, 0.5, 0.1]))  # log p(non-toxic | y)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_samples_the_optimum_and_estimates_its_kl(beta: float) -> None:
    rng = np.random.default_rng(0)
    draws = rng.choice(3, size=(20000, 32), p=REF)  # 32 reference samples of each prompt
    picked, kl, fallbacks = rejection_optimum(REWARD[draws], beta, rng)
    chosen = draws[np.arange(len(draws)), picked]
    target = REF * np.exp(REWARD / beta)
    target /= target.sum()  # pi* = ref * exp(r / beta) / Z
    assert fallbacks == 0
    np.testing.assert_allclose(np.bincount(chosen, minlength=3) / len(chosen), target, atol=0.01)
    exact_kl = float((target * np.log(target / REF)).sum())
    assert kl.mean() == pytest.approx(exact_kl, abs=0.01)


def test_all_accepted_is_the_reference() -> None:
    picked, kl, fallbacks = rejection_optimum(np.zeros((5, 4)), 1.0, np.random.default_rng(0))
    assert picked.tolist() == [0] * 5 and fallbacks == 0
    np.testing.assert_allclose(kl, 0.0, atol=1e-12)


def test_never_accepted_falls_back_to_the_best_draw() -> None:
    rewards = np.array([[-50.0, -40.0, -60.0]])
    picked, _, fallbacks = rejection_optimum(rewards, 1.0, np.random.default_rng(0))
    assert picked.tolist() == [1] and fallbacks == 1


def test_positive_rewards_are_refused() -> None:
    with pytest.raises(ValueError, match="rewards <= 0"):
        rejection_optimum(np.array([[0.5, -1.0]]), 1.0, np.random.default_rng(0))


def _run_dir(tmp_path: Path, k: int, reward_type: str = "log_prob", ent_coef: float = 0.0) -> Path:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/config.yaml").write_text(
        f"reward:\n  reward_type: {reward_type}\nppo:\n  kl_controller:\n    kl_coef: 1.0\n"
        f"  ent_coef: {ent_coef}\neval:\n  toxic_threshold: 0.5\n"
    )
    out = tmp_path / "eval/before"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"samples_per_prompt": k}))
    rng = np.random.default_rng(0)
    lines = []
    for p in range(6):
        for s in range(k):
            toxic = bool(rng.random() < 0.3)
            tox = 0.99 if toxic else 0.01
            text = f"summary {p} {s}" + (" you idiot" if toxic else "")
            lines.append(
                {
                    "response": text,
                    "sample": s,
                    "toxicity": {"reward": tox},
                    "reward": float(np.log(1 - tox)),
                    "rouge_l": 0.3,
                    "length": 3,
                }
            )
    (out / "generations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path


def test_cli_reports_reference_and_optimum(tmp_path: Path, capsys) -> None:
    assert main([str(_run_dir(tmp_path, k=8))]) == 0
    out = capsys.readouterr().out
    assert "6 prompts x 8 reference samples" in out
    change = json.loads(out.strip().splitlines()[-1])["toxicity_change"]
    assert change < -0.5  # the optimum drops the toxic draws
    assert "ent_coef" not in out


def test_cli_says_an_entropy_bonus_aims_elsewhere(tmp_path: Path, capsys) -> None:
    assert main([str(_run_dir(tmp_path, k=8, ent_coef=0.2))]) == 0
    assert "ppo.ent_coef=0.2: runs of this config also reward entropy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("k", "reward_type", "field"),
    [(1, "log_prob", "eval.samples_per_prompt"), (4, "logit", "reward.reward_type")],
)
def test_cli_bad_input_exits_2(
    tmp_path: Path, capsys, k: int, reward_type: str, field: str
) -> None:
    assert main([str(_run_dir(tmp_path, k=k, reward_type=reward_type))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(field) and len(err.strip().splitlines()) == 1
