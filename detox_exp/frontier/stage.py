"""The frontier stage: what each KL coefficient's optimum would do on the user's own policy,
classifier and prompts, measured before any PPO step.

It samples K responses per prompt from the reference (the policy with its adapter disabled)
on TRAIN prompts (never the held-out ones), scores them, and reads off, for each beta of a
grid, the optimum ``pi*_beta ~ ref * exp(r / beta)`` (:mod:`detox_exp.frontier_math`). It
writes ``<run dir>/frontier/frontier.jsonl`` (one row per beta), ``frontier.md`` and
``frontier.png``; the pipeline then takes beta from a target (``ppo/kl_controller=frontier``)
or refuses a beta whose optimum changes nothing (``frontier.min_drop``).

    python -m detox_exp.frontier.stage RUN_DIR     # the same for an existing run dir
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from detox_exp import frontier_math
from detox_exp.data.dialogues import references_of
from detox_exp.errors import ConfigError
from detox_exp.generation import decode, generation_kwargs, pad_queries, sample_responses
from detox_exp.kl_control import FrontierKLController
from detox_exp.metrics import rouge_l_per_example
from detox_exp.seq2seq import reference as seq2seq_reference
from detox_exp.utils import progress, resolve_device, write_json, write_jsonl

log = logging.getLogger(__name__)

ROW_KEYS = (
    "beta",
    "toxicity_mean",
    "toxic_fraction",
    "toxicity_change",
    "kl",
    "distinct_2",
    "unique_fraction",
    "rouge_l",
)

# the default beta grid (conf/frontier/default.yaml writes the same; tests/test_frontier.py
# pins that they agree)
BETAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class ReferenceDraws:
    """K reference responses per prompt, scored: ``rewards``, ``toxicity``, ``rouge_l``
    ``[P, K]`` and ``texts`` ``[P][K]``."""

    rewards: np.ndarray
    toxicity: np.ndarray
    rouge_l: np.ndarray
    texts: list[list[str]]

    def save(self, path: Path) -> None:
        write_jsonl(
            path,
            [
                {"texts": t, "reward": r.tolist(), "toxicity": x.tolist(), "rouge_l": g.tolist()}
                for t, r, x, g in zip(self.texts, self.rewards, self.toxicity, self.rouge_l)
            ],
        )

    @classmethod
    def load(cls, path: Path) -> ReferenceDraws:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return cls(
            rewards=np.array([r["reward"] for r in rows]),
            toxicity=np.array([r["toxicity"] for r in rows]),
            rouge_l=np.array([r["rouge_l"] for r in rows]),
            texts=[r["texts"] for r in rows],
        )


@dataclass
class FrontierResult:
    """The frontier of one run: the reference's metrics, one row per beta (:data:`ROW_KEYS`
    and more), the draws it was read from and the resampling uniforms ``[R, P, K]`` that
    every beta's corpus metrics share."""

    reference: dict[str, float]
    rows: list[dict[str, float]]
    draws: ReferenceDraws
    threshold: float
    uniforms: np.ndarray
    corpus: frontier_math.ReferenceCorpus
    _off_grid: dict[float, dict[str, float]] = field(default_factory=dict, repr=False)

    def drop(self, beta: float) -> float:
        return frontier_math.toxicity_drop(self.draws.rewards, self.draws.toxicity, beta)

    def at(self, beta: float) -> dict[str, float]:
        """The row of any beta (the grid's, or computed once for another)."""
        for row in self.rows:
            if row["beta"] == beta:
                return row
        if beta not in self._off_grid:
            self._off_grid[beta] = self.row(beta)
        return self._off_grid[beta]

    def row(self, beta: float) -> dict[str, float]:
        """One beta's row: :data:`ROW_KEYS` plus the ratios to the reference."""
        draws, reference = self.draws, self.reference
        m = frontier_math.optimum_metrics(
            beta,
            draws.rewards,
            draws.toxicity,
            draws.texts,
            {"rouge_l": draws.rouge_l},
            self.corpus,
            self.threshold,
            self.uniforms,
        )
        ref_tox = reference["toxicity_mean"]
        return {
            "beta": float(beta),
            "toxicity_mean": m["toxicity_mean"],
            "toxic_fraction": m["toxic_fraction"],
            "toxicity_change": m["toxicity_mean"] / ref_tox - 1 if ref_tox > 0 else 0.0,
            "kl": m["kl_to_reference"],
            "distinct_2": m["distinct_2"],
            "unique_fraction": m["unique_fraction"],
            "rouge_l": m["rouge_l"],
            "reward_mean": m["reward_mean"],
            "distinct_2_ratio": m["distinct_2"] / reference["distinct_2"]
            if reference["distinct_2"]
            else 1.0,
            "rouge_l_ratio": m["rouge_l"] / reference["rouge_l"] if reference["rouge_l"] else 1.0,
        }

    def beta_for_drop(self, target: float) -> float | None:
        betas = [row["beta"] for row in self.rows]
        return frontier_math.beta_for_drop(
            self.draws.rewards, self.draws.toxicity, target, min(betas), max(betas)
        )


def read_frontier(
    draws: ReferenceDraws, betas: Sequence[float], threshold: float, seed: int, repeats: int
) -> FrontierResult:
    """The frontier over ``betas`` from scored reference draws (pure: no model)."""
    p, k = draws.rewards.shape
    uniforms = np.random.default_rng(seed).random((repeats, p, k))
    corpus = frontier_math.ReferenceCorpus.of(draws.texts, uniforms)
    reference = {
        "toxicity_mean": float(draws.toxicity.mean()),
        "toxic_fraction": float((draws.toxicity > threshold).mean()),
        "rouge_l": float(draws.rouge_l.mean()),
        "reward_mean": float(draws.rewards.mean()),
        **corpus.full,
    }
    result = FrontierResult(reference, [], draws, threshold, uniforms, corpus)
    result.rows = [result.row(b) for b in sorted(set(betas))]
    return result


class Frontier:
    """Samples the reference on train prompts and reads the frontier (see conf/frontier)."""

    def __init__(
        self,
        num_prompts: int = 64,
        samples_per_prompt: int = 16,
        betas: Sequence[float] = BETAS,
        min_drop: float = 0.1,
        batch_size: int = 256,
        repeats: int = 4,
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
            (repeats >= 1, "repeats", f"must be >= 1, got {repeats}", "use e.g. 4"),
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


def configured_beta(controller: Mapping[str, Any]) -> float | None:
    """The beta a ``ppo.kl_controller`` node starts from (None for the frontier's own)."""
    if FrontierKLController.configured_by(controller):
        return None
    value = controller.get("kl_coef", controller.get("init_kl_coef"))
    return None if value is None else float(value)


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


def write_frontier(result: FrontierResult, out: Path, beta: float | None = None) -> str:
    """``frontier.jsonl``, ``frontier.md``, ``frontier.png`` and ``draws.jsonl`` in ``out``;
    returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "frontier.jsonl", result.rows)
    write_json(out / "reference.json", result.reference)
    result.draws.save(out / "draws.jsonl")
    table = frontier_markdown(result, beta)
    (out / "frontier.md").write_text(table)
    plot_frontier(result, out / "frontier.png", beta)
    return table


def frontier_markdown(result: FrontierResult, beta: float | None = None) -> str:
    p, k = result.draws.rewards.shape
    ref = result.reference
    lines = [
        f"# The optimum pi*_beta ~ ref * exp(r / beta), from {p} train prompts x {k} "
        "reference samples",
        "",
        "| beta | toxicity_mean | toxicity_change | toxic_fraction | KL (nats) | distinct_2 "
        "| unique_fraction | rouge_l |",
        "|---|---|---|---|---|---|---|---|",
        f"| reference | {ref['toxicity_mean']:.4f} | - | {ref['toxic_fraction']:.3f} | 0 "
        f"| {ref['distinct_2']:.3f} | {ref['unique_fraction']:.3f} | {ref['rouge_l']:.3f} |",
    ]
    rows = list(result.rows)
    if beta is not None and all(abs(r["beta"] - beta) > 1e-12 for r in rows):
        rows = sorted([*rows, result.at(beta)], key=lambda r: r["beta"])
    for r in rows:
        mark = " (this run)" if beta is not None and abs(r["beta"] - beta) < 1e-12 else ""
        lines.append(
            f"| {r['beta']:.4g}{mark} | {r['toxicity_mean']:.4f} | {r['toxicity_change']:+.1%} "
            f"| {r['toxic_fraction']:.3f} | {r['kl']:.3f} | {r['distinct_2']:.3f} "
            f"| {r['unique_fraction']:.3f} | {r['rouge_l']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_frontier(result: FrontierResult, path: Path, beta: float | None = None) -> Path:
    """Toxicity change and KL against beta (log axis), the run's beta marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    betas = [r["beta"] for r in result.rows]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.plot(betas, [100 * r["toxicity_change"] for r in result.rows], "o-", color="C3")
    ax.set_xscale("log")
    ax.set_xlabel("beta (KL coefficient)")
    ax.set_ylabel("optimum's toxicity change (%)", color="C3")
    kl_ax = ax.twinx()
    kl_ax.plot(betas, [r["kl"] for r in result.rows], "s--", color="C0")
    kl_ax.set_ylabel("KL(pi* || ref) (nats)", color="C0")
    if beta is not None:
        ax.axvline(beta, color="grey", lw=1)
    ax.set_title("What each beta's optimum would do", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


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
        draws, betas, threshold, int(node.get("seed", 0)), int(node.get("repeats", 4))
    )
    out = args.out or args.run_dir / "frontier"
    print(write_frontier(result, out), end="")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
