"""Code that is here for speed only, each piece behind a switch (``fast.*`` in the config).

With every switch off, the policy runs transformers' own T5 forward (SDPA attention, its
GELU module, peft's LoRA layers) and the model's forward for every decoded token; the tests
hold each fast path to that plain path (tests/test_fast_paths.py and the tests named
below). What each one buys is measured in docs/benchmarks.md.

- ``t5_attention`` (:mod:`.attention`): T5 attention in bf16 / fp16 on CPU as two plain
  matmuls instead of the CPU flash kernel (tests/test_attention.py).
- ``fused_gelu`` (:mod:`.activations`): FLAN-T5's gated-GELU in one kernel.
- ``step_decoder`` (:mod:`.t5_decoding`): one-token T5 decoding as a flat list of tensor
  ops, cross-attention keys / values projected once per prompt, its fused weights cached with
  the model (:mod:`.fused_weights`) (tests/test_t5_decoding.py).
- ``fold_lora`` (:mod:`.lora_fold`): LoRA folded into the frozen weights while decoding in
  fp32 (tests/test_sampling.py).
- ``width_multiple`` (:mod:`.widths`): prompt and response widths rounded up to a multiple,
  so oneDNN keeps one kernel per shape (1: no rounding).
- ``reuse_rollout_forward`` (``PPOTrainer.reuses_rollout_forward``): with one update per
  batch (one epoch, one minibatch), the rollout's policy pass runs with grad and serves the
  update, instead of a second forward of the same weights (tests/test_group_sampling.py).
- the top-level ``keep_freed_memory`` (:mod:`.memory`): glibc malloc tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Switches:
    t5_attention: bool = True
    fused_gelu: bool = True
    step_decoder: bool = True
    fold_lora: bool = True
    width_multiple: int = 16
    reuse_rollout_forward: bool = True


SWITCHES = Switches()  # read by the code above; set once per run by configure()


def configure(**values: Any) -> Switches:
    """Set the switches (the ``fast`` config node); unknown keys and wrong types are
    one-line config errors."""
    from detox_exp.errors import ConfigError
    from detox_exp.schema import check_fields

    check_fields(Switches, values, "fast")
    if values.get("width_multiple", 1) < 1:
        raise ConfigError("fast.width_multiple", "must be >= 1", "use 16, or 1 for no rounding")
    for key, value in values.items():
        setattr(SWITCHES, key, value)
    return SWITCHES
