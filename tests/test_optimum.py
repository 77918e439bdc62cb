"""`python -m detox_exp.evaluation.optimum`: the optimum on a saved run's held-out draws, by
the one estimator the pipeline and the frontier stage use (its math: test_frontier_math)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.evaluation.optimum import heldout_optimum, main
from detox_exp.metrics import distinct_n


def _run_dir(
    tmp_path: Path,
    k: int,
    reward_type: str = "log_prob",
    ent_coef: float = 0.0,
    controller: str = "kl_coef: 1.0",
) -> Path:
    """A saved run's before-evaluation of 6 prompts x k draws (30% rude, 0.99 toxic)."""
    (tmp_path / ".hydra").mkdir(parents=True)
    (tmp_path / ".hydra/config.yaml").write_text(
        f"reward:\n  reward_type: {reward_type}\nppo:\n  kl_controller:\n    {controller}\n"
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
            reward = np.log(1 - tox) - (np.log(tox) if reward_type == "logit" else 0.0)
            lines.append(
                {
                    "response": text,
                    "sample": s,
                    "toxicity": {"reward": tox},
                    "reward": float(reward),
                    "rouge_l": float(rng.random()),
                    "length": 3,
                }
            )
    (out / "generations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path


def _table(out: str) -> dict[str, dict[str, float]]:
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    names = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(names, map(float, cells[1:]), strict=True))
    return rows


@pytest.mark.parametrize("reward_type", ["log_prob", "logit"])
def test_cli_reports_reference_and_optimum(tmp_path: Path, capsys, reward_type: str) -> None:
    """The reference row is every draw; the optimum's toxicity and ROUGE-L are the draws'
    means under the weights exp(r / beta), normalised per prompt (here computed by hand)."""
    run = _run_dir(tmp_path, k=8, reward_type=reward_type)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "6 prompts x 8 reference samples" in out
    assert "ent_coef" not in out
    rows = _table(out)
    result = EvalResult.load(run, "before")
    w = np.exp(result.rewards())
    w /= w.sum(axis=1, keepdims=True)
    reference, best = rows["reference (8 samples)"], rows["optimum (beta 1)"]
    assert reference["toxicity_mean"] == pytest.approx(result.toxicity.mean(), abs=5e-4)
    assert reference["rouge_l"] == pytest.approx(result.rouge_l.mean(), abs=5e-4)
    texts = [t for group in result.responses() for t in group]
    assert reference["distinct_2"] == pytest.approx(distinct_n(texts, 2), abs=5e-4)
    assert reference["kl_to_reference"] == 0
    assert best["toxicity_mean"] == pytest.approx((w * result.toxicity).sum(1).mean(), abs=5e-4)
    assert best["rouge_l"] == pytest.approx((w * result.rouge_l).sum(1).mean(), abs=5e-4)
    assert best["kl_to_reference"] > 0
    change = json.loads(out.strip().splitlines()[-1])["toxicity_change"]
    assert change < -0.5  # the optimum drops the toxic draws


def test_one_sample_per_prompt_has_no_optimum_to_log(tmp_path: Path) -> None:
    assert heldout_optimum(EvalResult.load(_run_dir(tmp_path, k=1), "before"), 1.0, 0.5) == {}


def test_the_run_s_own_beta_is_the_frontier_s_choice(tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path, k=4, controller="target_drop: 0.5")
    (run / "summary.json").write_text(json.dumps({"frontier/beta": 2.5}))
    assert main([str(run)]) == 0
    assert "optimum (beta 2.5)" in _table(capsys.readouterr().out)


def test_cli_says_an_entropy_bonus_aims_elsewhere(tmp_path: Path, capsys) -> None:
    assert main([str(_run_dir(tmp_path, k=8, ent_coef=0.2))]) == 0
    assert "ppo.ent_coef=0.2: runs of this config also reward entropy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("k", "controller", "field"),
    [(1, "kl_coef: 1.0", "eval.samples_per_prompt"), (4, "target_drop: 0.5", "--beta")],
)
def test_cli_bad_input_exits_2(tmp_path: Path, capsys, k: int, controller: str, field: str) -> None:
    assert main([str(_run_dir(tmp_path, k=k, controller=controller))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(field) and len(err.strip().splitlines()) == 1
