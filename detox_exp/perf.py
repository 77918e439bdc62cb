"""Throughput and memory numbers for a training run (the bench experiment's summary)."""

from __future__ import annotations

import torch

from detox_exp import metric_names as M


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KB


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory, and on CUDA the peak GPU memory held by tensors, in MB."""
    out = {M.PEAK_RSS_MB: peak_rss_mb()}
    if device.type == "cuda":
        out[M.PEAK_CUDA_MB] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def perf_summary(
    history: list[dict[str, float]], batch_size: int, device: torch.device
) -> dict[str, float]:
    """Median step time over the steps after the first (warm-up), throughput, peak memory,
    and the median time of each phase."""
    import statistics

    timed = [h for h in history if M.REWARD_MEAN in h]  # skipped batches do not count
    steady = timed[1:] or timed
    if not steady:
        return peak_memory(device)
    median = statistics.median(h[M.STEP_TIME] for h in steady)
    out = {M.MEDIAN_STEP_S: median, M.SAMPLES_PER_S: batch_size / median, **peak_memory(device)}
    for key in (M.TIME_GENERATE, M.TIME_SCORE, M.TIME_FORWARD, M.TIME_OPTIMIZE):
        if all(key in h for h in steady):  # the phases a method times
            out[f"perf/median_{key}"] = statistics.median(h[key] for h in steady)
    return out
