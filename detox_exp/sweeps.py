"""Hydra multirun support: W&B grouping per sweep, per-job records, the optimised value.

Each job of ``detox-exp -m ...`` is its own W&B run; all jobs of one sweep share the W&B group
``<task_name>/<sweep dir name>``, and a job's overrides become its job_type and tags. A
failing job is recorded in ``<sweep_dir>/sweep_summary.jsonl`` and the sweep goes on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from detox_exp import metric_names as M
from detox_exp.utils import write_json


@dataclass
class JobInfo:
    multirun: bool
    num: int
    overrides: list[str]
    sweep_dir: Path | None


def job_info() -> JobInfo | None:
    """This job's place in a (multi)run, or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return JobInfo(
        multirun=multirun,
        num=int(hydra_cfg.job.get("num") or 0),
        overrides=list(hydra_cfg.overrides.task),
        sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
    )


def wandb_defaults(cfg: DictConfig, info: JobInfo | None) -> dict[str, Any]:
    """Values for the W&B settings left null in conf/logger (group, job_type, tags, name)."""
    if info is None or not info.multirun:
        return {"group": cfg.task_name, "job_type": "run"}
    shown = [o for o in info.overrides if not o.startswith(("hydra.", "logger."))]
    job = ",".join(shown) or "default"
    return {
        "group": f"{cfg.task_name}/{info.sweep_dir.name}",
        "job_type": job[:64],  # W&B's limit
        "tags": [o[:64] for o in shown],
        "name": f"{cfg.task_name}-{info.sweep_dir.name}-{info.num}",
    }


def objective(summary: dict[str, Any], cfg: DictConfig) -> float | None:
    """``optimized_metric`` plus ``objective.weight`` x the ROUGE-L shortfall below
    ``objective.rouge_l_floor`` x the baseline ROUGE-L (no penalty when the floor is null)."""
    value = summary.get(cfg.get("optimized_metric") or "")
    if value is None:
        return None
    value = float(value)
    spec = cfg.get("objective") or {}
    floor = spec.get("rouge_l_floor")
    before, after = (summary.get(M.eval_key(phase, "rouge_l")) for phase in M.EVAL_PHASES)
    if floor is not None and before is not None and after is not None:
        value += float(spec.get("weight", 1.0)) * max(0.0, floor * before - after)
    return value


def record_job(
    info: JobInfo, status: str, summary: dict[str, Any], run_dir: Path, error: str | None = None
) -> None:
    """Append this job to the sweep's summary (jsonl + a markdown table rebuilt each time)."""
    if info.sweep_dir is None:
        return
    row = {
        "job": info.num,
        "overrides": info.overrides,
        "status": status,
        "run_dir": str(run_dir),
        "error": error,
    } | {k: summary.get(k) for k in M.SWEEP_SUMMARY_METRICS}
    info.sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(info.sweep_dir / "sweep_summary.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    rows = [
        json.loads(x) for x in (info.sweep_dir / "sweep_summary.jsonl").read_text().splitlines()
    ]
    rows.sort(key=lambda r: r["job"])
    lines = [
        "| job | overrides | status | " + " | ".join(M.SWEEP_SUMMARY_METRICS) + " |",
        "|---" * (3 + len(M.SWEEP_SUMMARY_METRICS)) + "|",
    ]
    for r in rows:
        cells = [_fmt(r.get(k)) for k in M.SWEEP_SUMMARY_METRICS]
        status = r["status"] + (f": {' '.join(r['error'].split())}" if r.get("error") else "")
        lines.append(
            f"| {r['job']} | {' '.join(r['overrides'])} | {status.replace('|', '/')} | "
            + " | ".join(cells)
            + " |"
        )
    (info.sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    write_json(info.sweep_dir / "sweep_summary.json", rows)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class SweepReport(Callback):
    """A Hydra callback (conf/hydra/default.yaml): a multirun ends with its summary table,
    the sweep folder and the command that compares its runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = sweep_dir / "sweep_summary.md"
        if summary.is_file():
            print(f"\n{summary.read_text()}", end="")
        print(f"sweep dir: {sweep_dir}")
        if summary.is_file():
            print(f"summary: {summary}")
        print(f"compare the runs: detox-exp-compare {sweep_dir}", flush=True)
