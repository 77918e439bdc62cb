"""Micro-benchmarks behind the README's per-change numbers.

    .venv/bin/python benchmarks/micro.py [--threads 2] [--dir outputs/bench/small]

Shapes are those of the small benchmark DIR (16 prompts of ~192 tokens, 4 heads of 64, 32
response tokens, vocabulary 8192; minibatches of 4). Prints the best of 3 timings of 20
calls for T5 attention and row chunks, and medians of the prefix scorer's atom logits over
the vocabulary (value guidance) and of the guide over every token vs the reference's 200 most
likely (algorithm.guide_candidates) at the demo's and FLAN-T5-base's shapes. With ``--dir`` (a
benchmark DIR from ``scripts/make_bench_dir.py``) it also times, on that policy with LoRA
r=32 on q, v and its first 16 prompts, 32 sampled tokens with the flat T5 step decoder vs
the model's forward, and a forward (16 prompts) and forward + backward (4 prompts) with
peft's LoRA input cast on vs off under bf16 autocast, and the rollout's and update's passes
with the position bias + mask built once per pass or in every layer, and fp32 forward /
forward + backward passes of 4 prompts x 4 samples with the cross-attention keys / values
projected per prompt or per sample; versions alternate, medians of 8 after 2 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from detox_exp.fast.attention import t5_attention
from detox_exp.ppo import core

CONF = Path(__file__).resolve().parent.parent / "conf"  # the real prompt template


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


def _scorer(rows: int, vocab: int, d: int, atoms: int) -> tuple:
    """A prefix scorer with random weights, ``rows`` decoder states and a generator."""
    from detox_exp.guided.scorer import PrefixScorer

    g = torch.Generator().manual_seed(0)
    uniform = torch.full((atoms,), 1 / atoms)
    scorer = PrefixScorer(torch.randn(vocab, d, generator=g), torch.linspace(-3, 0, atoms), uniform)
    with torch.no_grad():
        for p in scorer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return scorer.eval(), torch.randn(rows, d, generator=g), g


def prefix_scorer(rows: int, vocab: int, d: int, atoms: int = 16) -> dict[str, float]:
    """The guide's atom logits of every token for ``rows`` decoder states: the free
    direction term as its own [rows, V] product (PrefixScorer.all_atom_logits) vs folded into
    the per-atom product as K more columns of width d (its peer: the same numbers)."""
    scorer, hidden, _ = _scorer(rows, vocab, d, atoms)

    @torch.no_grad()
    def folded() -> torch.Tensor:
        h, q = scorer._features(hidden)
        left = torch.cat([q, scorer.atom_gain[:, None] * h[:, None, :]], dim=-1)
        right = torch.cat([scorer.embedding, scorer.token_dir], dim=-1)
        out = torch.matmul(left.reshape(rows * atoms, -1), right.T).view(rows, atoms, -1)
        return out.add_((scorer.token_bias + scorer.prior).T)

    split = torch.no_grad()(scorer.all_atom_logits)
    torch.testing.assert_close(split(hidden), folded(), rtol=1e-4, atol=1e-4)
    return alternating_ms({"folded": folded, "split": lambda: split(hidden)})


def guide_candidates(rows: int, vocab: int, d: int, atoms: int = 16) -> dict[str, float]:
    """The guide's log V for one decoding step of ``rows`` samples: every token scored vs
    the reference's 200 most likely (algorithm.guide_candidates' default; the same values
    where every token is a candidate, tests/test_guided.py)."""
    from detox_exp.guided.scorer import Guide

    scorer, hidden, g = _scorer(rows, vocab, d, atoms)
    logits = torch.randn(rows, vocab, generator=g) * 3
    every, top = Guide(scorer, 1.0), Guide(scorer, 1.0, candidates=200)
    with torch.no_grad():
        return alternating_ms(
            {
                "every token": lambda: every(hidden, logits),
                "200 candidates": lambda: top(hidden, logits),
            }
        )


def alternating_ms(versions: dict[str, Callable[[], object]], rounds: int = 10) -> dict:
    """Median ms per version, the versions called in turn (drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(rounds):
        for name, fn in versions.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def _policy(bench_dir: Path, bf16: bool):
    """The benchmark policy with LoRA r=32 on q, v, its first 16 prompts and a context
    manager for its precision."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from detox_exp.generation import pad_queries
    from detox_exp.models import load_policy

    tokenizer = AutoTokenizer.from_pretrained(bench_dir / "policy")
    rows = [json.loads(line) for line in (bench_dir / "prompts.jsonl").open()][:16]
    template = OmegaConf.load(CONF / "dataset" / "dialogsum.yaml").prompt_template
    texts = [template.format(dialogue=r["dialogue"]) for r in rows]
    ids, mask = pad_queries(tokenizer(texts)["input_ids"], tokenizer.pad_token_id, "cpu", 16)
    lora = LoraConfig(r=32, lora_alpha=32, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    dtype = torch.bfloat16 if bf16 else None
    model = load_policy(str(bench_dir / "policy"), lora=lora, torch_dtype=dtype).eval()

    def precision() -> AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    return model, tokenizer, ids, mask, precision


def sampling(bench_dir: Path, bf16: bool) -> dict[str, float]:
    from detox_exp.generation import sample_responses
    from detox_exp.seq2seq import encode

    model, tokenizer, ids, mask, precision = _policy(bench_dir, bf16)
    gen = {"max_new_tokens": 32, "min_new_tokens": 32, "top_k": 0, "top_p": 1.0}
    with torch.no_grad(), precision():
        hidden = encode(model, ids, mask)

    def sample(step: bool) -> Callable[[], object]:
        def call() -> None:
            with torch.no_grad(), precision():
                sample_responses(model, tokenizer, ids, mask, gen, hidden, step_decoder=step)

        return call

    return alternating_ms({"model forward": sample(False), "step decoder": sample(True)})


def lora_cast(bench_dir: Path) -> dict[str, float]:
    from peft.helpers import disable_input_dtype_casting

    model, tokenizer, ids, mask, precision = _policy(bench_dir, bf16=True)
    dec = torch.randint(2, len(tokenizer), (16, 32))

    def forward(cast: bool) -> Callable[[], object]:
        def call() -> None:
            with torch.no_grad(), precision(), disable_input_dtype_casting(model, not cast):
                model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)

        return call

    def train(cast: bool) -> Callable[[], object]:
        def call() -> None:
            with precision(), disable_input_dtype_casting(model, not cast):
                out = model(input_ids=ids[:4], attention_mask=mask[:4], decoder_input_ids=dec[:4])
            out.logits.float().logsumexp(-1).sum().backward()

        return call

    times = alternating_ms({"forward, cast on": forward(True), "forward, cast off": forward(False)})
    return times | alternating_ms(
        {"forward + backward, cast on": train(True), "forward + backward, cast off": train(False)}
    )


def cross_attention_sharing(bench_dir: Path) -> dict[str, float]:
    """fp32 teacher-forced passes of 4 prompts x 4 samples with the cross-attention keys /
    values projected once per prompt (``seq2seq.shared_cross_attention``) or per sample."""
    from detox_exp import seq2seq
    from detox_exp.training.policy import ActorCritic

    model, tokenizer, ids, mask, _ = _policy(bench_dir, bf16=False)
    actor = ActorCritic(model, value_head=False).eval()
    dec = torch.randint(2, len(tokenizer), (16, 32))
    found = seq2seq.cross_attention_projections

    def run(shared: bool, grad: bool) -> Callable[[], object]:
        def call() -> None:
            seq2seq.cross_attention_projections = found if shared else lambda m: []
            try:
                with nullcontext() if grad else torch.no_grad():
                    out = actor(ids[:4], mask[:4], dec, samples_per_prompt=4)
                    if grad:
                        out.logits.logsumexp(-1).sum().backward()
            finally:
                seq2seq.cross_attention_projections = found

        return call

    times = alternating_ms(
        {"forward, per sample": run(False, False), "forward, per prompt": run(True, False)}
    )
    return times | alternating_ms(
        {
            "forward + backward, per sample": run(False, True),
            "forward + backward, per prompt": run(True, True),
        }
    )


def bias_per_pass(bench_dir: Path) -> dict[str, float]:
    """Policy + reference forward of 16 prompts and 4 minibatch forward + backward passes
    (the rollout's and the update's passes), bf16, with the position bias + mask built once
    per pass (fast.attention.layer_bias) or in every layer."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    from detox_exp.fast import attention as models

    model, tokenizer, ids, mask, precision = _policy(bench_dir, bf16=True)
    dec = torch.randint(2, len(tokenizer), (16, 32))
    once = models.layer_bias

    def every_layer(position_bias, attention_mask, causal, query, key) -> torch.Tensor:
        bias = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        return bias.to(query.dtype)

    def passes(layer_bias: Callable) -> Callable[[], object]:
        def call() -> None:
            models.layer_bias = layer_bias
            with precision():
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
                    with model.disable_adapter():
                        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
                for rows in torch.arange(16).split(4):
                    out = model(
                        input_ids=ids[rows], attention_mask=mask[rows], decoder_input_ids=dec[rows]
                    )
                    out.logits.float().logsumexp(-1).sum().backward()

        return call

    try:
        return alternating_ms({"every layer": passes(every_layer), "once per pass": passes(once)})
    finally:
        models.layer_bias = once


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="a benchmark DIR: also time policy passes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {
        "bf16 cross-attention, one decoding step (16 x 1 x 192)": (16, 1, 192, False),
        "bf16 encoder self-attention fwd+bwd (4 x 192 x 192)": (4, 192, 192, True),
    }
    for name, shape in cases.items():
        times = attention(*shape)
        print(f"{name}: sdpa {times['sdpa']:.3f} ms, detox_t5 {times['ours']:.3f} ms")
    times = row_chunks()
    print(
        "log-probs + entropy of 16 x 32 x 8192 bf16 logits: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
    )
    for rows, vocab, d, what in (
        (32, 2000, 128, "demo, one decoding step of 32 samples"),
        (640, 2000, 128, "demo, a pass over 32 responses of 20 tokens"),
        (64, 32128, 768, "FLAN-T5-base, one decoding step of 64 samples"),
    ):
        times = prefix_scorer(rows, vocab, d)
        print(
            f"prefix scorer atom logits, {what}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
            + f" ({times['folded'] / times['split']:.2f}x)"
        )
    for rows, vocab, d, what in (
        (32, 2000, 128, "demo, 32 samples"),
        (64, 32128, 768, "FLAN-T5-base, 64 samples"),
    ):
        times = guide_candidates(rows, vocab, d)
        print(
            f"guide log V, one decoding step, {what}: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
            + f" ({times['every token'] / times['200 candidates']:.1f}x)"
        )
    if args.dir is None:
        return
    for bf16 in (False, True):
        times = sampling(args.dir, bf16)
        print(
            f"{'bf16' if bf16 else 'fp32'} sampling 32 tokens for 16 prompts: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in times.items())
        )
    times = lora_cast(args.dir)
    print(
        "bf16 LoRA input cast, forward of 16 prompts / forward + backward of 4: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
    )
    times = cross_attention_sharing(args.dir)
    print(
        "fp32 cross-attention keys / values, 4 prompts x 4 samples: "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in times.items())
    )
    times = bias_per_pass(args.dir)
    print(
        "bf16 position bias + mask, rollout forward passes + 4 minibatch updates: "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in times.items())
    )


if __name__ == "__main__":
    main()
