"""trl 0.11.4 and detox_exp side by side on one benchmark DIR, in interleaved rounds.

    python benchmarks/side_by_side.py DIR --trl-python /tmp/trl/bin/python --rounds 3 --steps 10

Each round runs these one right after the other: trl fp32, trl fp32 with glibc malloc tuned
by environment variables (our runs tune it themselves, ``keep_freed_memory``), ours fp32,
and the same three in bf16 (``--no-malloc-rows`` leaves the malloc-tuned trl runs out). The
VM's speed drifts from run to run, so every ratio pairs runs of the same round;
``--variant NAME='OVERRIDES'`` (repeatable) adds our runs with extra overrides to every round,
e.g. ``--variant "rloo k=4"='ppo=rloo ppo.samples_per_prompt=4'``. The table
gives the median over the rounds of each column (and of the same-round ratios), with the
per-round values in parentheses. Every run is appended to ``<out>/results.jsonl`` as it
finishes; ``--from-results FILE`` prints the table again from such a file. The trl venv is
set up as described in benchmarks/trl_baseline.py; trl is never a project dependency.
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

from detox_exp import metric_names as M

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
OURS_PHASE_KEYS = {  # summary.json keys of each phase (generate + score summed)
    PHASES[0]: (M.TIME_GENERATE, M.TIME_SCORE),
    PHASES[1]: (M.TIME_FORWARD,),
    PHASES[2]: (M.TIME_OPTIMIZE,),
}
TRL_PHASE_KEYS = {  # printed by benchmarks/trl_baseline.py
    PHASES[0]: "perf/median_generate_score_s",
    PHASES[1]: "perf/median_forward_s",
    PHASES[2]: "perf/median_optimize_s",
}


def _phases(who: str, perf: dict[str, float]) -> dict[str, float]:
    """Per-phase median seconds under common names (trl times generation and scoring as one)."""
    if who == "trl":
        return {phase: perf[key] for phase, key in TRL_PHASE_KEYS.items()}
    return {
        phase: sum(perf[f"perf/median_{key}"] for key in keys)
        for phase, keys in OURS_PHASE_KEYS.items()
    }


def variant_runs(variants: list[str]) -> dict[str, tuple[str, str, bool, list[str]]]:
    """Our extra rows from ``NAME=OVERRIDES`` strings: name -> (who, precision, malloc,
    overrides), one fp32 and one bf16 row per variant."""
    runs = {}
    for variant in variants:
        label, sep, overrides = variant.partition("=")
        if not sep or not label.strip():
            raise SystemExit(f"--variant {variant!r}: expected NAME=OVERRIDES")
        for precision, row in (("fp32", "detox_exp, fp32"), ("bf16", "detox_exp, precision=bf16")):
            runs[f"{row}, {label.strip()}"] = ("ours", precision, False, overrides.split())
    return runs


def run_one(
    name: str,
    bench_dir: Path,
    steps: int,
    device: str,
    trl_python: str,
    out: Path,
    rnd: int,
    runs: dict | None = None,
) -> dict:
    """Run one benchmark command; returns its record (name, round, perf numbers, phases)."""
    who, precision, malloc, *extra = (runs or RUNS)[name]
    overrides = extra[0] if extra else []
    env = os.environ | (MALLOC if malloc else {})
    if who == "trl":
        cmd = [trl_python, str(ROOT / "benchmarks" / "trl_baseline.py"), str(bench_dir)]
        cmd += ["--steps", str(steps), "--device", device]
        cmd += ["--mixed-precision", "bf16" if precision == "bf16" else "no"]
    else:
        slug = "".join(c if c.isalnum() else "_" for c in name)
        run_dir = out / f"{slug}_round{rnd}"
        cmd = [sys.executable, "-m", "detox_exp", "experiment=bench"]
        cmd += [f"model.name_or_path={bench_dir}/policy", f"reward.name_or_path={bench_dir}/reward"]
        cmd += ["dataset=jsonl", f"dataset.path={bench_dir}/prompts.jsonl"]
        cmd += [f"ppo.steps={steps}", f"precision={precision}", f"device={device}"]
        cmd += [f"hydra.run.dir={run_dir}", *overrides]
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


def _cell(values: list[float], fmt=_num, unit: str = "") -> str:
    """The median, then the per-round values."""
    return f"{fmt(statistics.median(values))}{unit} ({', '.join(fmt(x) for x in values)})"


def table(records: list[dict]) -> str:
    """Markdown table: per column, the median over the rounds (and the per-round values);
    ratios pair each run with the trl fp32 run of its round."""
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    base = {r["round"]: r["perf"][M.SAMPLES_PER_S] for r in by_name.get(BASELINE, [])}
    gpu = any(M.PEAK_CUDA_MB in r["perf"] for r in records)
    head = ["", "samples / s", "vs trl fp32, same round", "s / step", "peak RSS MB"]
    head += ["peak GPU MB"] * gpu + [f"{phase} (s)" for phase in PHASES]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in list(RUNS) + [n for n in by_name if n not in RUNS]:
        runs = sorted(by_name.get(name, []), key=lambda r: r["round"])
        if not runs:
            continue

        def column(key: str, runs: list[dict] = runs) -> list[float]:
            return [r["perf"][key] for r in runs]

        ratios = [r["perf"][M.SAMPLES_PER_S] / base[r["round"]] for r in runs if r["round"] in base]
        cells = [
            name,
            _cell(column(M.SAMPLES_PER_S)),
            _cell(ratios, lambda x: f"{x:.2f}", "x") if ratios else "n/a",
            _cell(column(M.MEDIAN_STEP_S)),
            _cell(column(M.PEAK_RSS_MB), lambda x: f"{x:,.0f}"),
            *([_cell(column(M.PEAK_CUDA_MB), lambda x: f"{x:,.0f}")] if gpu else []),
            *(_cell([r["phases"][phase] for r in runs]) for phase in PHASES),
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
    parser.add_argument("--no-malloc-rows", action="store_true", help="skip malloc-tuned trl")
    parser.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated: the precisions to run"
    )
    parser.add_argument("--out", type=Path, help="default: outputs/bench/side_by_side/<time>")
    parser.add_argument("--from-results", type=Path, help="print the table of a results.jsonl")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="also run ours with these overrides (fp32 and bf16), in every round",
    )
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
    out = (
        args.out or ROOT / "outputs/bench/side_by_side" / time.strftime("%Y%m%d-%H%M%S")
    ).resolve()
    if (out / "results.jsonl").exists():
        parser.error(f"{out}/results.jsonl exists: pass a new --out (rounds would be mispaired)")
    out.mkdir(parents=True, exist_ok=True)
    # absolute, not resolved: a venv's bin/python is a symlink to the base interpreter
    trl_python = (
        str(Path(args.trl_python).absolute()) if "/" in args.trl_python else args.trl_python
    )
    runs = RUNS | variant_runs(args.variant)
    names = [
        n
        for n in runs
        if not (args.no_malloc_rows and runs[n][2]) and runs[n][1] in args.precisions.split(",")
    ]
    records = []
    with (out / "results.jsonl").open("w") as results:
        for rnd in range(1, args.rounds + 1):
            for name in names:
                record = run_one(
                    name, args.dir.resolve(), args.steps, args.device, trl_python, out, rnd, runs
                )
                records.append(record)
                results.write(json.dumps(record) + "\n")
                results.flush()
                print(f"round {rnd}: {name}: {json.dumps(record['perf'])}", flush=True)
    print(table(records))
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
