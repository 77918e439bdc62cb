"""Seq2seq and peft plumbing shared by generation, PPO, evaluation and the fast paths: the
model inside a peft wrapper, the encoder run once per prompt and its output expanded to the
k samples of each prompt (cross-attention keys / values projected once per prompt), and
mixed precision around LoRA layers. A leaf: it imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from transformers import PretrainedConfig


def base_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or the transformers model inside a ``peft`` wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_config(model: nn.Module) -> PretrainedConfig:
    """The config of ``model``, or of the model inside a ``peft`` wrapper."""
    return base_model(model).config


def encode(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """The encoder output [B, S, d] of a seq2seq ``model`` (adapters as currently set)."""
    encoder = model.get_encoder()
    return encoder(input_ids=query_ids, attention_mask=query_mask).last_hidden_state


def plain_lora(layer: nn.Module) -> bool:
    """Whether a peft LoRA layer's adapters are all plain ``s B A x`` updates: no DoRA, no
    LoRA bias, no other LoRA variant (those compute differently and are never mirrored)."""
    return (
        not any(layer.use_dora.values())
        and not any(getattr(layer, "lora_bias", {}).values())
        and not getattr(layer, "lora_variant", {})
    )


def lossless_cast(model: torch.nn.Module) -> bool:
    """Whether peft's cast of LoRA inputs to the adapter dtype is a lossless round trip under
    autocast: plain LoRA only (DoRA and other variants compute in the input's dtype; see
    ``plain_lora``) and no LoRA dropout active (it would scale in that dtype)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        return False
    for layer in layers:
        if not plain_lora(layer):
            return False
        if any(d.training and getattr(d, "p", 0) > 0 for d in layer.lora_dropout.values()):
            return False
    return True


@contextmanager
def mixed_precision(
    model: nn.Module, device_type: str, dtype: torch.dtype | None
) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device_type`` (nothing when ``dtype`` is None, i.e. fp32).

    peft casts each LoRA layer's input to the adapter's fp32 before autocast casts it straight
    back to bf16 / fp16: two copies of every projection input, forward and backward. Where
    that round trip is lossless (:func:`lossless_cast`) it is switched off: same values.
    """
    if dtype is None:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with (
        torch.autocast(device_type, dtype=dtype),
        disable_input_dtype_casting(model, active=lossless_cast(model)),
    ):
        yield


def expand_groups(x: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """Rows [P, ...] -> [P * k, ...], each prompt's row repeated for its k samples. Its
    backward sums the k samples' gradients into the prompt's row."""
    return x.repeat_interleave(samples_per_prompt, dim=0) if samples_per_prompt > 1 else x


def group_rows(groups: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """The sample rows [len(groups) * k] of prompts ``groups`` in the layout of
    :func:`expand_groups` (prompt p's samples are rows p * k ... p * k + k - 1)."""
    k = samples_per_prompt
    return (groups[:, None] * k + torch.arange(k, device=groups.device)).reshape(-1)


def cross_attention_projections(model: nn.Module) -> list[nn.Module]:
    """The key and value projections of every decoder cross-attention of a T5-family
    ``model`` (peft-wrapped or not); [] for other architectures."""
    decoder = base_model(model).get_decoder()
    projections = []
    for block in getattr(decoder, "block", ()):
        attention = (
            getattr(block.layer[1], "EncDecAttention", None) if len(block.layer) > 1 else None
        )
        if attention is None:
            return []
        projections += [attention.k, attention.v]
    return projections


@contextmanager
def shared_cross_attention(
    model: nn.Module, encoder_hidden: torch.Tensor, samples_per_prompt: int
) -> Iterator[torch.Tensor]:
    """Yields the encoder output to hand ``model``'s decoder for k samples per prompt, and
    within it the decoder's cross-attention keys and values are projected once per prompt
    and expanded to the k samples (T5 family; other architectures get
    ``expand_groups(encoder_hidden)`` and run unchanged).

    In a T5 decoder the encoder output feeds only the cross-attention key / value
    projections, and the k copies of a prompt's output are equal, so each projection reads
    ``encoder_hidden`` [P, S, d] itself and its output is repeated k times; the [P * k, S, d]
    copy the decoder is handed carries no gradient. Exact, forward and backward (the k
    samples' gradients sum into the one projection); it saves k - 1 of every k key / value
    projections of the prompt's S positions, LoRA included, forward and backward.
    """
    k = samples_per_prompt
    projections = cross_attention_projections(model) if k > 1 else []
    if not projections:
        yield expand_groups(encoder_hidden, k)
        return
    rows = encoder_hidden.shape[0] * k

    def per_prompt(module: nn.Module, args: tuple) -> tuple:
        if args[0].shape[0] != rows:
            raise ValueError(f"cross-attention input has {args[0].shape[0]} rows, not {rows}")
        return (encoder_hidden, *args[1:])

    def to_samples(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return expand_groups(output, k)

    handles = []
    for projection in projections:
        handles.append(projection.register_forward_pre_hook(per_prompt))
        handles.append(projection.register_forward_hook(to_samples))
    try:
        yield expand_groups(encoder_hidden.detach(), k)
    finally:
        for handle in handles:
            handle.remove()


def reference(model: nn.Module) -> AbstractContextManager:
    """The context in which ``model`` computes the reference distribution of the KL penalty:
    its LoRA adapter disabled (peft's ``disable_adapter``); for a model without one, the
    model itself (a full fine-tune keeps a frozen copy instead: ``ActorCritic``). The one
    way every stage enters the reference."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else nullcontext()
