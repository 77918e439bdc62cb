"""The frontier stage as the pipeline runs it: sample (or, continued, reread) the reference's
draws, write the frontier, log it, and agree on the run's beta across processes; and the
draws handed to the value-guided method's prefix scorer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from detox_exp import metric_names as M
from detox_exp.distributed import Dist
from detox_exp.errors import ConfigError
from detox_exp.frontier.result import ROW_KEYS, FrontierResult, ReferenceDraws, write_frontier
from detox_exp.frontier.stage import Frontier, choose_beta
from detox_exp.tracking import Tracker

log = logging.getLogger(__name__)


def frontier_stage(
    runner: Frontier,
    controller: Mapping[str, Any],
    generation: Mapping[str, Any],
    tracker: Tracker,
    out: Path,
    dist: Dist,
    model: torch.nn.Module,
    tokenizer: Any,
    scorer: Any,
    prompts: Dataset,
    reuse: bool = False,
) -> float:
    """Sample the reference on train ``prompts``, write the frontier in ``out`` and choose the
    run's beta (main process; the others wait and receive the beta, or the same one-line
    error). ``reuse``: a continued run reads the draws it saved (``draws.jsonl``) instead of
    sampling again, and logs nothing W&B already has."""
    decision: dict[str, Any] = {}
    saved = out / "draws.jsonl"
    if dist.is_main:
        reused = reuse and saved.is_file()
        if reused:
            draws = ReferenceDraws.load(saved)
            log.info("frontier: reusing %s", saved)
        else:
            draws = runner.sample(model, tokenizer, scorer, prompts, generation)
        result = runner.read(draws)
        beta = None
        try:
            beta = choose_beta(result, controller, runner.min_drop)
            decision = {"beta": beta}
        except ConfigError as err:
            decision = {"error": [err.field, err.problem, err.fix]}
        if not reused:
            _log_frontier(result, beta, out, tracker)
    dist.wait()
    decision = dist.broadcast(decision)
    if "error" in decision:
        raise ConfigError(*decision["error"])
    return float(decision["beta"])


def _log_frontier(result: FrontierResult, beta: float | None, out: Path, tracker: Tracker) -> None:
    """Write the frontier's files in ``out``, print its table and log it (its table, plot
    and, with a beta, the run's point on it)."""
    print(f"\n{write_frontier(result, out, beta)}", flush=True)
    tracker.log_table(
        M.FRONTIER_TABLE,
        ROW_KEYS,
        [[row[key] for key in ROW_KEYS] for row in result.rows],
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


def frontier_draws(out: Path) -> dict[str, Any]:
    """The frontier stage's scored reference draws of train prompts 0 .. P - 1 (in ``out``),
    for the prefix scorer of ``algorithm=guided`` (``reference_draws``; none when the stage
    did not run)."""
    saved = out / "draws.jsonl"
    if not saved.is_file():
        return {}
    draws = ReferenceDraws.load(saved)
    return {"reference_draws": (draws.texts, torch.from_numpy(draws.rewards).float())}
