"""The pipeline: prepare data -> train reward model -> evaluate -> frontier -> PPO -> evaluate.

Every component is built with ``hydra.utils.instantiate`` from its ``_target_`` node; this
module only orders the stages and hands results from one to the next.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from detox_exp import checkpoint, interrupt
from detox_exp import metric_names as M
from detox_exp.console import configure as configure_console
from detox_exp.data.dialogues import PromptSplits
from detox_exp.distributed import Dist
from detox_exp.errors import ConfigError, bad_input_message
from detox_exp.evaluation import report
from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.fast import configure as configure_fast
from detox_exp.fast.memory import keep_freed_memory
from detox_exp.frontier import heldout
from detox_exp.frontier.stage import configured_beta
from detox_exp.guided.settings import check_rollouts
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
            summary, objects = _run_stages(cfg, tracker, run_dir, dist, resume, current)
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


def _run_stages(
    cfg: DictConfig,
    tracker: Tracker,
    run_dir: Path,
    dist: Dist,
    resume: Path | None,
    current: dict[str, str],
):
    stages = cfg.stages
    timings: dict[str, float] = {}
    objects: dict[str, Any] = {}
    # continuing a run (from a checkpoint, or resume=auto after a stop before the first one):
    # what the run dir already holds is reused (classifier, evaluations, frontier)
    reuse = resume is not None or cfg.get("resume") == "auto"

    enabled = [name for name in STAGES if stages.get(name)]

    def begin(name: str) -> float:
        """Announce a stage on the console; its start time."""
        current["stage"] = name
        if dist.is_main:
            if name in enabled:
                log.info("stage %d/%d: %s", enabled.index(name) + 1, len(enabled), name)
            else:  # part of a stage (the guided teacher's evaluation, in the training stage)
                log.info("stage %s", name)
        return time.perf_counter()

    def timed(name: str, start: float) -> None:
        timings[f"time/stage/{name}_s"] = time.perf_counter() - start

    start = begin("prepare_data") if stages.prepare_data else time.perf_counter()
    if stages.prepare_data and cfg.get("assets") is not None:
        if dist.is_main:
            build(cfg.assets).build()
        dist.wait()
    tokenizer = build(cfg.model.tokenizer)
    if stages.prepare_data:
        splits = build(cfg.dataset).prepare(tokenizer)  # deterministic on every process
        if dist.is_main:
            splits.save(cfg.paths.data_dir)
        tracker.log_summary(
            {M.DATA_TRAIN_PROMPTS: len(splits.train), M.DATA_EVAL_PROMPTS: len(splits.eval)}
        )
        timed("prepare_data", start)
    else:
        splits = PromptSplits.load(cfg.paths.data_dir)

    reward_path = cfg.reward.name_or_path
    if stages.train_reward:
        start = begin("train_reward")
        trainer = build(cfg.reward.training)
        done = reuse and (trainer.output_dir / "metrics.json").is_file()
        if dist.is_main and not done:  # on resume the trained classifier is reused
            trainer.train(tracker)
        dist.wait()
        reward_path = str(trainer.output_dir)
        timed("train_reward", start)

    need_policy = stages.evaluate_before or stages.ppo or stages.evaluate_after
    if not need_policy:
        tracker.log_summary(timings)
        return dict(tracker.summary), objects
    device = resolve_device(cfg.device)
    scorer = build(cfg.reward.scorer, name_or_path=str(reward_path))
    seed_everything(cfg.seed)
    # bf16 with LoRA: the frozen base weights are stored in bf16 (half the memory and memory
    # traffic); the adapters and the value head stay fp32 and the passes run under autocast
    bf16_base = cfg.precision == "bf16" and not cfg.model.full_finetune
    model = build(cfg.model.policy, **({"torch_dtype": torch.bfloat16} if bf16_base else {}))
    model = model.to(device)
    evaluator = build(cfg.eval)
    generation = OmegaConf.to_container(cfg.model.generation, resolve=True)
    results = {}
    objects |= {"tokenizer": tokenizer, "scorer": scorer, "splits": splits}

    def evaluate(phase: str, policy: torch.nn.Module, guide: Any = None) -> None:
        if not dist.is_main:  # evaluation runs on the main process; the others wait
            dist.wait()
            return
        start = begin(f"evaluate_{phase}")
        if reuse and (run_dir / "eval" / phase / "metrics.json").is_file():
            results[phase] = EvalResult.load(run_dir, phase)  # done before the crash
        else:
            results[phase] = evaluator.evaluate(
                policy, tokenizer, scorer, splits.eval, phase, run_dir, generation, guide
            )
        tracker.log_summary(results[phase].metrics)
        timed(f"evaluate_{phase}", start)
        dist.wait()

    if stages.evaluate_before:
        evaluate("before", model)
    controller = OmegaConf.to_container(cfg.ppo.kl_controller, resolve=True)
    beta = configured_beta(controller)  # None: taken from the frontier
    if stages.get("frontier"):
        start = begin("frontier")
        beta = _frontier_stage(
            cfg, controller, tracker, run_dir, dist, model, tokenizer, scorer, splits, reuse
        )
        timed("frontier", start)
    if stages.ppo:
        start = begin("ppo")
        frontier_beta = {} if configured_beta(controller) is not None else {"kl_coef": beta}
        name, node = training_node(cfg)
        extra = {}
        if name == "guided":
            check_rollouts(node["prefix_scorer"], tracker.summary.get(M.FRONTIER_KL))
            extra = _frontier_draws(run_dir)
        trainer = build(node)(
            model=model,
            tokenizer=tokenizer,
            scorer=scorer,
            prompts=splits.train,
            tracker=tracker,
            generation=generation,
            checkpoints=build(cfg.checkpoint),
            wandb_id=tracker.run.id if tracker.run is not None else None,
            kl_controller=build(cfg.ppo.kl_controller, **frontier_beta),
            **extra,
        )
        if resume is not None:
            trainer.resume(resume)
        history = trainer.train()
        tracker.log_summary(perf_summary(history, trainer.batch_size, trainer.device))
        timed("ppo", start)
        objects["ppo"] = trainer
        guide = getattr(trainer, "guide", None)
        if guide is not None and stages.evaluate_after:  # the guided teacher, as a policy
            evaluate(M.TEACHER_PHASE, model, guide)
    if stages.evaluate_after:
        evaluate("after", model)
    if "before" in results and beta is not None:  # the held-out optimum at the run's beta
        tracker.log_summary(
            heldout.heldout_optimum(results["before"], beta, evaluator.threshold, cfg.seed)
        )
    if "before" in results and "after" in results:
        report.log_comparison(
            tracker, results["before"], results["after"], evaluator.bootstrap, evaluator.threshold
        )
        tracker.log_summary(heldout.against_optimum(tracker.summary))
        tracker.log_summary(heldout.against_optimum(tracker.summary, M.TEACHER_PHASE))
    tracker.log_summary(timings)
    if stages.ppo and dist.is_main and objects["ppo"].save_dir is not None:
        summary = dict(tracker.summary)
        table = report.card_table(summary)
        saved = objects["ppo"].save(summary, cfg, table, str(reward_path))
        config = OmegaConf.to_container(cfg, resolve=True)
        tracker.log_model(saved / "merged", model_identity(config, str(reward_path)))
    dist.wait()
    objects["model"] = model
    return dict(tracker.summary), objects


def _frontier_draws(run_dir: Path) -> dict[str, Any]:
    """The frontier stage's scored reference draws of train prompts 0 .. P - 1, for the prefix
    scorer of ``algorithm=guided`` (``reference_draws``; none when the stage did not run)."""
    from detox_exp.frontier.stage import ReferenceDraws

    saved = run_dir / "frontier" / "draws.jsonl"
    if not saved.is_file():
        return {}
    draws = ReferenceDraws.load(saved)
    return {"reference_draws": (draws.texts, torch.from_numpy(draws.rewards).float())}


def _frontier_stage(
    cfg: DictConfig,
    controller: dict[str, Any],
    tracker: Tracker,
    run_dir: Path,
    dist: Dist,
    model: torch.nn.Module,
    tokenizer: Any,
    scorer: Any,
    splits: PromptSplits,
    reuse: bool = False,
) -> float:
    """Sample the reference on train prompts, write the frontier and choose the run's beta
    (main process; the others wait and receive the beta, or the same one-line error).
    ``reuse``: a continued run reads the draws it saved (``frontier/draws.jsonl``) instead of
    sampling again, and logs nothing W&B already has."""
    from detox_exp.frontier import stage as frontier

    decision: dict[str, Any] = {}
    out = run_dir / "frontier"
    saved = out / "draws.jsonl"
    if dist.is_main and reuse and saved.is_file():
        runner = build(cfg.frontier)
        try:
            decision = {
                "beta": frontier.choose_beta(
                    runner.read(frontier.ReferenceDraws.load(saved)), controller, runner.min_drop
                )
            }
        except ConfigError as err:
            decision = {"error": [err.field, err.problem, err.fix]}
        log.info("frontier: reusing %s", saved)
    elif dist.is_main:
        runner = build(cfg.frontier)
        generation = OmegaConf.to_container(cfg.model.generation, resolve=True)
        draws = runner.sample(model, tokenizer, scorer, splits.train, generation)
        result = runner.read(draws)
        beta = None
        try:
            beta = frontier.choose_beta(result, controller, runner.min_drop)
            decision = {"beta": beta}
        except ConfigError as err:
            decision = {"error": [err.field, err.problem, err.fix]}
        print(f"\n{frontier.write_frontier(result, out, beta)}", flush=True)
        tracker.log_table(
            M.FRONTIER_TABLE,
            frontier.ROW_KEYS,
            [[row[key] for key in frontier.ROW_KEYS] for row in result.rows],
            step=None,
        )
        tracker.log_image(M.FRONTIER_PLOT, out / "frontier.png")
        if beta is not None:
            row = result.at(beta)
            tracker.log_summary(
                {
                    M.FRONTIER_BETA: beta,
                    M.FRONTIER_TOXICITY_CHANGE: row["toxicity_change"],
                    M.FRONTIER_KL: row["kl"],
                }
            )
    dist.wait()
    decision = dist.broadcast(decision)
    if "error" in decision:
        raise ConfigError(*decision["error"])
    return float(decision["beta"])


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
