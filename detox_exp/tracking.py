"""One logging API for every stage: W&B (optional) + metrics.jsonl + summary.json.

Files in the run dir make a run readable without W&B:
- ``metrics.jsonl``: one JSON object per logged step, always with the global ``step``.
- ``summary.json``: the final value of every summary metric (eval/before/*, eval/after/*, ...).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detox_exp.utils import write_json

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


def _to_float(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class Tracker:
    """Logs metrics to ``<run_dir>/metrics.jsonl``, ``summary.json`` and, if configured, W&B.

    Args:
        run_dir: the run dir (Hydra's output dir).
        wandb: ``wandb.init`` settings (project, entity, group, job_type, tags, name, notes,
            mode, dir) or None for no W&B. ``mode`` null means online when WANDB_API_KEY is
            set, else offline.
    """

    def __init__(self, run_dir: str | Path, wandb: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.wandb_settings = dict(wandb) if wandb is not None else None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.summary: dict[str, Any] = {}
        self.run: Any = None
        self._wandb_failed = False
        # False on the non-main processes of a multi-process run: they log nothing
        self.enabled = True
        self.resume_id: str | None = None
        self.resume_step: int | None = None
        if self.wandb_settings is not None:
            mode = self.wandb_settings.get("mode")
            if mode is not None and mode not in WANDB_MODES:
                from detox_exp.errors import ConfigError

                raise ConfigError(
                    "logger.wandb.mode", f"unknown mode {mode!r}", f"use one of {WANDB_MODES}"
                )

    # ----------------------------------------------------------------- lifecycle
    def resume_from(self, step: int, wandb_id: str | None) -> None:
        """Continue a run: keep summary.json, drop metrics.jsonl lines after ``step`` (they
        are recomputed), and continue the W&B run ``wandb_id`` rewound to ``step`` (see
        start)."""
        if self.summary_path.is_file():
            self.summary = json.loads(self.summary_path.read_text())
        if self.enabled and self.metrics_path.is_file():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut off by the crash
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_path)
        self.resume_id, self.resume_step = wandb_id, step

    def start(self, config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
        """Create the run dir and start the W&B run with the full resolved config.

        ``defaults`` fill W&B settings that are null / empty in the config (group, job_type,
        tags, name: set per sweep job by :mod:`detox_exp.sweeps`).
        """
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.wandb_settings is None:
            return
        import wandb

        settings = dict(self.wandb_settings)
        for key, value in (defaults or {}).items():
            if not settings.get(key):
                settings[key] = value
        mode = settings.pop("mode", None) or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        wandb_dir = Path(settings.pop("dir", None) or self.run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        tags = [str(t) for t in settings.pop("tags", None) or []]
        init_timeout = float(settings.pop("init_timeout", None) or 90)
        kwargs = dict(
            config=dict(config),
            mode=mode,
            dir=str(wandb_dir),
            tags=tags,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True, init_timeout=init_timeout),
            **{k: v for k, v in settings.items() if v is not None},
        )
        attempts = [kwargs]
        if self.resume_id:
            # W&B ignores a step it has already seen, so the steps recomputed after the
            # checkpoint would keep their old values: rewind the run to the checkpoint's step
            # (wandb >= 0.17.1; the server must allow rewinding). Else continue the run as
            # is, and the recomputed steps are only right in metrics.jsonl.
            plain = kwargs | {"id": self.resume_id, "resume": "allow"}
            attempts = [plain]
            if "resume_from" in inspect.signature(wandb.init).parameters:
                rewind = kwargs | {"resume_from": f"{self.resume_id}?_step={self.resume_step}"}
                attempts = [rewind, plain]
        self.run = None
        for attempt in attempts:
            try:
                self.run = wandb.init(**attempt)
                break
            except Exception as err:  # no W&B (server down, bad key...): the run goes on
                if attempt is attempts[-1]:
                    self._warn_once(err)
                else:
                    log.warning(
                        "W&B could not rewind run %s to step %s (%s); continuing it without "
                        "rewinding: steps after %s keep their first values in W&B (metrics.jsonl "
                        "has the recomputed ones)",
                        self.resume_id,
                        self.resume_step,
                        err,
                        self.resume_step,
                    )

    def finish(self, exit_code: int = 0) -> None:
        """Write summary.json and close the W&B run (always called, also on failure)."""
        if not self.enabled:
            return
        write_json(self.summary_path, self.summary)
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as err:  # W&B must never lose the run's files
                self._warn_once(err)
            self.run = None

    # ------------------------------------------------------------------ logging
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one step's scalar metrics."""
        if not self.enabled:
            return
        record = {"step": int(step)} | {k: _to_float(v) for k, v in metrics.items()}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._wandb_call(lambda run: run.log(dict(record), step=int(step)))

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Record final metrics in summary.json and the W&B run summary."""
        clean = {k: _to_float(v) for k, v in metrics.items()}
        self.summary.update(clean)
        if not self.enabled:
            return
        write_json(self.summary_path, self.summary)
        self._wandb_call(lambda run: run.summary.update(clean))

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None
    ) -> None:
        """Log a W&B table (no-op without W&B; the same data is in the run dir's files)."""

        def _log(run: Any) -> None:
            import wandb

            run.log(
                {key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step
            )

        self._wandb_call(_log)

    def log_histograms(self, values: Mapping[str, Sequence[float]], step: int | None) -> None:
        def _log(run: Any) -> None:
            import wandb

            run.log({k: wandb.Histogram(list(v)) for k, v in values.items()}, step=step)

        self._wandb_call(_log)

    @property
    def location(self) -> str:
        """Where the W&B run is: its URL online, its folder offline, or 'W&B off'."""
        if self.run is None:
            return "W&B off" if self.wandb_settings is None else "W&B not started"
        if getattr(self.run, "disabled", False):  # mode=disabled: a no-op run, no files
            return "W&B disabled (mode=disabled)"
        url = getattr(self.run, "url", None)
        return url or str(Path(self.run.dir).parent)

    def _wandb_call(self, fn: Any) -> None:
        if self.run is None or self._wandb_failed:
            return
        try:
            fn(self.run)
        except Exception as err:  # keep training; the run dir files stay complete
            self._warn_once(err)

    def _warn_once(self, err: Exception) -> None:
        if not self._wandb_failed:
            log.warning("W&B failed (%s); continuing with metrics.jsonl and summary.json", err)
        self._wandb_failed = True
