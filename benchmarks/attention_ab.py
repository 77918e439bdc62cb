"""Compare attention implementations inside ONE PPO run, switching every step.

Separate runs on a shared VM drift by ~10%, more than the differences being measured; here
each implementation gets every other step of the same process, so drift hits both alike:

    .venv/bin/python benchmarks/attention_ab.py --impls sdpa,detox_t5 -- \\
        experiment=bench model.name_or_path=DIR/policy reward.name_or_path=DIR/reward \\
        dataset=jsonl dataset.path=DIR/prompts.jsonl ppo.steps=16 precision=bf16

Everything after ``--`` goes to ``detox-exp``. The first two steps (warm-up) are dropped;
prints the median of every ``time/*`` metric per implementation. Batches differ from step to
step (prompt lengths), and a fixed alternation gives each implementation the same batches in
every run: run both orders (``--impls a,b`` and ``--impls b,a``) and average them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

from detox_exp import cli
from detox_exp.ppo import trainer
from detox_exp.ppo.policy import base_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", default="sdpa,detox_t5", help="comma-separated names")
    parser.add_argument("overrides", nargs="*", help="detox-exp overrides (after --)")
    args = parser.parse_args()
    impls = args.impls.split(",")
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    train_step = trainer.PPOTrainer.train_step

    def alternating_step(self: trainer.PPOTrainer) -> dict[str, float]:
        impl = impls[self.step % len(impls)]
        # transformers passes the choice on to the encoder / decoder stacks' config copies
        base_model(self.policy.model).set_attn_implementation(impl)
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
