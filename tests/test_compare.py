"""detox-exp-compare: the pure helpers by hand, fake run dirs, and two real runs end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from detox_exp.compare import (
    config_cell,
    differing_keys,
    format_metric,
    main,
    markdown_table,
)
from detox_exp.compare_runs import RunRecord, flatten, load_runs, pareto_front
from tests.helpers.run import ROOT, local_overrides, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def compare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "detox_exp.compare", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert matplotlib.image.imread(path).size > 0


def table_rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


# ------------------------------------------------------------------ pareto_front
@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([(0.1, 0.5), (0.2, 0.6), (0.3, 0.4), (0.1, 0.4)], [0, 1]),
        ([(0.1, 0.5), (0.1, 0.5), (0.2, 0.4)], [0, 1]),  # equal points: both kept
        ([(0.1, 0.5), (0.2, 0.5)], [0]),  # same ROUGE, more toxic: dominated
        ([(0.1, 0.5), (0.1, 0.6)], [1]),  # same toxicity, less ROUGE: dominated
        ([(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)], [0, 1, 2]),  # a staircase: all optimal
        ([(0.3, 0.3)], [0]),
        ([], []),
        ([(math.nan, 0.9), (0.2, 0.4)], [1]),  # NaN is never on the front
    ],
)
def test_pareto_front_by_hand(points: list[tuple[float, float]], front: list[int]) -> None:
    assert pareto_front(points) == front


# ---------------------------------------------------------------- differing_keys
def test_differing_keys_on_flat_configs() -> None:
    a = {
        "seed": 1,
        "ppo.optimizer.lr": 0.001,
        "ppo.steps": 2,
        "ppo.seed": "${seed}",
        "model.lora.target_modules": ["q", "v"],
        "paths.output_dir": "/runs/a",
        "hydra.run.dir": "/runs/a",
        "logger.wandb.dir": "/runs/a/wandb",
        "only_in_a": True,
    }
    b = a | {
        "seed": 2,
        "ppo.optimizer.lr": 1e-4,
        "model.lora.target_modules": ["q", "k", "v"],
        "paths.output_dir": "/runs/b",
        "hydra.run.dir": "/runs/b",
        "logger.wandb.dir": "/runs/b/wandb",
    }
    del b["only_in_a"]
    assert differing_keys([a, b]) == [
        "seed",
        "ppo.optimizer.lr",
        "model.lora.target_modules",
        "only_in_a",
    ]
    assert differing_keys([a, dict(a)]) == []
    assert differing_keys([a]) == []


def test_differing_keys_ignores_run_dir_paths() -> None:
    def record(run_dir: str, **config: object) -> RunRecord:
        return RunRecord(run_dir, {}, dict(config), [], run_dirs=(run_dir,))

    runs = [
        record("/runs/a", **{"ppo.save_dir": "/runs/a/policy", "logger.run_dir": "/runs/a"}),
        record("/runs/b", **{"ppo.save_dir": "/runs/b/policy", "logger.run_dir": "/runs/b"}),
    ]
    assert differing_keys(runs) == []
    # a different dir that merely starts with the run dir is a real difference
    runs[0].config["reward.name_or_path"] = "/runs/abc/reward"
    runs[1].config["reward.name_or_path"] = "/runs/b/reward"
    # ... and so is one that merely ends with it
    runs[0].config["dataset.path"] = "/data/runs/a"
    runs[1].config["dataset.path"] = "/data/runs/b"
    assert differing_keys(runs) == ["reward.name_or_path", "dataset.path"]


# ---------------------------------------------------------------- markdown_table
def test_markdown_table_sorts_formats_and_marks_missing() -> None:
    runs = [
        RunRecord("high", {"eval/after/toxicity_mean": 0.5, "eval/after/rouge_l": 0.3}, {}, []),
        RunRecord("none", {}, {"seed": 3}, []),
        RunRecord(
            "low",
            {
                "eval/after/toxicity_mean": 0.12345,
                "eval/delta/toxicity_mean": -0.2,
                "eval/delta/toxicity_mean_ci_low": -0.31,
                "eval/delta/toxicity_mean_ci_high": -0.1,
            },
            {"seed": 1, "ppo.optimizer.lr": 0.001},
            [],
        ),
    ]
    metrics = ["eval/after/toxicity_mean", "eval/delta/toxicity_mean", "eval/after/rouge_l"]
    rows = table_rows(markdown_table(runs, ["seed", "ppo.optimizer.lr"], metrics))
    assert rows[0] == ["run", "seed", "ppo.optimizer.lr", *metrics]
    assert set(rows[1]) == {"---"}
    assert rows[2] == ["low", "1", "0.001", "0.123", "-0.200 [-0.310, -0.100]", "-"]
    assert rows[3] == ["high", "-", "-", "0.500", "-", "0.300"]
    assert rows[4][0] == "none"  # no sort metric: last, whatever the direction
    desc = table_rows(markdown_table(runs, [], metrics, desc=True))
    assert [r[0] for r in desc[2:]] == ["high", "low", "none"]
    by_rouge = table_rows(markdown_table(runs, [], metrics, sort="eval/after/rouge_l"))
    assert by_rouge[2][0] == "high"
    assert format_metric({"x": None}, "x") == "-"
    assert format_metric({"x": 7}, "x") == "7"


# ---------------------------------------------------------- fake run / sweep dirs
def write_fake_run(run_dir: Path, seed: int, toxicity: float, rouge: float) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\npaths:\n  output_dir: ${{hydra:runtime.output_dir}}\n"
        "ppo:\n  seed: ${seed}\n  save_dir: ${paths.output_dir}/policy\n  steps: 3\n"
    )
    summary = {"eval/after/toxicity_mean": toxicity, "eval/after/rouge_l": rouge}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [
        json.dumps({"step": s, "env/reward_mean": s * seed, "objective/kl": 0.1 * s})
        for s in range(1, 4)
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "env/rew')


def test_sweep_dir_expands_to_numbered_jobs(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for job in range(11):
        write_fake_run(sweep / str(job), seed=job, toxicity=0.1 + job / 100, rouge=0.3)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "11").mkdir()  # a job that has not written summary.json yet
    runs = load_runs([str(sweep)])
    assert [r.name for r in runs] == [str(i) for i in range(11)]
    assert len(runs[0].history) == 3  # the torn last line is skipped
    assert differing_keys(runs) == ["seed"]
    out = tmp_path / "plots"
    assert main([str(sweep), "--desc", "--out", str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][:2] == ["run", "seed"]
    assert [r[0] for r in rows[2:]] == [str(i) for i in reversed(range(11))]
    for name in ("pareto.png", "pareto_distinct2.png", "curves.png"):
        check_png(out / name)


def test_bogus_path_exits_2_with_one_line_error(tmp_path: Path) -> None:
    bogus = tmp_path / "no_such_run"
    result = compare_cli(str(bogus), "--no-plots", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"detox-exp-compare: error: {bogus}: not a run dir, sweep dir")
    assert "fix:" in lines[0]
    assert result.stdout == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare_cli(str(empty), cwd=tmp_path).returncode == 2


def test_wandb_run_paths_use_the_api(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    class FakeRun:
        def __init__(self, run_id: str, lr: float) -> None:
            out = f"/remote/outputs/{run_id}"
            self.summary = {"eval/after/toxicity_mean": lr, "eval/after/rouge_l": 0.3, "x": "t"}
            self.config = {"ppo": {"optimizer": {"lr": lr}, "save_dir": f"{out}/policy"}}
            self.config |= {"paths": {"output_dir": out}, "logger": {"run_dir": out}}

        def history(self, keys: list[str], pandas: bool) -> list[dict]:
            assert not pandas and "env/reward_mean" in keys
            return [{"_step": s, "env/reward_mean": 1.0, "objective/kl": 0.1} for s in (1, 2)]

    class FakeApi:
        def __init__(self, timeout: int) -> None:
            pass

        def run(self, path: str) -> FakeRun:
            if path.endswith("missing"):
                raise ValueError("Could not find run\nsecond line")
            return FakeRun(path.rsplit("/", 1)[1], {"r1": 1e-3, "r2": 1e-4}[path[-2:]])

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.chdir(tmp_path)
    runs = load_runs(["ent/proj/r1", "https://wandb.ai/ent/proj/runs/r2"])
    assert [r.name for r in runs] == ["ent/proj/r1", "ent/proj/r2"]
    assert runs[0].summary == {"eval/after/toxicity_mean": 1e-3, "eval/after/rouge_l": 0.3}
    assert [h["step"] for h in runs[1].history] == [1, 2]
    assert differing_keys(runs) == ["ppo.optimizer.lr"]  # save_dir differs only by run dir
    with pytest.raises(SystemExit) as exit_info:
        main(["ent/proj/missing", "--no-plots"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ent/proj/missing: W&B run could not be fetched" in err


# --------------------------------------------------------------- real runs, end to end
@pytest.mark.slow
def test_compare_two_real_runs(tmp_path: Path, standins) -> None:
    for name, extra in (("a", ["seed=1"]), ("b", ["seed=2", "ppo.optimizer.lr=1e-3"])):
        result = run_cli(*local_overrides(standins, tmp_path / name), *extra, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    result = compare_cli("a", "b", "--out", "tmp/plots", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    header = rows[0]
    assert header[0] == "run"
    assert "seed" in header and "ppo.optimizer.lr" in header
    assert header[1:3] == ["seed", "ppo.optimizer.lr"]  # nothing else differs
    assert "eval/after/toxicity_mean" in header
    assert sorted(r[0] for r in rows[2:]) == ["a", "b"]
    for row in rows[2:]:
        assert row[header.index("seed")] == {"a": "1", "b": "2"}[row[0]]
        assert row[header.index("eval/after/toxicity_mean")] != "-"
    for name in ("pareto.png", "pareto_distinct2.png", "curves.png"):
        path = tmp_path / "tmp" / "plots" / name
        assert str(Path("tmp/plots") / name) in result.stdout
        check_png(path)


# ------------------------------------------- shape differences, baselines, the optimum
WANDB_LOGGER = {
    "_target_": "detox_exp.tracking.Tracker",
    "run_dir": "${paths.output_dir}",
    "log_model": True,
    "wandb": {"project": "detox-exp", "entity": None, "group": None, "tags": [], "mode": None},
}
NONE_LOGGER = {
    "_target_": "detox_exp.tracking.Tracker",
    "run_dir": "${paths.output_dir}",
    "wandb": None,
}


def write_run(run_dir: Path, config: dict, summary: dict, choices: dict | None = None) -> None:
    """A run dir with .hydra/config.yaml, summary.json and, given choices, .hydra/hydra.yaml."""
    from omegaconf import OmegaConf

    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    if choices is not None:
        hydra = {"hydra": {"run": {"dir": "${now:%H}"}, "runtime": {"choices": choices}}}
        OmegaConf.save(OmegaConf.create(hydra), run_dir / ".hydra" / "hydra.yaml")
    (run_dir / "summary.json").write_text(json.dumps(summary))


def evaluation(before: float, after: float, rouge: tuple[float, float], **extra: float) -> dict:
    return {
        "eval/before/toxicity_mean": before,
        "eval/after/toxicity_mean": after,
        "eval/before/rouge_l": rouge[0],
        "eval/after/rouge_l": rouge[1],
        "eval/after/kl_to_reference": 0.5,
        **extra,
    }


def test_missing_subtree_is_one_column_after_the_metrics(tmp_path: Path, capsys) -> None:
    """Three seeds with W&B and one run with logger=none: one `logger` column, after the
    metrics; the seed (a value every run has) before them."""
    sweep = tmp_path / "sweep"
    for job, (seed, logger) in enumerate([(1, "wandb"), (2, "wandb"), (3, "wandb"), (1, "none")]):
        config = {"seed": seed, "logger": WANDB_LOGGER if logger == "wandb" else NONE_LOGGER}
        summary = evaluation(0.2, 0.1, (0.3, 0.3))
        write_run(sweep / str(job), config, summary, {"logger": logger, "ppo": "rloo"})
    runs = load_runs([str(sweep)])
    assert differing_keys(runs) == ["seed", "logger"]
    assert main([str(sweep), "--no-plots"]) == 0
    rows = table_rows(capsys.readouterr().out)
    header = rows[0]
    assert header[:3] == ["run", "seed", "eval/before/toxicity_mean"]
    assert header[-1] == "logger" and not any(h.startswith("logger.") for h in header)
    assert {r[0]: r[-1] for r in rows[2:]} == {
        "0": "wandb",
        "1": "wandb",
        "2": "wandb",
        "3": "none",
    }
    # without Hydra's choices (no hydra.yaml): the subtree's key, once
    a, b = (
        RunRecord(n, {}, flatten({"logger": c}), [])
        for n, c in (("a", WANDB_LOGGER), ("b", NONE_LOGGER))
    )
    assert differing_keys([a, b]) == ["logger.log_model", "logger.wandb"]
    assert [config_cell(r, "logger.wandb") for r in (a, b)] == ["{5 keys}", "null"]
    # a group only newer runs have: one column
    new = flatten({"seed": 1, "frontier": {"beta": 1, "grid": [0.1, 1]}})
    assert differing_keys([new, {"seed": 2}]) == ["seed", "frontier"]


def test_different_baselines_compare_relative_changes(tmp_path: Path, capsys) -> None:
    """Each run's change from its own baseline sorts the rows: 'a' lowered toxicity by 50%
    from 0.4, 'b' by 20% from 0.1 (lower after-value, smaller improvement)."""
    write_run(tmp_path / "a", {"seed": 1}, evaluation(0.4, 0.2, (0.30, 0.33)))
    write_run(tmp_path / "b", {"seed": 2}, evaluation(0.1, 0.08, (0.25, 0.25)))
    out = tmp_path / "plots"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "baselines (eval/before/toxicity_mean) differ" in stdout
    rows = table_rows(stdout)
    header = rows[0]
    assert [r[0] for r in rows[2:]] == ["a", "b"]  # by the relative change, not 0.08 < 0.2
    cells = {r[0]: dict(zip(header, r)) for r in rows[2:]}
    assert cells["a"]["eval/delta/toxicity_mean_rel"] == "-50.0%"
    assert cells["b"]["eval/delta/toxicity_mean_rel"] == "-20.0%"
    assert cells["a"]["eval/delta/rouge_l_rel"] == "+10.0%"
    assert cells["a"]["eval/delta/toxicity_mean"] == "-0.200"
    check_png(out / "pareto.png")
    # the same baseline: absolute values, no relative column, sorted by the after-value
    write_run(tmp_path / "c", {"seed": 3}, evaluation(0.4, 0.3, (0.30, 0.31)))
    assert main([str(tmp_path / "a"), str(tmp_path / "c"), "--no-plots"]) == 0
    stdout = capsys.readouterr().out
    assert "baselines" not in stdout
    rows = table_rows(stdout)
    assert not any(h.endswith("_rel") for h in rows[0])
    assert [r[0] for r in rows[2:]] == ["a", "c"]


def test_format_metric_relative_changes() -> None:
    assert (
        format_metric({"eval/before/x": 0.4, "eval/after/x": 0.3}, "eval/delta/x_rel") == "-25.0%"
    )
    assert format_metric({"eval/before/x": 0.4, "eval/after/x": 0.3}, "eval/delta/x") == "-0.100"
    assert format_metric({"eval/before/x": 0.0, "eval/after/x": 0.3}, "eval/delta/x_rel") == "-"
    summary = {"d_rel": -0.5, "d_rel_ci_low": -0.612, "d_rel_ci_high": 0.0}
    assert format_metric(summary, "d_rel") == "-50.0% [-61.2%, +0.0%]"


def capture_pareto(monkeypatch: pytest.MonkeyPatch, runs: list[RunRecord], tmp_path: Path):
    """The axes plot_pareto draws: {legend label: the points of that scatter}, and the axes."""
    import detox_exp.compare_plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    plots.plot_pareto(runs, tmp_path / "p.png")
    (ax,) = figures[0].axes
    return {c.get_label(): [tuple(p) for p in c.get_offsets()] for c in ax.collections}, ax


def test_table_and_plots_show_the_optimum(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    optimum = {
        "eval/optimum/toxicity_mean": 0.05,
        "eval/optimum/rouge_l": 0.29,
        "eval/optimum/kl_to_reference": 0.3,
    }
    write_run(tmp_path / "a", {"seed": 1}, evaluation(0.2, 0.1, (0.3, 0.31), **optimum))
    write_run(tmp_path / "b", {"seed": 2}, evaluation(0.2, 0.15, (0.3, 0.32)))  # no optimum
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--no-plots"]) == 0
    rows = table_rows(capsys.readouterr().out)
    header = rows[0]
    at = header.index("eval/after/toxicity_mean")
    assert header[at - 1 : at + 2] == [
        "eval/before/toxicity_mean",
        "eval/after/toxicity_mean",
        "eval/optimum/toxicity_mean",
    ]
    assert "eval/optimum/rouge_l" in header and "eval/optimum/kl_to_reference" in header
    cells = {r[0]: dict(zip(header, r)) for r in rows[2:]}
    assert cells["a"]["eval/optimum/toxicity_mean"] == "0.050"
    assert cells["b"]["eval/optimum/toxicity_mean"] == "-"
    # the same baseline: absolute axes; a's reference and optimum beside its point
    runs = load_runs([str(tmp_path / "a"), str(tmp_path / "b")])
    points, ax = capture_pareto(monkeypatch, runs, tmp_path)
    assert points["reference (before PPO)"] == [(0.2, 0.3)]  # both runs' reference
    assert points["optimum at the run's beta"] == [(0.05, 0.29)]
    lines = [list(zip(*line.get_data())) for line in ax.lines]
    assert [(0.2, 0.3), (0.1, 0.31)] in lines and [(0.05, 0.29), (0.1, 0.31)] in lines
    # different baselines: every point as the change from its run's own baseline, in %
    runs[1].summary["eval/before/toxicity_mean"] = 0.3
    points, ax = capture_pareto(monkeypatch, runs, tmp_path)
    assert points["reference (before PPO)"] == [(0.0, 0.0)]
    ((x, y),) = points["optimum at the run's beta"]
    assert x == pytest.approx(-75.0) and y == pytest.approx(100 * (0.29 / 0.3 - 1))
    assert "change from the run's own baseline" in ax.get_xlabel()
    # no run has before or optimum values: the plot as before
    bare = [RunRecord("x", {"eval/after/toxicity_mean": 0.1, "eval/after/rouge_l": 0.3}, {}, [])]
    points, _ = capture_pareto(monkeypatch, bare, tmp_path)
    assert set(points) == {"Pareto-optimal"}


def test_a_ppo_run_and_a_guided_run_on_one_table_and_plot(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimum, the guided teacher, the distilled policy and RLOO side by side."""
    optimum = {
        "eval/optimum/toxicity_mean": 0.01,
        "eval/optimum/rouge_l": 0.30,
        "eval/optimum/kl_to_reference": 0.25,
        "eval/vs_optimum/toxicity_drop_achieved": 0.6,
    }
    teacher = {
        "eval/teacher/toxicity_mean": 0.05,
        "eval/teacher/rouge_l": 0.299,
        "eval/teacher/kl_to_reference": 0.13,
        "eval/vs_optimum/teacher_toxicity_drop_achieved": 0.77,
    }
    rloo = {"algorithm": {"name": "ppo"}, "seed": 1}
    guided = {"algorithm": {"name": "guided"}, "seed": 1}
    write_run(tmp_path / "rloo", rloo, evaluation(0.2, 0.09, (0.3, 0.29), **optimum))
    write_run(tmp_path / "guided", guided, evaluation(0.2, 0.08, (0.3, 0.3), **optimum, **teacher))
    assert main([str(tmp_path / "rloo"), str(tmp_path / "guided"), "--no-plots"]) == 0
    rows = table_rows(capsys.readouterr().out)
    header = rows[0]
    for key in (
        "algorithm.name",
        "eval/optimum/toxicity_mean",
        "eval/teacher/toxicity_mean",
        "eval/teacher/kl_to_reference",
        "eval/vs_optimum/toxicity_drop_achieved",
        "eval/vs_optimum/teacher_toxicity_drop_achieved",
    ):
        assert key in header, key
    cells = {r[0]: dict(zip(header, r)) for r in rows[2:]}
    assert cells["guided"]["eval/teacher/toxicity_mean"] == "0.050"
    assert cells["rloo"]["eval/teacher/toxicity_mean"] == "-"
    runs = load_runs([str(tmp_path / "rloo"), str(tmp_path / "guided")])
    points, ax = capture_pareto(monkeypatch, runs, tmp_path)
    assert points["guided teacher"] == [(0.05, 0.299)]
    assert points["optimum at the run's beta"] == [(0.01, 0.30)]
    lines = [list(zip(*line.get_data())) for line in ax.lines]
    assert [(0.05, 0.299), (0.08, 0.3)] in lines  # the teacher joined to its policy
