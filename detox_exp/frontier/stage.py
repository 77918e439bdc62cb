"""The frontier stage: what each KL coefficient's optimum would do on the user's own policy,
classifier and prompts, measured before any PPO step.

It samples K responses per prompt from the reference (the policy with its adapter disabled)
on TRAIN prompts (never the held-out ones), scores them, and reads off, for each beta of a
grid, the optimum ``pi*_beta ~ ref * exp(r / beta)`` (:mod:`.result`). It
writes ``<run dir>/frontier/frontier.jsonl`` (one row per beta), ``frontier.md`` and
``frontier.png``; the pipeline then takes beta from a target (``ppo/kl_controller=frontier``)
or refuses a beta whose optimum changes nothing (``frontier.min_drop``).

    python -m detox_exp.frontier.stage RUN_DIR     # the same for an existing run dir
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from detox_exp import frontier_math
from detox_exp.data.dialogues import references_of
from detox_exp.errors import ConfigError
from detox_exp.frontier.result import (
    FrontierResult,
    ReferenceDraws,
    read_frontier,
    write_frontier,
)
from detox_exp.generation import decode, generation_kwargs, pad_queries, sample_responses
from detox_exp.kl_control import configured_beta
from detox_exp.metrics import rouge_l_per_example
from detox_exp.seq2seq import reference as seq2seq_reference
from detox_exp.utils import progress, resolve_device

log = logging.getLogger(__name__)

# the default beta grid (conf/frontier/default.yaml writes the same; tests/test_frontier.py
# pins that they agree)
BETAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


class Frontier:
    """Samples the reference on train prompts and reads the frontier (see conf/frontier)."""

    def __init__(
        self,
        num_prompts: int = 64,
        samples_per_prompt: int = 16,
        betas: Sequence[float] = BETAS,
        min_drop: float = 0.1,
        batch_size: int = 256,
        repeats: int = frontier_math.RESAMPLINGS,
        toxic_threshold: float = 0.5,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        checks = [
            (num_prompts >= 1, "num_prompts", f"must be >= 1, got {num_prompts}", "raise it"),
            (
                samples_per_prompt >= 2,
                "samples_per_prompt",
                f"must be >= 2 (one draw has no alternative to weigh), got {samples_per_prompt}",
                "use e.g. 16",
            ),
            (
                len(betas) >= 1 and all(b > 0 for b in betas),
                "betas",
                f"must be a non-empty list of positive numbers, got {list(betas)}",
                "use e.g. [0.01, 0.1, 1, 10]",
            ),
            (0 <= min_drop < 1, "min_drop", f"must be in [0, 1), got {min_drop}", "use 0.1"),
            (batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}", "raise it"),
            (repeats >= 1, "repeats", f"must be >= 1, got {repeats}", "use e.g. 32"),
        ]
        for ok, key, problem, fix in checks:
            if not ok:
                raise ConfigError(f"frontier.{key}", problem, fix)
        self.num_prompts, self.k = num_prompts, samples_per_prompt
        self.betas = [float(b) for b in betas]
        self.min_drop, self.batch_size, self.repeats = min_drop, batch_size, repeats
        self.threshold, self.seed, self.device = toxic_threshold, seed, device

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        scorer: Any,
        prompts: Dataset,
        generation: Mapping[str, Any],
    ) -> ReferenceDraws:
        """K draws from the reference on the first ``num_prompts`` of ``prompts``, scored."""
        device = resolve_device(self.device)
        gen = generation_kwargs(generation)
        rows = prompts.select(range(min(self.num_prompts, len(prompts))))
        stream = torch.Generator(device).manual_seed(self.seed)  # not the global stream
        per_batch = max(1, self.batch_size // self.k)
        texts: list[str] = []
        was_training = model.training
        model.eval()
        # the reference: the same network with its adapter disabled
        reference = seq2seq_reference(model)
        bar = progress(total=len(rows) * self.k, desc="frontier", unit="sample")
        try:
            with reference:
                for start in range(0, len(rows), per_batch):
                    chunk = rows.select(range(start, min(start + per_batch, len(rows))))
                    ids, mask = pad_queries(chunk["input_ids"], tokenizer.pad_token_id, device)
                    response, _ = sample_responses(
                        model,
                        tokenizer,
                        ids,
                        mask,
                        gen,
                        samples_per_prompt=self.k,
                        generator=stream,
                    )
                    texts += decode(tokenizer, response)
                    bar.update(len(chunk) * self.k)
        finally:
            bar.close()
            model.train(was_training)
        scores = scorer.score(texts)
        p = len(rows)
        refs = [references_of(rows[i]) for i in range(p) for _ in range(self.k)]
        return ReferenceDraws(
            rewards=scores.reward.double().numpy().reshape(p, self.k),
            toxicity=scores.toxicity.double().numpy().reshape(p, self.k),
            rouge_l=rouge_l_per_example(texts, refs).reshape(p, self.k),
            texts=[texts[i * self.k : (i + 1) * self.k] for i in range(p)],
        )

    def read(self, draws: ReferenceDraws) -> FrontierResult:
        return read_frontier(draws, self.betas, self.threshold, self.seed, self.repeats)


def choose_beta(result: FrontierResult, controller: Mapping[str, Any], min_drop: float) -> float:
    """The run's beta: from ``target_drop`` with ``ppo/kl_controller=frontier``, else the
    configured one; a :class:`ConfigError` (one line, exit 2) when the target is out of
    reach or the beta's optimum cuts the mean toxicity by less than ``min_drop``."""
    p, k = result.draws.rewards.shape
    low, high = min(r["beta"] for r in result.rows), max(r["beta"] for r in result.rows)
    where = f"on {p} train prompts x {k} reference samples"
    beta = configured_beta(controller)
    if beta is None:
        target = float(controller["target_drop"])
        beta = result.beta_for_drop(target)
        if beta is None:
            best = result.at(low)
            raise ConfigError(
                "ppo.kl_controller.target_drop",
                f"no beta in [{low:g}, {high:g}] cuts the mean toxicity by {target:.0%} {where}:"
                f" the best is {-best['toxicity_change']:.1%} at beta {low:g} "
                f"(KL {best['kl']:.3f} nats)",
                "lower the target, or add smaller betas to frontier.betas",
            )
    if min_drop > 0:
        drop = result.drop(beta)
        if drop < min_drop:
            row = result.at(beta)
            needed = result.beta_for_drop(min_drop)
            fix = (
                f"use ppo.kl_controller.kl_coef={needed:.3g} (reaches {min_drop:.0%})"
                if needed is not None
                else f"no beta down to {low:g} reaches {min_drop:.0%}: check the classifier "
                "(README, 'When the reference is already non-toxic')"
            )
            raise ConfigError(
                "frontier.min_drop",
                f"at beta {beta:g} the optimum cuts the mean toxicity by only {drop:.1%} "
                f"(KL {row['kl']:.3f} nats) {where}: PPO would aim at no visible change",
                f"{fix}; or ppo/kl_controller=frontier; or frontier.min_drop=0 to train anyway",
            )
    return beta


def main(argv: Sequence[str] | None = None) -> int:
    """The frontier of an existing run dir, from its saved draws (``frontier/draws.jsonl``)
    or, failing that, from its before-evaluation with K >= 2 samples per prompt."""
    parser = argparse.ArgumentParser(
        prog="python -m detox_exp.frontier.stage", description=main.__doc__
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--betas", type=float, nargs="+", help="default: the run's")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/frontier")
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    from detox_exp.evaluation.evaluator import EvalResult

    config = args.run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        print(f"run_dir: no {config}; pass a detox-exp run dir", file=sys.stderr)
        return 2
    cfg = OmegaConf.load(config)
    node = cfg.get("frontier") or {}
    betas = args.betas or list(node.get("betas", BETAS))
    threshold = float(cfg.eval.get("toxic_threshold", 0.5))
    saved = args.run_dir / "frontier" / "draws.jsonl"
    if saved.is_file():
        draws = ReferenceDraws.load(saved)
    elif (args.run_dir / "eval" / "before" / "metrics.json").is_file():
        before = EvalResult.load(args.run_dir, "before")
        if before.toxicity.shape[1] < 2:
            print("run_dir: eval/before has 1 sample per prompt; need K >= 2", file=sys.stderr)
            return 2
        draws = ReferenceDraws(
            rewards=before.rewards(),
            toxicity=before.toxicity,
            rouge_l=before.rouge_l,
            texts=before.responses(),
        )
    else:
        print(f"run_dir: no {saved} and no eval/before in {args.run_dir}", file=sys.stderr)
        return 2
    result = read_frontier(
        draws,
        betas,
        threshold,
        int(node.get("seed", 0)),
        int(node.get("repeats", frontier_math.RESAMPLINGS)),
    )
    out = args.out or args.run_dir / "frontier"
    print(write_frontier(result, out), end="")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
