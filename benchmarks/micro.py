"""Micro-benchmarks behind the README's per-change numbers for T5 attention and row chunks.

    .venv/bin/python benchmarks/micro.py [--threads 2]

Shapes are those of the small benchmark DIR (16 prompts of ~192 tokens, 4 heads of 64, 32
response tokens, vocabulary 8192; minibatches of 4). Prints the best of 3 timings of 20 calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from detox_exp.models import t5_attention
from detox_exp.ppo import core


class _Attention(torch.nn.Module):
    is_causal = False  # cross / encoder self-attention


def best_ms(fn: Callable[[], object], calls: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


def attention(batch: int, q_len: int, k_len: int, grad: bool) -> dict[str, float]:
    module = _Attention().train(False)
    shape = (batch, 4, q_len, 64)
    query = torch.randn(shape, dtype=torch.bfloat16, requires_grad=grad)
    key = torch.randn((batch, 4, k_len, 64), dtype=torch.bfloat16, requires_grad=grad)
    value = torch.randn((batch, 4, k_len, 64), dtype=torch.bfloat16, requires_grad=grad)
    bias = torch.randn((1, 4, q_len, k_len), dtype=torch.bfloat16)
    mask = torch.ones((batch, 1, 1, k_len), dtype=torch.bool)
    mask[0, ..., k_len // 2 :] = False  # some padding

    def run(fn: Callable) -> Callable[[], object]:
        def call() -> None:
            out, _ = fn(module, query, key, value, mask, scaling=1.0, position_bias=bias)
            if grad:
                out.float().sum().backward()

        return call

    return {"sdpa": best_ms(run(sdpa_attention_forward)), "ours": best_ms(run(t5_attention))}


def row_chunks() -> dict[str, float]:
    logits = torch.randn(16, 32, 8192, dtype=torch.bfloat16)
    labels = torch.randint(0, 8192, (16, 32))

    def whole() -> None:
        full = logits.float()
        core.logprobs_from_logits(full, labels)
        core.entropy_from_logits(full)

    def chunked() -> None:
        core.in_row_chunks(core.logprobs_from_logits, logits, labels)
        core.in_row_chunks(core.entropy_from_logits, logits)

    return {"whole batch": best_ms(whole, 10), "two rows at a time": best_ms(chunked, 10)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(parser.parse_args().threads)
    cases = {
        "bf16 cross-attention, one decoding step (16 x 1 x 192)": (16, 1, 192, False),
        "bf16 encoder self-attention fwd+bwd (4 x 192 x 192)": (4, 192, 192, True),
    }
    for name, args in cases.items():
        times = attention(*args)
        print(f"{name}: sdpa {times['sdpa']:.3f} ms, detox_t5 {times['ours']:.3f} ms")
    times = row_chunks()
    print(
        "log-probs + entropy of 16 x 32 x 8192 bf16 logits: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
    )


if __name__ == "__main__":
    main()
