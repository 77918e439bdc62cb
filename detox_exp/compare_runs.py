"""The runs ``detox-exp-compare`` reads: run dirs, sweep dirs (one run per job) and W&B runs,
each as a :class:`RunRecord` (final metrics, flat config, per-step history), and what the
table and the plots read off their summaries (numbers, changes from each run's baseline,
the Pareto front)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detox_exp import metric_names as M

CURVES = (M.REWARD_MEAN, M.KL)  # the per-step history kept of a W&B run
WANDB_PATH = re.compile(r"^(?:https?://[^/]+/)?([\w.-]+)/([\w.-]+)/(?:runs/)?([\w-]+)/?$")


class CompareError(Exception):
    """Bad input: printed as one line, exit code 2."""


@dataclass
class RunRecord:
    """One run: short name, final metrics, flat (dotted) config and per-step history."""

    name: str
    summary: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]]
    source: str = ""
    run_dirs: tuple[str, ...] = field(default_factory=tuple)  # strings meaning "this run dir"
    choices: dict[str, Any] = field(default_factory=dict)  # Hydra's group -> option, if known


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists and scalars are leaves."""
    if not isinstance(node, Mapping) or (not node and prefix):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _read_config(path: Path) -> dict[str, Any]:
    """The composed Hydra config, flattened WITHOUT resolving (``${...}`` stay as text)."""
    try:
        return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    except Exception as err:  # a malformed or half-written file
        raise CompareError(f"{path}: cannot read ({_first_line(err)}); fix: check it") from None


def _read_choices(path: Path) -> dict[str, Any]:
    """Hydra's config group choices (``ppo`` -> ``rloo``) from ``.hydra/hydra.yaml``, or {}
    (they only name a difference that the config shows anyway)."""
    try:
        hydra = OmegaConf.to_container(OmegaConf.load(path), resolve=False)["hydra"]
        return dict(hydra["runtime"]["choices"])
    except Exception:
        return {}


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _read_history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; skips a torn last line of a run that is still writing."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]


def load_run(path: str | Path, name: str | None = None) -> RunRecord:
    """Read a local run dir (summary.json, metrics.jsonl, .hydra/config.yaml)."""
    run_dir, summary_path = Path(path), Path(path) / "summary.json"
    try:
        summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise CompareError(f"{summary_path}: not valid JSON ({err}); fix: rerun") from None
    dirs = tuple(sorted({str(run_dir.resolve()), os.path.abspath(run_dir)}))  # absolute only
    config_path, history = run_dir / ".hydra/config.yaml", _read_history(run_dir / "metrics.jsonl")
    config = _read_config(config_path) if config_path.is_file() else {}
    choices = _read_choices(run_dir / ".hydra/hydra.yaml")
    name = name or run_dir.resolve().name
    return RunRecord(name, summary, config, history, str(run_dir), dirs, choices)


def load_wandb_run(run_path: str) -> RunRecord:
    """Fetch summary, config and reward / KL history of ``entity/project/run_id`` from W&B."""
    try:
        import wandb

        run = wandb.Api(timeout=30).run(run_path)
        summary = {k: v for k, v in dict(run.summary).items() if isinstance(v, (int, float))}
        config = flatten(dict(run.config))
        rows = run.history(keys=list(CURVES), pandas=False)
    except Exception as err:
        raise CompareError(
            f"{run_path}: W&B run could not be fetched ({_first_line(err)}); fix: check the run "
            "path (entity/project/run_id), network access and WANDB_API_KEY, or the local path"
        ) from None
    history = [r | {"step": r.get("step", r.get("_step"))} for r in rows]
    output_dir = config.get("paths.output_dir")
    dirs = (output_dir,) if isinstance(output_dir, str) and "${" not in output_dir else ()
    return RunRecord(run_path, summary, config, history, f"wandb:{run_path}", dirs)


def _job_dirs(path: Path) -> list[Path]:
    """Job dirs of a sweep dir (or any dir of run dirs) that have a summary.json."""
    jobs = [p for p in path.iterdir() if p.is_dir() and (p / "summary.json").is_file()]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def expand_paths(paths: Sequence[str]) -> list[Path | str]:
    """Run dirs stay, sweep dirs become their job dirs, the rest must be W&B run paths."""
    out: list[Path | str] = []
    for raw in paths:
        path = Path(raw)
        if (path / "summary.json").is_file() or (path / ".hydra" / "config.yaml").is_file():
            out.append(path)
        elif path.is_dir() and _job_dirs(path):
            out.extend(_job_dirs(path))
        elif not path.exists() and WANDB_PATH.match(raw):
            out.append("/".join(WANDB_PATH.match(raw).groups()))  # type: ignore[union-attr]
        else:
            raise CompareError(
                f"{raw}: not a run dir, sweep dir or W&B run path; fix: pass a Hydra run dir (with "
                "summary.json), a sweep dir (job dirs with summary.json) or entity/project/run_id"
            )
    keys = [str(i.resolve()) if isinstance(i, Path) else i for i in out]
    return [item for n, (key, item) in enumerate(zip(keys, out)) if key not in keys[:n]]


def load_runs(paths: Sequence[str]) -> list[RunRecord]:
    """Expand and load every PATH; local runs are named relative to their common parent."""
    items = expand_paths(paths)
    local = [p.resolve() for p in items if isinstance(p, Path)]
    parent = Path(os.path.commonpath([str(p.parent) for p in local])) if local else None
    name = {p: os.path.relpath(p.resolve(), parent) for p in items if isinstance(p, Path)}
    return [load_wandb_run(i) if isinstance(i, str) else load_run(i, name[i]) for i in items]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, minimising x and maximising y.

    A point is dominated when another is at least as good in both and strictly better in one;
    equal points do not dominate each other (all are kept). NaN / None points are never on it.
    """
    ok = [all(v is not None and not math.isnan(v) for v in p) for p in points]
    valid = [p for p, good in zip(points, ok) if good]

    def dominated(x: float, y: float) -> bool:
        return any(xo <= x and yo >= y and (xo < x or yo > y) for xo, yo in valid)

    return [i for i, (x, y) in enumerate(points) if ok[i] and not dominated(x, y)]


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def relative_change(summary: Mapping[str, Any], phase: str, name: str) -> float | None:
    """``eval/<phase>/<name>`` / ``eval/before/<name>`` - 1: the change from the run's own
    baseline (None without both, or with a zero baseline)."""
    value, before = (number(summary.get(M.eval_key(p, name))) for p in (phase, "before"))
    return value / before - 1.0 if value is not None and before else None


def baselines_differ(runs: Sequence[RunRecord], name: str) -> bool:
    """Whether the runs' ``eval/before/<name>`` (their reference's value) differ."""
    values = {number(r.summary.get(M.eval_key("before", name))) for r in runs} - {None}
    return len({round(v, 9) for v in values}) > 1
