"""One logging API for every stage: W&B (optional) + metrics.jsonl + summary.json.

Files in the run dir make a run readable without W&B:
- ``metrics.jsonl``: one JSON object per logged step, always with the global ``step``.
- ``summary.json``: the final value of every summary metric (eval/before/*, eval/after/*, ...).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from detox_exp import metric_names as M
from detox_exp.utils import write_json
from detox_exp.wandb_run import (
    WANDB_MODES,
    choose_wandb_mode,
    hydra_run_name,
    model_metadata,
)

log = logging.getLogger(__name__)

# the per-step metric every metrics.jsonl line and W&B history row carries
STEP_METRIC = "step"
# namespaces of the metrics the PPO loop logs every step: plotted against STEP_METRIC
PPO_NAMESPACES = tuple(
    sorted(
        {m.split("/")[0] for m in M.PPO_STEP_METRICS + M.CRITIC_STEP_METRICS + M.GROUP_STEP_METRICS}
    )
)


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
            mode, dir) or None for no W&B. ``mode`` null: see
            :func:`~detox_exp.wandb_run.choose_wandb_mode` (online when logged in to W&B).
            ``name`` null: see :func:`~detox_exp.wandb_run.run_name`.
        log_model: log the merged policy as a W&B ``model`` artifact (:meth:`log_model`).
    """

    def __init__(
        self, run_dir: str | Path, wandb: Mapping[str, Any] | None = None, log_model: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.wandb_settings = dict(wandb) if wandb is not None else None
        self.log_model_enabled = bool(log_model)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.summary: dict[str, Any] = {}
        self.run: Any = None
        self._wandb_lost: set[str] = set()  # what W&B failed to log (warned once each)
        # False on the non-main processes of a multi-process run: they log nothing
        self.enabled = True
        self.resume_id: str | None = None
        self.resume_step: int | None = None
        # the last step logged: W&B rows without a step of their own (tables, plots) go there,
        # so that W&B's row counter stays the PPO step (a row W&B numbered itself would push
        # its counter past the next PPO step, and W&B drops a step below its counter)
        self.last_step = 0
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
        self.last_step = int(step)

    def start(self, config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
        """Create the run dir and start the W&B run with the full resolved config.

        A null name becomes :func:`~detox_exp.wandb_run.run_name` of the Hydra job (task and
        overrides); ``defaults`` fill the W&B settings still null / empty (group, job_type,
        tags, name: set per sweep job by :mod:`detox_exp.sweeps`).
        """
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.wandb_settings is None:
            return
        import wandb

        settings = dict(self.wandb_settings)
        if not settings.get("name"):  # before the defaults: readable, not <sweep>-<job num>
            settings["name"] = hydra_run_name(str(config.get("task_name") or ""))
        for key, value in (defaults or {}).items():
            if not settings.get(key):
                settings[key] = value
        mode = choose_wandb_mode(settings.pop("mode", None), os.environ)
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
            # (the server must allow rewinding). Else continue the run as is, and the
            # recomputed steps are only right in metrics.jsonl.
            plain = kwargs | {"id": self.resume_id, "resume": "allow"}
            rewind = kwargs | {"resume_from": f"{self.resume_id}?_step={self.resume_step}"}
            attempts = [rewind, plain]
        self.run = self._init(wandb, attempts)
        self._wandb_call(self._define_metrics, "the metric definitions")

    def _init(self, wandb: Any, attempts: list[dict[str, Any]]) -> Any:
        """The W&B run of the first of ``attempts`` (``wandb.init`` keyword sets) that
        starts, or None: a failure is a warning and the run goes on without W&B."""
        for attempt in attempts:
            try:
                return wandb.init(**attempt)
            except Exception as err:  # no W&B (server down, bad key...): the run goes on
                if attempt is attempts[-1]:
                    log.warning(
                        "W&B failed to start (%s); continuing with metrics.jsonl and summary.json",
                        err,
                    )
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
        return None

    @staticmethod
    def _define_metrics(run: Any) -> None:
        """PPO metrics plot against the PPO step (not W&B's own row counter) and their
        summary is the last value logged."""
        run.define_metric(STEP_METRIC, hidden=True, summary="last")
        for namespace in PPO_NAMESPACES:
            run.define_metric(f"{namespace}/*", step_metric=STEP_METRIC, summary="last")

    def finish(self, exit_code: int = 0) -> None:
        """Write summary.json and close the W&B run (always called, also on failure)."""
        if not self.enabled:
            return
        write_json(self.summary_path, self.summary)
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:  # W&B must never lose the run's files
                log.warning("W&B failed to finish the run (%s); the run dir has it all", err)

    def mark_stopped(self, signal_name: str, preempted: bool = False) -> None:
        """Tag the W&B run ``interrupted`` (or ``preempted``, which also tells W&B the run is
        being preempted) before it finishes with the signal's exit code."""

        def _mark(run: Any) -> None:
            if preempted:
                run.mark_preempting()
            run.tags = (*run.tags, "preempted" if preempted else "interrupted")

        self._wandb_call(_mark, f"the {signal_name} stop", "the console line says it")

    # ------------------------------------------------------------------ logging
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one step's scalar metrics."""
        if not self.enabled:
            return
        self.last_step = int(step)
        record = {"step": int(step)} | {k: _to_float(v) for k, v in metrics.items()}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._wandb_call(
            lambda run: run.log(dict(record), step=int(step)),
            "step metrics",
            "metrics.jsonl has them",
        )

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Record final metrics in summary.json and the W&B run summary."""
        clean = {k: _to_float(v) for k, v in metrics.items()}
        self.summary.update(clean)
        if not self.enabled:
            return
        write_json(self.summary_path, self.summary)
        self._wandb_call(
            lambda run: run.summary.update(clean), "the summary", "summary.json has it"
        )

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None
    ) -> None:
        """Log a W&B table at ``step`` (None: the last step logged; no-op without W&B, the
        same data is in the run dir's files)."""

        def _log(run: Any) -> None:
            import wandb

            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            run.log({key: table}, step=self.last_step if step is None else step)

        self._wandb_call(_log, f"the table {key}")

    def log_histograms(self, values: Mapping[str, Sequence[float]], step: int | None) -> None:
        """Log W&B histograms at ``step`` (None: the last step logged)."""

        def _log(run: Any) -> None:
            import wandb

            histograms = {k: wandb.Histogram(list(v)) for k, v in values.items()}
            run.log(histograms, step=self.last_step if step is None else step)

        self._wandb_call(_log, f"histograms {sorted(values)}")

    def log_image(self, key: str, path: str | Path) -> None:
        """Log an image file (a plot also written to the run dir) to W&B, at the last step
        logged."""

        def _log(run: Any) -> None:
            import wandb

            run.log({key: wandb.Image(str(path))}, step=self.last_step)

        self._wandb_call(_log, f"the image {key}", f"{path} has it")

    def log_model(self, path: str | Path, identity: Mapping[str, Any] | None = None) -> None:
        """Log the folder ``path`` (the merged policy: weights, tokenizer, model card
        README.md) as the W&B artifact ``policy-<run id>`` of type ``model``, its card as the
        description. Its metadata is what identifies the model, within W&B's limit of
        ``WANDB_MAX_METADATA_KEYS`` keys whatever the summary's size: ``identity`` (the config
        keys that define it, e.g. base model, reward model, algorithm) and the headline
        metrics ``metric_names.MODEL_METADATA_METRICS`` found in the summary. The files are
        referenced in place (not copied to W&B's staging area); no-op without W&B or with
        log_model false."""
        path = Path(path)
        if not self.log_model_enabled or not self.enabled:
            return

        def _log(run: Any) -> None:
            import wandb

            card = path / "README.md"
            artifact = wandb.Artifact(
                f"policy-{run.id}",
                type="model",
                description=card.read_text(encoding="utf-8") if card.is_file() else None,
                metadata=model_metadata(self.summary, identity or {}),
            )
            artifact.add_dir(str(path), skip_cache=True, policy="immutable")
            run.log_artifact(artifact)

        self._wandb_call(_log, "the model artifact", f"the policy stays in {path}")

    @property
    def location(self) -> str:
        """Where the W&B run is: its URL online, its folder offline, or 'W&B off'."""
        if self.run is None:
            return "W&B off" if self.wandb_settings is None else "W&B not started"
        if getattr(self.run, "disabled", False):  # mode=disabled: a no-op run, no files
            return "W&B disabled (mode=disabled)"
        if getattr(self.run, "offline", False):  # (its url property warns offline)
            return str(Path(self.run.dir).parent)
        return getattr(self.run, "url", None) or str(Path(self.run.dir).parent)

    @property
    def sync_command(self) -> str | None:
        """``wandb sync <folder>`` for an offline run (what uploads it later), else None."""
        if self.run is None or not getattr(self.run, "offline", False):
            return None
        return f"wandb sync {Path(self.run.dir).parent}"

    def _wandb_call(self, fn: Callable[[Any], None], what: str, kept: str = "") -> None:
        """``fn(run)``; a failure costs only this call: one warning per ``what`` naming what
        W&B lost (``kept``: where the run dir still has it), and the next calls still go to
        W&B (a server that is down makes each call fail on its own timeout, not the run)."""
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as err:  # keep training; the run dir files stay complete
            if what not in self._wandb_lost:
                self._wandb_lost.add(what)
                log.warning(
                    "W&B failed to log %s (%s); %s", what, err, kept or "the run dir keeps it"
                )
