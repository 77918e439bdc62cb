"""The guide's scale (``algorithm.guide_scale``): the exponent lambda of the teacher
``pi_g(a | s) ∝ ref(a | s) V(s, a)^lambda``.

With the true ``V`` (lambda = 1) the teacher is the objective's optimum token by token, and
its KL to the reference is the optimum's. A scorer fitted by cross-entropy that underfits
predicts values shrunk toward the constant predictor, so its guide is flatter than the
optimum's and spends less KL (on the demo, 0.48-0.62x the optimum's). ``kl_match`` undoes a
uniform shrinkage of ``log V``: it picks the lambda at which the teacher spends the KL that
the optimum spends at the run's beta, both measured on the same train prompts, the frontier
stage's (the optimum's by its weights over the stage's draws, the teacher's exactly, per
token, on its own samples). A calibration of one number against a quantity measured on the
user's own model, classifier and prompts at run time, as temperature scaling calibrates a
classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from detox_exp.guided.scorer import Guide
from detox_exp.kl import categorical_kl

# Sampler: (prompt indices, generator, samples per prompt, record) -> response mask [B, T],
# appending each decoding step's (reference logits, teacher logits) to ``record``
Sampler = Callable[[list[int], torch.Generator, int, list[tuple[Tensor, Tensor]]], Tensor]


def teacher_kl(
    sample: Sampler,
    batches: Sequence[list[int]],
    streams: Callable[[int], torch.Generator],
    samples_per_prompt: int,
) -> float:
    """The teacher's mean KL to the reference over ``samples_per_prompt`` samples of each
    prompt, sampled a batch of prompts at a time, batch b from its own stream ``streams(b)``
    (so that every scale tried draws from the same uniforms, whatever the lengths the other
    batches took): the exact per-token KL summed over each sample."""
    kls = []
    for b, indices in enumerate(batches):
        record: list[tuple[Tensor, Tensor]] = []
        mask = sample(indices, streams(b), samples_per_prompt, record)
        ref, teacher = (torch.stack(x, 1).log_softmax(-1) for x in zip(*record, strict=True))
        kls.append((categorical_kl(teacher, ref) * mask).sum(1))
    return torch.cat(kls).mean().item()


def match_scale(
    kl_of: Callable[[float], float],
    target: float,
    tolerance: float = 0.03,
    evaluations: int = 6,
    bounds: tuple[float, float] = (0.125, 16.0),
) -> tuple[float, float, int]:
    """The scale whose teacher KL ``kl_of(scale)`` is ``target`` (> 0) within ``tolerance``
    in log, by secant steps on ``(log scale, log KL)`` from scale 1 (a tilt's KL grows as
    scale^2 while small: the first step's slope), at most ``evaluations`` calls.

    Returns ``(scale, its KL, calls)``: the closest to the target of the scales tried; scale
    1 when the guide moves nothing (KL 0 at scale 1: an untrained scorer)."""
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target}")
    low, high = (math.log(b) for b in bounds)
    goal = math.log(target)
    tried: list[tuple[float, float]] = []  # (log scale, log KL)
    x, calls = 0.0, 0
    for _ in range(evaluations):
        kl = kl_of(math.exp(x))
        calls += 1
        if not kl > 0:
            if not tried:
                return 1.0, 0.0, calls
            break
        tried.append((x, math.log(kl)))
        if abs(tried[-1][1] - goal) <= tolerance:
            break
        slope = 2.0
        if len(tried) >= 2:
            (x0, y0), (x1, y1) = tried[-2], tried[-1]
            if x1 != x0 and (y1 - y0) / (x1 - x0) > 0.1:
                slope = (y1 - y0) / (x1 - x0)
        x_next = min(max(tried[-1][0] + (goal - tried[-1][1]) / slope, low), high)
        if x_next == tried[-1][0]:  # at a bound
            break
        x = x_next
    x, y = min(tried, key=lambda point: abs(point[1] - goal))
    return math.exp(x), math.exp(y), calls


def calibrate(
    guide: Guide,
    target: float,
    sample: Sampler,
    prompts: int,
    per_batch: int,
    streams: Callable[[int], torch.Generator],
    samples_per_prompt: int,
) -> tuple[float, float, int]:
    """Set ``guide.scale`` to :func:`match_scale`'s for the teacher's KL on prompts
    0 .. ``prompts`` - 1 (:func:`teacher_kl`, ``per_batch`` prompts at a time); returns
    ``(scale, its KL, calls)``. A target of 0 (every draw of a prompt scored alike: the
    optimum is the reference) gives scale 0, the reference itself, without sampling."""
    if not target > 0:
        guide.scale = 0.0
        return 0.0, 0.0, 0
    batches = [list(range(i, min(i + per_batch, prompts))) for i in range(0, prompts, per_batch)]

    def kl_of(scale: float) -> float:
        guide.scale = scale
        return teacher_kl(sample, batches, streams, samples_per_prompt)

    guide.scale, kl, calls = match_scale(kl_of, target)
    return guide.scale, kl, calls
