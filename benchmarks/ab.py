"""Compare two versions of one piece of the PPO step inside ONE run, switching every step.

Separate runs on a shared VM drift by ~10%, more than the differences being measured; here
each version gets every other step of the same process, so drift hits both alike:

    .venv/bin/python benchmarks/ab.py --knob attention --values sdpa,detox_t5 -- \\
        experiment=bench model.name_or_path=DIR/policy reward.name_or_path=DIR/reward \\
        dataset=jsonl dataset.path=DIR/prompts.jsonl ppo.steps=16 precision=bf16

Knobs: ``attention`` (the policy's ``attn_implementation``: sdpa, detox_t5, eager),
``decoder`` (sampling with the flat T5 step decoder, ``step``, or the model's own forward,
``hf``) and ``lora_cast`` (peft's cast of LoRA inputs to fp32 under autocast: ``on`` or
``off``, the default). Everything after ``--`` goes to ``detox-exp``. The first two
steps (warm-up) are dropped; prints the median of every ``time/*`` metric per version.
Batches differ from step to step (prompt lengths), and a fixed alternation gives each version
the same batches in every run: run both orders (``--values a,b`` and ``--values b,a``) and
average them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch

from detox_exp import cli, generation
from detox_exp.ppo import trainer
from detox_exp.seq2seq import base_model


def set_attention(ppo: trainer.PPOTrainer, impl: str) -> None:
    # transformers passes the choice on to the encoder / decoder stacks' config copies
    base_model(ppo.policy.model).set_attn_implementation(impl)


def set_decoder(ppo: trainer.PPOTrainer, which: str) -> None:
    if which not in ("step", "hf"):
        raise SystemExit(f"--knob decoder takes step or hf, got {which!r}")
    sample = partial(generation.sample_responses, step_decoder=which == "step")
    trainer.sample_responses = sample  # the name the trainer calls


def set_lora_cast(ppo: trainer.PPOTrainer, which: str) -> None:
    """``on``: peft casts LoRA inputs to fp32 under autocast too; ``off``: the trainer's
    default (the cast switched off)."""
    import peft.helpers

    if which not in ("on", "off"):
        raise SystemExit(f"--knob lora_cast takes on or off, got {which!r}")
    original = ORIGINAL.setdefault("cast", peft.helpers.disable_input_dtype_casting)

    def keep_casting(model: torch.nn.Module, active: bool = True):
        return original(model, active=False)

    peft.helpers.disable_input_dtype_casting = original if which == "off" else keep_casting


ORIGINAL: dict[str, Callable] = {}
KNOBS: dict[str, Callable[[trainer.PPOTrainer, str], None]] = {
    "attention": set_attention,
    "decoder": set_decoder,
    "lora_cast": set_lora_cast,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--knob", choices=sorted(KNOBS), default="attention")
    parser.add_argument("--values", default="sdpa,detox_t5", help="comma-separated versions")
    parser.add_argument("overrides", nargs="*", help="detox-exp overrides (after --)")
    args = parser.parse_args()
    impls, knob = args.values.split(","), KNOBS[args.knob]
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    train_step = trainer.PPOTrainer.train_step

    def alternating_step(self: trainer.PPOTrainer) -> dict[str, float]:
        impl = impls[self.step % len(impls)]
        knob(self, impl)
        metrics = train_step(self)
        if self.step > 2:
            for key, value in metrics.items():
                if key.startswith("time/"):
                    times[impl][key].append(value)
        return metrics

    trainer.PPOTrainer.train_step = alternating_step
    sys.argv = ["detox-exp", *args.overrides]
    try:
        cli.main()
    except SystemExit as done:
        if done.code:
            raise
    for impl in impls:
        steps = times[impl]
        if not steps:
            print(f"{impl}: no measured steps (raise ppo.steps)")
            continue
        n = len(steps["time/step_s"])
        medians = " ".join(f"{k[5:]}={statistics.median(v):.3f}" for k, v in sorted(steps.items()))
        print(f"{impl} ({n} steps): {medians}")


if __name__ == "__main__":
    main()
