"""The plots of ``detox-exp-compare``: toxicity against a quality metric after training, each
run's reference, optimum and (guided) teacher beside it, the Pareto front marked
(:func:`plot_pareto`), and the per-step reward and KL curves (:func:`plot_curves`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detox_exp import metric_names as M
from detox_exp.compare_runs import (
    CURVES,
    RunRecord,
    baselines_differ,
    number,
    pareto_front,
    relative_change,
)

OPT = M.OPTIMUM_PHASE
TOXICITY, ROUGE = M.eval_key("after", "toxicity_mean"), M.eval_key("after", "rouge_l")
DISTINCT2, KL_AFTER = M.eval_key("after", "distinct_2"), M.eval_key("after", "kl_to_reference")


def _figure(**kwargs: Any) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    return Figure(**kwargs)


def _save(fig: Any, path: str | Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_pareto(
    runs: Sequence[RunRecord],
    path: str | Path,
    y_metric: str = ROUGE,
    max_kl: float | None = None,
) -> Path:
    """Toxicity (x, lower is better) vs ``y_metric`` (higher is better) after PPO; Pareto
    runs marked. Each run's reference (before PPO), with ``eval/optimum/*`` the objective's
    optimum and, for ``algorithm=guided``, its teacher (``eval/teacher/*``) are small markers
    joined to its point. Where the runs' baselines
    differ, both axes are the change from each run's own baseline (after / before - 1).
    With ``max_kl``, runs whose eval/after/kl_to_reference exceeds it are drawn as crosses and
    kept out of the front."""
    fig = _figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    names = (TOXICITY.split("/")[-1], y_metric.split("/")[-1])
    relative = any(baselines_differ(runs, name) for name in names)

    def point(run: RunRecord, phase: str) -> tuple[float, float] | None:
        if relative:
            xy = [relative_change(run.summary, phase, name) for name in names]
            xy = [None if v is None else 100 * v for v in xy]
        else:
            xy = [number(run.summary.get(M.eval_key(phase, name))) for name in names]
        return None if None in xy else (xy[0], xy[1])

    shown = [r for r in runs if point(r, "after") is not None]
    points = [point(r, "after") for r in shown]
    kl = [number(r.summary.get(KL_AFTER)) for r in shown]
    over = {i for i, v in enumerate(kl) if max_kl is not None and v is not None and v > max_kl}
    allowed = [i for i in range(len(points)) if i not in over]
    front = {allowed[j] for j in pareto_front([points[i] for i in allowed])}
    _plot_reference_and_optimum(
        ax, [(point(r, "before"), p, point(r, OPT)) for r, p in zip(shown, points)]
    )
    _plot_teachers(ax, [(point(r, M.TEACHER_PHASE), p) for r, p in zip(shown, points)])
    for on, label, colour in ((True, "Pareto-optimal", "tab:red"), (False, "dominated", "gray")):
        xy = [p for i, p in enumerate(points) if (i in front) == on and i not in over]
        if xy:
            ax.scatter(*zip(*xy), s=70 if on else 35, c=colour, zorder=3, label=label)
    if over:
        xy = [points[i] for i in sorted(over)]
        ax.scatter(*zip(*xy), s=35, c="tab:blue", marker="x", zorder=3, label=f"KL > {max_kl}")
    for (x, y), run in zip(points, shown):
        ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        ax.step(*zip(*sorted(points[i] for i in front)), where="post", ls="--", c="tab:red", lw=1)
    if points:
        ax.legend(loc="best", fontsize=8)
        ax.margins(0.12)
    else:
        ax.text(0.5, 0.5, "no run has both metrics", ha="center", transform=ax.transAxes)
    _label_axes(ax, names, y_metric, relative)
    return _save(fig, path)


def _plot_teachers(ax: Any, teachers: Sequence[tuple[Any, tuple[float, float]]]) -> None:
    """Each guided run's teacher (point or None) as a purple diamond joined to its policy."""
    for teacher, after in teachers:
        if teacher is not None:
            ax.plot(*zip(teacher, after), ls="--", c="tab:purple", lw=0.8, alpha=0.6, zorder=1)
    if any(t is not None for t, _ in teachers):
        xy = [t for t, _ in teachers if t is not None]
        ax.scatter(*zip(*xy), s=40, marker="D", c="tab:purple", zorder=2, label="guided teacher")


def _label_axes(ax: Any, names: tuple[str, str], y_metric: str, relative: bool) -> None:
    if relative:
        ax.set(xlabel=f"{names[0]} change from the run's own baseline, % (lower is better)")
        ax.set(ylabel=f"{names[1]} change from the run's own baseline, % (higher is better)")
        ax.set(title=f"toxicity vs {names[1]} after PPO, relative to each run's baseline")
    else:
        ax.set(xlabel=f"{TOXICITY} (lower is better)", ylabel=f"{y_metric} (higher is better)")
        ax.set(title=f"toxicity vs {names[1]} after PPO")
    ax.grid(alpha=0.3)


def _plot_reference_and_optimum(ax: Any, triples: Sequence[tuple[Any, Any, Any]]) -> None:
    """Per run (reference, after, optimum) points, each None if unknown: the reference and
    the optimum as small markers, joined to the run's point by thin lines."""
    for reference, after, optimum in triples:
        for other, style in ((reference, "-"), (optimum, ":")):
            if other is not None:
                ax.plot(*zip(other, after), ls=style, c="gray", lw=0.8, alpha=0.6, zorder=1)
    references = sorted({reference for reference, _, _ in triples} - {None})
    optima = sorted({optimum for _, _, optimum in triples} - {None})
    if references:
        ax.scatter(
            *zip(*references),
            s=24,
            facecolors="none",
            edgecolors="black",
            zorder=2,
            label="reference (before PPO)",
        )
    if optima:
        ax.scatter(
            *zip(*optima),
            s=60,
            marker="*",
            c="tab:green",
            zorder=2,
            label="optimum at the run's beta",
        )


def plot_curves(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """Two panels: env/reward_mean and objective/kl vs step, one line per run."""
    fig = _figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, CURVES):
        for i, run in enumerate(runs):
            xy = [(r.get("step"), number(r.get(metric))) for r in run.history]
            xy = sorted((s, v) for s, v in xy if s is not None and v is not None)
            if xy:  # 10 colours per line style, then the next style
                marker = "." if len(xy) < 30 else None
                ax.plot(*zip(*xy), ls="-:-"[i // 10 % 2], marker=marker, label=run.name)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        ax.set(xlabel="PPO step", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
    legend = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if legend:  # one entry per run, from whichever panel has it
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    return _save(fig, path)
