"""trl 0.11.4 and detox_exp side by side on one benchmark DIR, in interleaved rounds.

    python benchmarks/side_by_side.py DIR --trl-python /tmp/trl/bin/python --rounds 3 --steps 10

Each round runs these one right after the other: trl fp32, trl fp32 with glibc malloc tuned
by environment variables (our runs tune it themselves, ``keep_freed_memory``), ours fp32,
and the same three in bf16. The VM's speed drifts from run to run, so the table reports
medians over the rounds, and each ratio comes from runs of the same round. Every run is
appended to ``<out>/results.jsonl`` as it finishes. ``--from-results FILE`` prints the table
again from such a file without running anything. The trl venv is set up as described in
benchmarks/trl_baseline.py; trl is never a project dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
# name -> (who, precision, malloc tuned by env vars); the order of a round
RUNS = {
    "trl 0.11.4, fp32": ("trl", "fp32", False),
    "trl 0.11.4, fp32, malloc tuned": ("trl", "fp32", True),
    "detox_exp, fp32": ("ours", "fp32", False),
    "trl 0.11.4, bf16 autocast": ("trl", "bf16", False),
    "trl 0.11.4, bf16 autocast, malloc tuned": ("trl", "bf16", True),
    "detox_exp, precision=bf16": ("ours", "bf16", False),
}
BASELINE = "trl 0.11.4, fp32"
PHASES = ("generate + score", "forward passes", "optimisation")


def _phases(who: str, perf: dict[str, float]) -> dict[str, float]:
    """Per-phase median seconds under common names (trl times generation and scoring as one)."""
    if who == "trl":
        keys = ("perf/median_generate_score_s", "perf/median_forward_s", "perf/median_optimize_s")
        return {name: perf[key] for name, key in zip(PHASES, keys)}
    return {
        PHASES[0]: perf["perf/median_time/generate"] + perf["perf/median_time/score"],
        PHASES[1]: perf["perf/median_time/forward"],
        PHASES[2]: perf["perf/median_time/optimize"],
    }


def run_one(
    name: str, bench_dir: Path, steps: int, device: str, trl_python: str, out: Path, rnd: int
) -> dict:
    """Run one benchmark command; returns its record (name, round, perf numbers, phases)."""
    who, precision, malloc = RUNS[name]
    env = os.environ | (MALLOC if malloc else {})
    if who == "trl":
        cmd = [trl_python, str(ROOT / "benchmarks" / "trl_baseline.py"), str(bench_dir)]
        cmd += ["--steps", str(steps), "--device", device]
        cmd += ["--mixed-precision", "bf16" if precision == "bf16" else "no"]
    else:
        run_dir = out / f"{precision}_round{rnd}"
        cmd = [sys.executable, "-m", "detox_exp", "experiment=bench"]
        cmd += [f"model.name_or_path={bench_dir}/policy", f"reward.name_or_path={bench_dir}/reward"]
        cmd += ["dataset=jsonl", f"dataset.path={bench_dir}/prompts.jsonl"]
        cmd += [f"ppo.steps={steps}", f"precision={precision}", f"device={device}"]
        cmd += [f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}, round {rnd} failed:\n{' '.join(cmd)}\n{done.stderr[-3000:]}")
    if who == "trl":
        perf = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        perf = json.loads((run_dir / "summary.json").read_text())
    perf = {k: v for k, v in perf.items() if k.startswith("perf/")}
    return {"name": name, "round": rnd, "perf": perf, "phases": _phases(who, perf)}


def _num(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _mb(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({', '.join(f'{x:,.0f}' for x in values)})"


def table(records: list[dict]) -> str:
    """Markdown table: medians over the rounds, the baseline ratio per round, and the phase
    times of the run whose samples/s is the median (the lower middle one for even counts)."""
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    base = {r["round"]: r["perf"]["perf/samples_per_s"] for r in by_name.get(BASELINE, [])}
    gpu = any("perf/peak_cuda_mb" in r["perf"] for r in records)
    head = ["", "samples / s (rounds)", "vs trl fp32 (rounds)", "s / step", "peak RSS MB (rounds)"]
    head += ["peak GPU MB (rounds)"] * gpu + list(PHASES)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in RUNS:
        runs = sorted(by_name.get(name, []), key=lambda r: r["round"])
        if not runs:
            continue
        sps = [r["perf"]["perf/samples_per_s"] for r in runs]
        middle = sorted(runs, key=lambda r: r["perf"]["perf/samples_per_s"])[(len(runs) - 1) // 2]
        ratios = [r["perf"]["perf/samples_per_s"] / base[r["round"]] for r in runs if base]
        ratio = (
            f"{statistics.median(sps) / statistics.median(base.values()):.2f}x "
            f"({', '.join(f'{x:.2f}' for x in ratios)})"
            if base
            else "n/a"
        )
        cells = [
            name,
            f"{_num(statistics.median(sps))} ({', '.join(_num(x) for x in sps)})",
            ratio,
            f"{middle['perf']['perf/median_step_s']:.2f}",
            _mb([r["perf"]["perf/peak_rss_mb"] for r in runs]),
            *([_mb([r["perf"].get("perf/peak_cuda_mb", float("nan")) for r in runs])] * gpu),
            *(f"{middle['phases'][p]:.2f} s" for p in PHASES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, nargs="?", help="a DIR from scripts/make_bench_dir.py")
    parser.add_argument("--trl-python", help="python of the venv with trl 0.11.4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="default: outputs/bench/side_by_side/<time>")
    parser.add_argument("--from-results", type=Path, help="print the table of a results.jsonl")
    args = parser.parse_args()
    if args.from_results:
        lines = args.from_results.read_text().splitlines()
        print(table([json.loads(line) for line in lines if line.strip()]))
        return
    if args.dir is None or args.trl_python is None:
        parser.error("DIR and --trl-python are needed to run (or pass --from-results FILE)")
    if not (args.dir / "policy").is_dir() or not (args.dir / "prompts.jsonl").is_file():
        parser.error(f"{args.dir} is not a benchmark DIR: build it with scripts/make_bench_dir.py")
    if args.rounds < 1 or args.steps < 2:
        parser.error("--rounds must be >= 1 and --steps >= 2 (the first step is not timed)")
    out = args.out or ROOT / "outputs" / "bench" / "side_by_side" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with (out / "results.jsonl").open("a") as results:
        for rnd in range(1, args.rounds + 1):
            for name in RUNS:
                record = run_one(
                    name, args.dir.resolve(), args.steps, args.device, args.trl_python, out, rnd
                )
                records.append(record)
                results.write(json.dumps(record) + "\n")
                results.flush()
                print(f"round {rnd}: {name}: {json.dumps(record['perf'])}", flush=True)
    print(table(records))
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
