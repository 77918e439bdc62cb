"""The guide's scale (``algorithm.guide_scale``): the exponent on the scorer's V, and
``kl_match``, which calibrates it to the optimum's KL (detox_exp/guided/calibrate.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detox_exp import metric_names as M
from detox_exp.frontier_math import optimum_kl, optimum_weights
from detox_exp.guidance import guided_logits
from detox_exp.guided.calibrate import match_scale
from detox_exp.guided.scorer import Guide, load_guide, save_guide
from tests.helpers.trainers import CharSumReward, guided_trainer, random_scorer

# a one-token language: the reference over 6 responses and their rewards; with beta 1 the
# optimum is ref * exp(r) / Z and V(a) = exp(r(a)) exactly
REF = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05]).log()
REWARD = torch.tensor([-0.1, -2.0, -0.3, -4.0, -0.2, -1.0])


def _kl(log_values: torch.Tensor, scale: float) -> float:
    """KL(teacher || ref) of the one-token teacher ref * V^scale."""
    teacher = guided_logits(REF, scale * log_values).log_softmax(-1)
    return float((teacher.exp() * (teacher - REF)).sum())


@pytest.mark.parametrize("shrink", [0.3, 0.5, 0.8])
def test_a_shrunk_scorer_gets_back_the_optimum(shrink: float) -> None:
    """A scorer whose log V is the true one shrunk by c (plus a constant, which guides
    nothing) guides to a flatter teacher; kl_match, aiming at the optimum's KL, finds the
    scale 1 / c, at which the teacher is the optimum itself."""
    optimum = (REF + REWARD).log_softmax(-1)
    target = float((optimum.exp() * (optimum - REF)).sum())
    shrunk = shrink * REWARD - 0.7
    assert _kl(shrunk, 1.0) < 0.8 * target  # the unscaled guide spends too little KL
    scale, kl, calls = match_scale(lambda s: _kl(shrunk, s), target, tolerance=1e-6, evaluations=30)
    assert scale == pytest.approx(1 / shrink, rel=1e-4)
    assert kl == pytest.approx(target, rel=1e-5) and calls < 30
    teacher = guided_logits(REF, scale * shrunk).softmax(-1)
    torch.testing.assert_close(teacher, optimum.exp(), rtol=0, atol=1e-4)
    # the default tolerance (3% in KL) lands within a few percent of the scale in a few calls
    scale, kl, calls = match_scale(lambda s: _kl(shrunk, s), target)
    assert abs(math.log(kl / target)) <= 0.03 and calls <= 6
    assert scale == pytest.approx(1 / shrink, rel=0.05)


def test_a_guide_that_moves_nothing_keeps_scale_one_and_targets_are_checked() -> None:
    assert match_scale(lambda s: 0.0, 0.2) == (1.0, 0.0, 1)  # an untrained scorer
    scale, kl, _ = match_scale(lambda s: 0.01 * s * s, 100.0)  # out of reach: the bound
    assert scale == pytest.approx(16.0) and kl == pytest.approx(0.01 * 256)
    with pytest.raises(ValueError, match="target"):
        match_scale(lambda s: s, 0.0)


def test_a_scaled_candidate_guide_keeps_the_tail_share_and_is_saved(tmp_path: Path) -> None:
    """At scale 2 the candidates are reweighted among themselves as the exact guide at scale
    2 does, they keep the reference's total share, and save/load keeps the scale (a file
    saved without one loads at scale 1)."""
    scorer = random_scorer(50, 8, seed=2)
    g = torch.Generator().manual_seed(5)
    h, logits = torch.randn(5, 8, generator=g), torch.randn(5, 50, generator=g) * 3
    exact = guided_logits(logits, Guide(scorer, 0.5, scale=2.0)(h, logits)).softmax(-1)
    torch.testing.assert_close(
        Guide(scorer, 0.5, scale=2.0)(h, logits), 2.0 * Guide(scorer, 0.5)(h, logits)
    )
    save_guide(Guide(scorer, 0.5, candidates=12, scale=2.0), tmp_path / "guide.pt")
    guide = load_guide(tmp_path / "guide.pt")
    assert (guide.candidates, guide.scale) == (12, 2.0)
    approx = guided_logits(logits, guide(h, logits)).softmax(-1)
    ref = logits.softmax(-1)
    inside = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.topk(12).indices, True)

    def within(p: torch.Tensor) -> torch.Tensor:
        q = p * inside
        return q / q.sum(-1, keepdim=True)

    torch.testing.assert_close(within(approx), within(exact))
    torch.testing.assert_close((approx * inside).sum(-1), (ref * inside).sum(-1))
    saved = torch.load(tmp_path / "guide.pt", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "scale"}, tmp_path / "old.pt")
    assert load_guide(tmp_path / "old.pt").scale == 1.0


def test_kl_match_calibrates_the_teacher_on_the_frontier_prompts(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """The trainer's kl_match: the target is the optimum's KL over the frontier's draws at
    the run's beta; the teacher's KL at the chosen scale on those prompts (sampled a few
    prompts at a time) is within 3% of the target; the saved guide carries the scale."""
    reward = CharSumReward()
    texts = [["the bank", "a", "the weather and the bank", "bank bank"] for _ in range(8)]
    rewards = torch.tensor([[0.0, -0.05, -0.1, -0.2]] * 8)
    scorer = {"rollout_prompts": 16, "rollout_samples": 4, "epochs": 1, "batch_prompts": 3}
    trainer = guided_trainer(  # calibration samples of 3, 3 and 2 prompts
        tiny_t5,
        tmp_path,
        reward,
        reference_draws=(texts, rewards),
        guide_scale="kl_match",
        prefix_scorer=scorer,
    )
    config = trainer.model.config
    guide = Guide(random_scorer(config.vocab_size, config.d_model, seed=4), trainer.beta)
    stats = trainer._match_scale(guide)
    target = float(optimum_kl(optimum_weights(rewards.double().numpy(), trainer.beta)).mean())
    assert stats[M.GUIDE_SCALE_TARGET] == pytest.approx(target)
    assert stats[M.GUIDE_SCALE] == guide.scale != 1.0
    assert abs(np.log(stats[M.GUIDE_SCALE_KL] / target)) <= 0.03
    trainer.prepare()
    saved = load_guide(tmp_path / "guided" / "prefix_scorer.pt")
    assert saved.scale == trainer.guide.scale == trainer.tracker.summary[M.GUIDE_SCALE]


def test_kl_match_without_the_frontier_is_a_config_error(tiny_t5: Path, tmp_path: Path) -> None:
    from detox_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="stages.frontier=true"):
        guided_trainer(tiny_t5, tmp_path, CharSumReward(), guide_scale="kl_match")


def test_an_optimum_that_is_the_reference_gets_scale_zero() -> None:
    """Every draw of a prompt scored alike: the optimum's KL is 0, and so is the scale (the
    teacher is the reference), without sampling the teacher."""
    from detox_exp.guided.calibrate import calibrate

    guide = Guide(random_scorer(50, 8, seed=1), 1.0)
    g = torch.Generator().manual_seed(0)
    h, logits = torch.randn(3, 8, generator=g), torch.randn(3, 50, generator=g)

    def never(*_: object) -> torch.Tensor:
        raise AssertionError("sampled")

    assert calibrate(guide, 0.0, never, 4, 2, lambda b: g, 2) == (0.0, 0.0, 0)
    torch.testing.assert_close(guided_logits(logits, guide(h, logits)), logits.log_softmax(-1))
