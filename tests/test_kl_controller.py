"""The adaptive KL controller inside a real run: the coefficient each PPO step uses is the
one Ziegler et al.'s update made of the previous step's logged KL (the trainer feeds the
controller objective/kl and the batch size, and rewards use what it sets). That it reaches
its target in a closed loop: tests/test_ppo_core.py; on the demo itself: the measurement in
conf/ppo/kl_controller/adaptive.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detox_exp import metric_names as M
from tests.helpers.run import ROOT, run_cli

pytestmark = pytest.mark.slow

TARGET = 0.05  # nats per response (objective/kl)
HORIZON = 16  # samples: with debug=fast's batch of 8, beta moves up to 10% a step


def test_each_step_uses_the_coefficient_the_controller_set(
    demo_cache: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "experiment=demo_small",
        "debug=fast",
        "ppo=rloo",
        "logger=none",
        "stages.evaluate_before=false",
        "stages.frontier=false",  # the adaptive controller sets beta itself
        "stages.evaluate_after=false",
        "ppo/kl_controller=adaptive",
        f"ppo.kl_controller.target={TARGET}",
        f"ppo.kl_controller.horizon={HORIZON}",
        "ppo.steps=4",
        "ppo.save_dir=null",
        f"hydra.run.dir={tmp_path}",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if M.KL in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert steps[0][M.KL_COEF] == 1.0  # init_kl_coef
    for before, after in zip(steps, steps[1:]):
        error = min(max(before[M.KL] / TARGET - 1, -0.2), 0.2)
        expected = before[M.KL_COEF] * (1 + error * 8 / HORIZON)
        assert after[M.KL_COEF] == pytest.approx(expected, rel=1e-12), (before, after)
    assert steps[-1][M.KL_COEF] != steps[0][M.KL_COEF]  # the controller acted on beta
