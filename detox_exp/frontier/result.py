"""What a frontier is and how it is written: the reference's scored draws, the optimum's
row for each beta of a grid (:mod:`detox_exp.frontier_math`), and the files of
``<run dir>/frontier/`` (``frontier.jsonl``, ``frontier.md``, ``frontier.png``,
``draws.jsonl``). Sampling the draws and choosing the run's beta: :mod:`.stage`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detox_exp import frontier_math
from detox_exp.utils import write_json, write_jsonl

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
    and more), the draws it was read from and the resampling uniforms ``[R, P, 1]`` that
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
    uniforms = frontier_math.resampling_uniforms(seed, repeats, p)
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
