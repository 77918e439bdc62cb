"""Folding LoRA into the frozen weights while decoding (switch: ``fast.fold_lora``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from detox_exp.fast import SWITCHES
from detox_exp.seq2seq import plain_lora


@contextmanager
def folded_adapter(model: nn.Module) -> Iterator[None]:
    """No-grad decoding with each LoRA update folded into its frozen weight (W + s B A):
    one matmul per projection instead of three, which matters when decoding one token at a
    time. The original weight tensors are put back afterwards, bit for bit (no unmerge
    round-off).

    A no-op (the adapters run unfolded) with ``fast.fold_lora`` off, or unless folding is
    exact enough and complete: fp32 weights and no autocast (in bf16 / fp16, ``W + delta``
    would round small updates away), every LoRA layer a plain ``nn.Linear`` with an active,
    unmerged, non-DoRA adapter, and no other trained modules (``modules_to_save``) that
    disabling the adapter would switch off.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    foldable = (
        SWITCHES.fold_lora
        and bool(layers)
        and getattr(model, "disable_adapter", None) is not None
        and not torch.is_autocast_enabled(next(model.parameters()).device.type)
        and not any(isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())
        and all(
            type(m.get_base_layer()) is nn.Linear
            and m.get_base_layer().weight.dtype == torch.float32
            and not m.merged
            and not m.disable_adapters
            and plain_lora(m)
            for m in layers
        )
    )
    if not foldable:
        yield
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                adapters = [a for a in layer.active_adapters if a in layer.lora_A]
                if not adapters:
                    continue
                delta = sum(layer.get_delta_weight(a) for a in adapters)
                originals.append((base, base.weight))
                folded = nn.Parameter(base.weight + delta.to(base.weight.dtype), False)
                folded.fold_source = (base.weight, getattr(layer, "fan_in_fan_out", False))
                for a in adapters:
                    lora = (layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a])
                    folded.fold_source += lora
                base.weight = folded
        with model.disable_adapter():
            yield
    finally:
        for base, weight in originals:
            base.weight = weight


def fold_source(weight: torch.Tensor) -> tuple | None:
    """What a weight folded by :func:`folded_adapter` was computed from, ``(W,
    fan_in_fan_out, A_1, B_1, s_1, A_2, ...)`` (the original weight, then each folded
    adapter's matrices and scaling), so a cache can key the fold by its sources (the folded
    tensor itself is new on every entry); None for any other tensor."""
    return getattr(weight, "fold_source", None)
