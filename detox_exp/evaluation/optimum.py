"""The optimum of the KL-regularised objective, sampled from the reference by rejection.

With a reward ``r(y) <= 0`` (``reward.reward_type=log_prob``: ``r = log p(non-toxic | y)``)
and a KL coefficient ``beta``, the policy that maximises ``E_pi[r] - beta * KL(pi || ref)`` is

    pi*(y) = ref(y) * exp(r(y) / beta) / Z,      Z = E_ref[exp(r / beta)]

(Korbak et al. 2022, "RL with KL penalties is better viewed as Bayesian inference"). Since
``exp(r / beta) <= 1``, it is sampled exactly by rejection: draw ``y ~ ref``, accept it with
probability ``exp(r(y) / beta)``. An evaluation of the reference with ``eval.samples_per_prompt=K``
holds K such draws per prompt, so the optimum's responses, and what any RL run aims at, can
be measured on the same prompts and by the same metrics as the runs themselves:

    detox-exp experiment=demo seed=1 stages.ppo=false stages.evaluate_after=false \\
      eval.samples_per_prompt=16 hydra.run.dir=outputs/optimum_s1
    python -m detox_exp.evaluation.optimum outputs/optimum_s1

The report sets the optimum (one accepted response per prompt) beside the reference's first
sample of each prompt (what a 1-sample evaluation of the reference sees). With an entropy
bonus (``ppo.ent_coef > 0``) a run aims at a flatter distribution than ``pi*``; the report
says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from detox_exp.evaluation.evaluator import EvalResult
from detox_exp.metrics import distinct_n, response_collapse, toxicity_stats


def rejection_optimum(
    rewards: np.ndarray, beta: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rejection sampling of ``pi* ~ ref * exp(r / beta)`` from K reference draws per prompt.

    Args:
        rewards: ``[P, K]`` rewards (``<= 0``) of K independent draws from the reference.
        beta: the KL coefficient (``> 0``).
        rng: the acceptance coin flips.

    Returns:
        ``(picked, kl, fallbacks)``: the index of each prompt's first accepted draw ``[P]``
        (where none of the K is accepted, the draw with the highest reward); an estimate of
        ``KL(pi* || ref)`` per prompt ``[P]``, ``E_pi*[r / beta] - log Z`` with ``Z`` the mean
        acceptance probability and the expectation weighted by it (consistent in K); and
        how many prompts needed the fallback.
    """
    rewards = np.asarray(rewards, dtype=float)
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [P, K], got shape {rewards.shape}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if (rewards > 0).any():
        raise ValueError("rejection sampling needs rewards <= 0 (reward.reward_type=log_prob)")
    accept = np.exp(rewards / beta)
    accepted = rng.random(rewards.shape) < accept
    none = ~accepted.any(axis=1)
    picked = np.where(none, rewards.argmax(axis=1), accepted.argmax(axis=1))
    z = accept.mean(axis=1)
    kl = (accept * rewards / beta).sum(axis=1) / accept.sum(axis=1) - np.log(z)
    return picked, kl, int(none.sum())


def corpus_row(records: Sequence[dict], kl: float, threshold: float) -> dict[str, float]:
    """The evaluation's corpus metrics of one response per prompt."""
    texts = [r["response"] for r in records]
    tox = toxicity_stats([r["toxicity"]["reward"] for r in records], threshold)
    return {
        "toxicity_mean": tox["toxicity_mean"],
        "toxic_fraction": tox["toxic_fraction"],
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        **response_collapse(texts),
        "rouge_l": float(np.mean([r["rouge_l"] for r in records])),
        "kl_to_reference": kl,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detox_exp.evaluation.optimum", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run whose eval/<phase> has K >= 2 samples")
    parser.add_argument("--phase", default="before", help="the evaluation of the reference")
    parser.add_argument("--beta", type=float, help="default: the run's ppo.kl_controller")
    parser.add_argument("--seed", type=int, default=0, help="seed of the acceptance draws")
    args = parser.parse_args(argv)
    evaluation = args.run_dir / "eval" / args.phase
    config = args.run_dir / ".hydra" / "config.yaml"
    needed = (evaluation / "generations.jsonl", evaluation / "metrics.json", config)
    if not all(path.is_file() for path in needed):
        print(f"run_dir: no {evaluation} or {config}; pass a detox-exp run dir", file=sys.stderr)
        return 2
    cfg = OmegaConf.load(config)
    if cfg.reward.get("reward_type") != "log_prob":
        print(
            f"reward.reward_type: {cfg.reward.get('reward_type')!r} can be > 0; the optimum is "
            "sampled by rejection for reward.reward_type=log_prob only",
            file=sys.stderr,
        )
        return 2
    ctl = cfg.ppo.kl_controller
    beta = (
        args.beta if args.beta is not None else float(ctl.get("kl_coef", ctl.get("init_kl_coef")))
    )
    result = EvalResult.load(args.run_dir, args.phase)
    k = result.toxicity.shape[1]
    if k < 2:
        print(
            f"eval.samples_per_prompt: {k} samples per prompt; rerun with e.g. 16", file=sys.stderr
        )
        return 2
    groups = result.groups()
    rewards = result.rewards()
    picked, kl, fallbacks = rejection_optimum(rewards, beta, np.random.default_rng(args.seed))
    threshold = float(cfg.eval.get("toxic_threshold", 0.5))
    rows = {
        "reference (sample 0)": corpus_row([g[0] for g in groups], 0.0, threshold),
        f"optimum (beta {beta:g})": corpus_row(
            [g[i] for g, i in zip(groups, picked)], float(kl.mean()), threshold
        ),
    }
    names = list(next(iter(rows.values())))
    print(f"{len(groups)} prompts x {k} reference samples; {fallbacks} prompts without an accept")
    ent_coef = float(cfg.ppo.get("ent_coef", 0.0))
    if ent_coef:  # the bonus moves a run's optimum to a flatter distribution than pi*
        print(
            f"ppo.ent_coef={ent_coef:g}: runs of this config also reward entropy; this is the "
            "optimum of E[r] - beta * KL without that bonus"
        )
    print("| policy | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    base, opt = rows.values()
    print(
        json.dumps(
            {
                "toxicity_change": opt["toxicity_mean"] / base["toxicity_mean"] - 1,
                "distinct_2_ratio": opt["distinct_2"] / base["distinct_2"],
                "rouge_l_ratio": opt["rouge_l"] / base["rouge_l"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
