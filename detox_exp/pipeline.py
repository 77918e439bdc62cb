"""The pipeline: prepare data -> train reward model -> evaluate -> frontier -> PPO -> evaluate.

Every component is built with ``hydra.utils.instantiate`` from its ``_target_`` node; this
module only orders the stages and hands results from one to the next.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from detox_exp import checkpoint, interrupt
from detox_exp import metric_names as M
from detox_exp.console import configure as configure_console
from detox_exp.data.dialogues import PromptSplits
from detox_exp.distributed import Dist
from detox_exp.errors import bad_input_message
from detox_exp.evaluation import optimum, report
from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.fast import configure as configure_fast
from detox_exp.fast.memory import keep_freed_memory
from detox_exp.frontier.runner import frontier_draws, frontier_stage
from detox_exp.guided.settings import check_rollouts
from detox_exp.kl_control import configured_beta
from detox_exp.perf import perf_summary
from detox_exp.run_config import (
    STAGES,
    build,
    check_data_files,
    check_run_config,
    check_writable,
    training_node,
)
from detox_exp.tracking import Tracker
from detox_exp.training.loop import TrainingLoop
from detox_exp.training.saving import model_identity
from detox_exp.utils import (
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig) -> float | None:
    """Hydra task: run the pipeline and return the optimised value (see sweeps.objective).

    In a multirun a failing job is logged and recorded, returns NaN (a failed trial for
    Optuna), and the sweep goes on; in a single run the error propagates to the CLI.
    """
    from detox_exp import sweeps

    info = sweeps.job_info()
    try:
        metrics, _ = run(cfg, wandb_defaults=sweeps.wandb_defaults(cfg, info))
    except Exception as err:
        if info is None or not info.multirun:
            raise
        message = bad_input_message(err) or f"{type(err).__name__}: {err}"
        log.error("job %d failed: %s", info.num, message, exc_info=bad_input_message(err) is None)
        sweeps.record_job(info, "failed", {}, Path(cfg.paths.output_dir), message)
        return float("nan")
    value = sweeps.objective(metrics, cfg)
    if info is not None and info.multirun:
        sweeps.record_job(info, "ok", metrics | {"objective": value}, Path(cfg.paths.output_dir))
    return value


def run(
    cfg: DictConfig, wandb_defaults: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the configured stages; returns (summary metrics, built objects)."""
    configure_console(verbose=bool(cfg.get("verbose", False)))
    check_run_config(cfg)
    check_data_files(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    configure_fast(**cfg.fast)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    seed_everything(cfg.seed)
    dist = Dist(resolve_device(cfg.device), **cfg.distributed)
    if dist.enabled:  # every process works in the main process's run dir
        with open_dict(cfg):
            cfg.paths.output_dir = dist.broadcast(str(cfg.paths.output_dir))
    resume = checkpoint.resolve_resume(cfg.get("resume"), Path(cfg.paths.output_dir))
    if resume is not None and cfg.resume != "auto":  # continue in the checkpoint's run dir
        with open_dict(cfg):
            cfg.paths.output_dir = str(resume.parent.parent)
    run_dir = Path(cfg.paths.output_dir)
    if dist.is_main:
        check_writable(run_dir)
    tracker: Tracker = build(cfg.logger)
    tracker.enabled = dist.is_main
    if resume is not None:
        meta = checkpoint.read_meta(resume)
        tracker.resume_from(int(meta["step"]), meta.get("wandb_id"))
    elif cfg.get("resume") == "auto":
        log.info("resume=auto: no checkpoint in %s, starting from scratch", run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker.start(config, defaults=wandb_defaults)
    location, sync = tracker.location, tracker.sync_command
    exit_code = 1
    current: dict[str, str] = {}  # the stage running (for the line of a stopped run)
    try:
        with interrupt.handling():
            summary, objects = _Stages(cfg, tracker, run_dir, dist, resume, current).run()
        exit_code = 0
    except interrupt.Interrupted as stop:  # SIGINT / SIGTERM: the line and the way back
        exit_code = stop.exit_code
        stop.stage = stop.stage or current.get("stage")
        stop.resume = resume_command(run_dir)
        tracker.mark_stopped(stop.name, preempted=stop.signum == signal.SIGTERM)
        raise
    finally:
        tracker.finish(exit_code)
    if dist.is_main:
        print_report(summary, run_dir, location, sync)
    return summary, objects | {"tracker": tracker}


def resume_command(run_dir: Path) -> str:
    """The command that continues this run (or this job of a sweep) in ``run_dir``: its
    command-line overrides, then ``hydra.run.dir`` and ``resume=auto``."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.lstrip("+~").startswith("resume=")]
    return shlex.join(["detox-exp", *kept, f"hydra.run.dir={run_dir}", "resume=auto"])


class _Stages:
    """The run's stages: one method per name of :data:`~detox_exp.run_config.STAGES`, run in
    that order when ``stages.<name>`` is true (adding a stage: a name there, a switch in
    conf/config.yaml, a method here). The data, classifier and policy are loaded on first
    use, so a stage that is off costs nothing. A continued run (from a checkpoint, or
    ``resume=auto`` after a stop before the first one) reuses what the run dir holds:
    classifier, evaluations, frontier."""

    def __init__(
        self,
        cfg: DictConfig,
        tracker: Tracker,
        run_dir: Path,
        dist: Dist,
        resume: Path | None,
        current: dict[str, str],
    ) -> None:
        self.cfg, self.tracker, self.run_dir, self.dist = cfg, tracker, run_dir, dist
        self.resume, self.current = resume, current
        self.reuse = resume is not None or cfg.get("resume") == "auto"
        self.enabled = [name for name in STAGES if cfg.stages.get(name)]
        self.timings: dict[str, float] = {}
        self.objects: dict[str, Any] = {}
        self.results: dict[str, EvalResult] = {}
        self.reward_path = str(cfg.reward.name_or_path)
        self.controller = OmegaConf.to_container(cfg.ppo.kl_controller, resolve=True)
        self.beta = configured_beta(self.controller)  # None: taken from the frontier
        # the training stage's: the pipeline uses what every method's loop has (train, resume,
        # save, save_dir, batch_size, device) and, if there is one, its ``guide``
        self.trainer: TrainingLoop | None = None
        self._data: tuple[Any, PromptSplits] | None = None
        self._policy: torch.nn.Module | None = None

    def run(self) -> tuple[dict[str, Any], dict[str, Any]]:
        for name in self.enabled:
            getattr(self, name)()
        return self.finish()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Announce a stage on the console (a part of one, e.g. the guided teacher's
        evaluation, without a number) and time it (``time/stage/<name>_s``)."""
        self.current["stage"] = name
        if self.dist.is_main:
            if name in self.enabled:
                log.info("stage %d/%d: %s", self.enabled.index(name) + 1, len(self.enabled), name)
            else:
                log.info("stage %s", name)
        start = time.perf_counter()
        yield
        self.timings[f"time/stage/{name}_s"] = time.perf_counter() - start

    # ------------------------------------------------------------ loaded on first use
    @property
    def data(self) -> tuple[Any, PromptSplits]:
        """(tokenizer, prompt splits): those prepare_data made, or the saved ones."""
        if self._data is None:
            tokenizer = build(self.cfg.model.tokenizer)
            self._data = (tokenizer, PromptSplits.load(self.cfg.paths.data_dir))
        return self._data

    @property
    def policy(self) -> torch.nn.Module:
        """The policy (the scorer, evaluator and generation settings with it), seeded."""
        if self._policy is None:
            cfg = self.cfg
            self.scorer = build(cfg.reward.scorer, name_or_path=self.reward_path)
            seed_everything(cfg.seed)
            # bf16 with LoRA: the frozen base weights are stored in bf16 (half the memory and
            # memory traffic); the adapters and the value head stay fp32 and the passes run
            # under autocast
            bf16 = cfg.precision == "bf16" and not cfg.model.full_finetune
            model = build(cfg.model.policy, **({"torch_dtype": torch.bfloat16} if bf16 else {}))
            self._policy = model.to(resolve_device(cfg.device))
            self.evaluator = build(cfg.eval)
            self.generation = OmegaConf.to_container(cfg.model.generation, resolve=True)
            tokenizer, splits = self.data
            self.objects |= {"tokenizer": tokenizer, "scorer": self.scorer, "splits": splits}
        return self._policy

    # ------------------------------------------------------------------- the stages
    def prepare_data(self) -> None:
        with self.stage("prepare_data"):
            if self.cfg.get("assets") is not None:
                if self.dist.is_main:
                    build(self.cfg.assets).build()
                self.dist.wait()
            tokenizer = build(self.cfg.model.tokenizer)
            splits = build(self.cfg.dataset).prepare(tokenizer)  # the same on every process
            if self.dist.is_main:
                splits.save(self.cfg.paths.data_dir)
            self._data = (tokenizer, splits)
            self.tracker.log_summary(
                {M.DATA_TRAIN_PROMPTS: len(splits.train), M.DATA_EVAL_PROMPTS: len(splits.eval)}
            )

    def train_reward(self) -> None:
        with self.stage("train_reward"):
            trainer = build(self.cfg.reward.training)
            done = self.reuse and (trainer.output_dir / "metrics.json").is_file()
            if self.dist.is_main and not done:  # on resume the trained classifier is reused
                trainer.train(self.tracker)
            self.dist.wait()
            self.reward_path = str(trainer.output_dir)

    def evaluate_before(self) -> None:
        self._evaluate("before")

    def frontier(self) -> None:
        policy = self.policy
        with self.stage("frontier"):
            tokenizer, splits = self.data
            self.beta = frontier_stage(
                build(self.cfg.frontier),
                self.controller,
                self.generation,
                self.tracker,
                self.run_dir / "frontier",
                self.dist,
                policy,
                tokenizer,
                self.scorer,
                splits.train,
                self.reuse,
            )

    def ppo(self) -> None:
        """The training stage, by the configured method (``algorithm``)."""
        policy = self.policy
        with self.stage("ppo"):
            tokenizer, splits = self.data
            frontier = (
                {} if configured_beta(self.controller) is not None else {"kl_coef": self.beta}
            )
            name, node = training_node(self.cfg)
            extra = {}
            if name == "guided":
                check_rollouts(node["prefix_scorer"], self.tracker.summary.get(M.FRONTIER_KL))
                extra = frontier_draws(self.run_dir / "frontier")
            self.trainer = build(node)(
                model=policy,
                tokenizer=tokenizer,
                scorer=self.scorer,
                prompts=splits.train,
                tracker=self.tracker,
                generation=self.generation,
                checkpoints=build(self.cfg.checkpoint),
                wandb_id=self.tracker.run.id if self.tracker.run is not None else None,
                kl_controller=build(self.cfg.ppo.kl_controller, **frontier),
                **extra,
            )
            if self.resume is not None:
                self.trainer.resume(self.resume)
            history = self.trainer.train()
            self.tracker.log_summary(
                perf_summary(history, self.trainer.batch_size, self.trainer.device)
            )
            self.objects["ppo"] = self.trainer

    def evaluate_after(self) -> None:
        guide = getattr(self.trainer, "guide", None)
        if guide is not None:  # the guided teacher, evaluated as a policy
            self._evaluate(M.TEACHER_PHASE, guide)
        self._evaluate("after")

    def _evaluate(self, phase: str, guide: Any = None) -> None:
        policy = self.policy
        if not self.dist.is_main:  # evaluation runs on the main process; the others wait
            self.dist.wait()
            return
        with self.stage(f"evaluate_{phase}"):
            tokenizer, splits = self.data
            if self.reuse and (self.run_dir / "eval" / phase / "metrics.json").is_file():
                self.results[phase] = EvalResult.load(self.run_dir, phase)  # done before a stop
            else:
                self.results[phase] = self.evaluator.evaluate(
                    policy,
                    tokenizer,
                    self.scorer,
                    splits.eval,
                    phase,
                    self.run_dir,
                    self.generation,
                    guide,
                )
            self.tracker.log_summary(self.results[phase].metrics)
        self.dist.wait()

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The comparisons of the evaluations (before/after, against the held-out optimum),
        the stages' times, and the trained policy saved and logged."""
        tracker, results = self.tracker, self.results
        if "before" in results and self.beta is not None:  # the held-out optimum at beta
            threshold = self.evaluator.threshold
            tracker.log_summary(
                optimum.heldout_optimum(results["before"], self.beta, threshold, self.cfg.seed)
            )
        if "before" in results and "after" in results:
            report.log_comparison(
                tracker,
                results["before"],
                results["after"],
                self.evaluator.bootstrap,
                self.evaluator.threshold,
            )
            tracker.log_summary(optimum.against_optimum(tracker.summary))
            tracker.log_summary(optimum.against_optimum(tracker.summary, M.TEACHER_PHASE))
        tracker.log_summary(self.timings)
        if self.trainer is not None and self.dist.is_main and self.trainer.save_dir is not None:
            summary = dict(tracker.summary)
            saved = self.trainer.save(
                summary, self.cfg, report.card_table(summary), self.reward_path
            )
            config = OmegaConf.to_container(self.cfg, resolve=True)
            tracker.log_model(saved / "merged", model_identity(config, self.reward_path))
        self.dist.wait()
        if self._policy is not None:
            self.objects["model"] = self._policy
        return dict(tracker.summary), self.objects


def print_report(
    summary: dict[str, Any], run_dir: Path, wandb_location: str, sync: str | None = None
) -> None:
    """The evaluation's before / after / optimum table (evaluation.report), then where the
    run's files and its W&B run are (``sync``: the command that uploads an offline run)."""
    table = report.report_table(summary)
    if table:
        print(table)
    print(f"run dir: {run_dir}")
    print(f"W&B run: {wandb_location}")
    if sync:
        print(f"upload it with: {sync}")
