"""benchmarks/side_by_side.py: the table's medians, per-round ratios and phase names."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests.helpers.run import ROOT

spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "benchmarks/side_by_side.py")
side = importlib.util.module_from_spec(spec)
spec.loader.exec_module(side)


def _record(name: str, rnd: int, sps: float, rss: float) -> dict:
    who = side.RUNS[name][0]
    perf = {"perf/samples_per_s": sps, "perf/median_step_s": 16 / sps, "perf/peak_rss_mb": rss}
    if who == "trl":
        perf |= {
            "perf/median_generate_score_s": 1.0,
            "perf/median_forward_s": 0.5,
            "perf/median_optimize_s": 0.25,
        }
    else:
        perf |= {
            "perf/median_time/generate": 0.5,
            "perf/median_time/score": 0.125,
            "perf/median_time/forward": 0.25,
            "perf/median_time/optimize": rnd,  # tells the rounds apart
        }
    return {"name": name, "round": rnd, "perf": perf, "phases": side._phases(who, perf)}


RECORDS = [
    _record("trl 0.11.4, fp32", 1, 4.0, 800),
    _record("detox_exp, precision=bf16", 1, 10.0, 700),
    _record("trl 0.11.4, fp32", 2, 8.0, 900),
    _record("detox_exp, precision=bf16", 2, 12.0, 650),
    _record("trl 0.11.4, fp32", 3, 5.0, 1000),
    _record("detox_exp, precision=bf16", 3, 13.0, 600),
]


def test_table_reports_medians_and_same_round_ratios() -> None:
    lines = side.table(RECORDS).splitlines()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines}
    ours = rows["detox_exp, precision=bf16"]
    assert ours[1] == "12.00 (10.00, 12.00, 13.00)"
    # each round against that round's trl run (2.5, 1.5, 2.6), not median / median (12 / 5)
    assert ours[2] == "2.50x (2.50, 1.50, 2.60)"
    assert ours[3] == f"{16 / 12:.2f} ({16 / 10:.2f}, {16 / 12:.2f}, {16 / 13:.2f})"
    assert ours[4] == "650 (700, 650, 600)"
    assert ours[5] == "0.625 (0.625, 0.625, 0.625)"  # generate + score
    assert ours[7] == "2.00 (1.00, 2.00, 3.00) |"  # optimisation, per round
    assert rows["trl 0.11.4, fp32"][2] == "1.00x (1.00, 1.00, 1.00)"
    assert "malloc tuned" not in side.table(RECORDS)  # runs not made are not listed
    assert "peak GPU MB" not in lines[0]  # CPU runs have no GPU column


def test_rounds_without_a_baseline_get_no_ratio() -> None:
    lonely = [r for r in RECORDS if r["round"] != 2 or r["name"] != side.BASELINE]
    ours = {line.split(" | ")[0][2:]: line.split(" | ") for line in side.table(lonely).splitlines()}
    assert ours["detox_exp, precision=bf16"][2] == "2.55x (2.50, 2.60)"
    assert side.table(RECORDS[1::2]).splitlines()[2].split(" | ")[2] == "n/a"


def test_from_results_prints_the_same_table(tmp_path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    done = subprocess.run(
        [sys.executable, "benchmarks/side_by_side.py", "--from-results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == side.table(RECORDS)


def test_refuses_a_dir_that_is_not_a_benchmark_dir(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/side_by_side.py", str(tmp_path), "--trl-python", "python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "scripts/make_bench_dir.py" in done.stderr


def test_variants_add_our_rows_with_their_overrides() -> None:
    runs = side.variant_runs(["rloo4=ppo=rloo ppo.samples_per_prompt=4"])
    assert runs["detox_exp, fp32, rloo4"][3] == ["ppo=rloo", "ppo.samples_per_prompt=4"]
    record = _record("trl 0.11.4, fp32", 1, 4.0, 800)
    ours = _record("detox_exp, precision=bf16", 1, 20.0, 700) | {
        "name": "detox_exp, precision=bf16, rloo4"
    }
    rows = {line.split(" | ")[0][2:]: line for line in side.table([record, ours]).splitlines()}
    assert "5.00x" in rows["detox_exp, precision=bf16, rloo4"]
