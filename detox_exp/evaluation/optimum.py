"""The objective's optimum on the HELD-OUT prompts (``eval/optimum/*``), and how far a run
got toward it (``eval/vs_optimum/*``).

For the objective ``E_pi[r] - beta * KL(pi || ref)`` the optimum is
``pi*(y) = ref(y) * exp(r(y) / beta) / Z`` (Korbak et al. 2022). The before-evaluation's
K >= 2 reference samples per prompt give it by self-normalised weights
(:mod:`detox_exp.frontier_math`, the one estimator of the optimum in this project: the
frontier stage reads the train prompts with it), on the same prompts and by the same
metrics as the runs. The pipeline logs it at the run's beta; the command reads a saved run at
any beta, for any ``reward.reward_type``:

    detox-exp experiment=demo seed=1 stages.ppo=false stages.evaluate_after=false \\
      eval.samples_per_prompt=16 hydra.run.dir=outputs/optimum_s1
    python -m detox_exp.evaluation.optimum outputs/optimum_s1 [--beta B]

It prints the reference (all K samples of each prompt) beside the optimum. With an entropy
bonus (``ppo.ent_coef > 0``) a run aims at a flatter distribution than ``pi*``; the report
says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from detox_exp import frontier_math
from detox_exp import metric_names as M
from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.kl_control import configured_beta

# the command's table (the first is the toxicity its json line compares)
ROWS = (
    "toxicity_mean",
    "toxic_fraction",
    "distinct_1",
    "distinct_2",
    "unique_fraction",
    "top_response_fraction",
    "rouge_l",
    "kl_to_reference",
)


def optimum_values(
    before: EvalResult,
    beta: float,
    threshold: float,
    seed: int = 0,
    repeats: int = frontier_math.RESAMPLINGS,
) -> dict[str, float]:
    """The optimum ``pi* ~ ref * exp(r / beta)`` on the before-evaluation's K >= 2 samples per
    prompt (:func:`detox_exp.frontier_math.optimum_metrics`); ``beta = inf`` gives the
    reference itself (uniform weights)."""
    texts = before.responses()
    per_sample = {
        "rouge_l": before.rouge_l,
        "response_len_mean": before.lengths,
        "empty_fraction": np.array([[float(not t) for t in group] for group in texts]),
    }
    uniforms = frontier_math.resampling_uniforms(seed, repeats, len(texts))
    corpus = frontier_math.ReferenceCorpus.of(texts, uniforms)
    return frontier_math.optimum_metrics(
        beta, before.rewards(), before.toxicity, texts, per_sample, corpus, threshold, uniforms
    )


def heldout_optimum(
    before: EvalResult, beta: float, threshold: float, seed: int = 0
) -> dict[str, float]:
    """``eval/optimum/*``: :func:`optimum_values` at the run's beta; {} with one sample per
    prompt."""
    p, k = before.toxicity.shape
    if k < 2:
        return {}
    values = optimum_values(before, beta, threshold, seed)
    values |= {"beta": float(beta), "num_prompts": p, "samples_per_prompt": k}
    return {M.eval_key(M.OPTIMUM_PHASE, name): v for name, v in values.items()}


def against_optimum(summary: Mapping[str, Any], phase: str = "after") -> dict[str, float]:
    """The share of the optimum's toxicity drop that ``phase`` (``after``: the trained
    policy; ``teacher``: the guided teacher) achieved, and its KL as a multiple of the
    optimum's (where before, the phase and optimum are all in ``summary``)."""
    key = M.eval_key
    before, after, best = (
        summary.get(key(p, "toxicity_mean")) for p in ("before", phase, M.OPTIMUM_PHASE)
    )
    if before is None or after is None or best is None:
        return {}
    drop_key, kl_key = (
        (M.OPTIMUM_DROP_ACHIEVED, M.OPTIMUM_KL_RATIO)
        if phase == "after"
        else (M.TEACHER_DROP_ACHIEVED, M.TEACHER_KL_RATIO)
    )
    out = {}
    if before - best > 0:
        out[drop_key] = (before - after) / (before - best)
    kl_after, kl_best = (
        summary.get(key(phase, "kl_to_reference")),
        summary.get(key(M.OPTIMUM_PHASE, "kl_to_reference")),
    )
    if kl_after is not None and kl_best:
        out[kl_key] = kl_after / kl_best
    return out


def _run_beta(run_dir: Path, cfg: Any) -> float | None:
    """The run's beta: the frontier stage's choice where it made one, else the one
    ``ppo.kl_controller`` starts from."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        chosen = json.loads(summary.read_text()).get(M.FRONTIER_BETA)
        if chosen is not None:
            return float(chosen)
    return configured_beta(OmegaConf.to_container(cfg.ppo.kl_controller))


def _print_report(rows: dict[str, dict[str, float]]) -> None:
    print("| policy | " + " | ".join(ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in ROWS) + " |")
    base, opt = rows.values()
    change = {
        "toxicity_change": opt["toxicity_mean"] / base["toxicity_mean"] - 1,
        "distinct_2_ratio": opt["distinct_2"] / base["distinct_2"],
        "rouge_l_ratio": opt["rouge_l"] / base["rouge_l"],
    }
    print(json.dumps(change))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detox_exp.evaluation.optimum", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run whose eval/<phase> has K >= 2 samples")
    parser.add_argument("--phase", default="before", help="the evaluation of the reference")
    parser.add_argument("--beta", type=float, help="default: the run's (frontier/beta, kl_coef)")
    parser.add_argument(
        "--seed", type=int, help="seed of the corpus resamplings (default: the run's, as logged)"
    )
    args = parser.parse_args(argv)
    evaluation = args.run_dir / "eval" / args.phase
    config = args.run_dir / ".hydra" / "config.yaml"
    needed = (evaluation / "generations.jsonl", evaluation / "metrics.json", config)
    if not all(path.is_file() for path in needed):
        print(f"run_dir: no {evaluation} or {config}; pass a detox-exp run dir", file=sys.stderr)
        return 2
    cfg = OmegaConf.load(config)
    beta = args.beta if args.beta is not None else _run_beta(args.run_dir, cfg)
    if beta is None or not beta > 0:
        print(f"--beta: {beta!r}; pass a KL coefficient > 0", file=sys.stderr)
        return 2
    result = EvalResult.load(args.run_dir, args.phase)
    p, k = result.toxicity.shape
    if k < 2:
        print(
            f"eval.samples_per_prompt: {k} samples per prompt; rerun with e.g. 16", file=sys.stderr
        )
        return 2
    threshold = float(cfg.eval.get("toxic_threshold", 0.5))
    seed = args.seed if args.seed is not None else int(cfg.get("seed", 0))
    rows = {
        f"reference ({k} samples)": optimum_values(result, np.inf, threshold, seed),
        f"optimum (beta {beta:g})": optimum_values(result, beta, threshold, seed),
    }
    weights = frontier_math.optimum_weights(result.rewards(), beta)
    effective = float((1.0 / (weights**2).sum(axis=1)).mean())
    print(
        f"{p} prompts x {k} reference samples; the optimum's weights rest on {effective:.1f} "
        f"of the {k} per prompt (effective sample size)"
    )
    ent_coef = float(cfg.ppo.get("ent_coef", 0.0))
    if ent_coef:  # the bonus moves a run's optimum to a flatter distribution than pi*
        print(
            f"ppo.ent_coef={ent_coef:g}: runs of this config also reward entropy; this is the "
            "optimum of E[r] - beta * KL without that bonus"
        )
    _print_report(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
