"""The frontier stage on the offline demo through the real entrypoint: its files, beta from
a target, the refusal of a beta that aims at nothing, and the held-out optimum column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detox_exp import metric_names as M
from detox_exp.frontier.result import ROW_KEYS
from detox_exp.frontier.stage import BETAS
from tests.helpers.cli import check_one_line_error
from tests.helpers.run import ROOT, run_cli

pytestmark = pytest.mark.slow

DEMO = ["experiment=demo_small", "debug=fast", "logger=none"]


@pytest.fixture(scope="module")
def frontier_run(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """beta from a target of -50%; 16 samples per held-out prompt for the optimum column."""
    run_dir = tmp_path_factory.mktemp("frontier_run")
    result = run_cli(
        *DEMO,
        f"hydra.run.dir={run_dir}",
        "ppo/kl_controller=frontier",
        "ppo.kl_controller.target_drop=0.5",
        "frontier.num_prompts=64",
        "frontier.samples_per_prompt=16",
        "frontier.min_drop=0.1",
        "eval.num_prompts=64",
        "eval.samples_per_prompt=16",
        "eval.batch_size=128",
        "ppo.steps=1",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


def test_frontier_files_and_summary(frontier_run: Path) -> None:
    out = frontier_run / "frontier"
    rows = [json.loads(line) for line in (out / "frontier.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in rows] == list(BETAS)  # conf/frontier/default.yaml's grid
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
    changes = [r["toxicity_change"] for r in rows]
    assert changes == sorted(changes)  # a larger beta cuts less
    assert changes[0] < -0.5 < changes[-1] <= 0
    assert (out / "frontier.png").stat().st_size > 1000
    assert "(this run)" in (out / "frontier.md").read_text()
    summary = json.loads((frontier_run / "summary.json").read_text())
    assert summary["time/stage/frontier_s"] > 0
    beta = summary[M.FRONTIER_BETA]
    assert beta > 1.0  # the demo's classifier is confident: -50% costs little
    assert summary[M.FRONTIER_TOXICITY_CHANGE] == pytest.approx(-0.5, abs=0.01)  # bisected
    assert 0 < summary[M.FRONTIER_KL] < rows[0]["kl"]
    steps = [json.loads(x) for x in (frontier_run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0][M.KL_COEF] == pytest.approx(beta)  # the run uses the frontier's beta
    assert "| beta | toxicity_mean |" in (frontier_run / "stdout.txt").read_text()


def test_the_optimum_command_reads_the_run_as_the_pipeline_did(frontier_run: Path) -> None:
    """`python -m detox_exp.evaluation.optimum` on the run prints, at the run's own beta (the
    frontier's), the held-out optimum the pipeline logged; and the frontier (train prompts)
    and the held-out prompts predict the same drop at that beta, within 10 points."""
    import contextlib
    import io

    from detox_exp.evaluation import optimum

    summary = json.loads((frontier_run / "summary.json").read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert optimum.main([str(frontier_run)]) == 0
    assert f"optimum (beta {summary[M.FRONTIER_BETA]:g})" in out.getvalue()
    printed = json.loads(out.getvalue().strip().splitlines()[-1])

    def ratio(name: str) -> float:
        return summary[f"eval/optimum/{name}"] / summary[f"eval/before/{name}"]

    assert printed["toxicity_change"] == pytest.approx(ratio("toxicity_mean") - 1, rel=1e-9)
    # the corpus metrics too: the run's resampling seed, the same uniforms
    assert printed["distinct_2_ratio"] == pytest.approx(ratio("distinct_2"), rel=1e-9)
    assert abs(summary[M.FRONTIER_TOXICITY_CHANGE] - (ratio("toxicity_mean") - 1)) <= 0.10


def test_every_run_is_read_against_its_optimum(frontier_run: Path) -> None:
    summary = json.loads((frontier_run / "summary.json").read_text())
    for name in ("toxicity_mean", "toxic_fraction", "rouge_l", "distinct_2", "kl_to_reference"):
        assert f"eval/optimum/{name}" in summary, name
    assert summary["eval/optimum/beta"] == pytest.approx(summary[M.FRONTIER_BETA])
    assert summary["eval/optimum/toxicity_mean"] < summary["eval/before/toxicity_mean"]
    stdout = (frontier_run / "stdout.txt").read_text()
    assert "| metric | before | after | optimum |" in stdout


def test_a_beta_that_aims_at_nothing_is_refused(frontier_run: Path, demo_cache: Path) -> None:
    common = [
        *DEMO,
        "stages.train_reward=false",
        "stages.evaluate_before=false",  # the frontier stage refuses before any policy step
        f"reward.name_or_path={frontier_run}/reward_model",
        "frontier.min_drop=0.1",
        "frontier.num_prompts=64",
        "frontier.samples_per_prompt=16",
    ]
    run_dir = frontier_run.parent / "refused"
    result = run_cli(
        *common,
        f"hydra.run.dir={run_dir}",
        "ppo.kl_controller.kl_coef=1000",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    line = check_one_line_error(result, "frontier.min_drop", "beta 1000", "kl_coef=")
    assert "KL" in line
    assert not (run_dir / "metrics.jsonl").exists()  # no PPO step
    assert (run_dir / "frontier" / "frontier.jsonl").is_file()  # what it measured is kept
    unreachable = run_cli(
        *common,
        f"hydra.run.dir={frontier_run.parent / 'unreachable'}",
        "ppo/kl_controller=frontier",
        "ppo.kl_controller.target_drop=0.999",
        "frontier.betas=[1,10]",
        cwd=ROOT,
        env={"DETOX_EXP_CACHE": str(demo_cache)},
    )
    check_one_line_error(unreachable, "ppo.kl_controller.target_drop", "the best is", "beta 1")
