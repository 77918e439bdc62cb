"""T5 attention for bf16 / fp16 on CPU: two plain matmuls instead of the CPU flash kernel
(switch: ``fast.t5_attention``; measured in docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

import torch

ATTENTION = "detox_t5"


def t5_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """T5 attention: ``transformers``' SDPA path, except for bf16 / fp16 on CPU.

    There, the CPU flash-attention kernel is slower than two plain matmuls (benchmark T5
    shapes, ``benchmarks/micro.py``: 0.77 vs 0.24 ms per cross-attention decoding step, 6.3
    vs 3.7 ms for an encoder self-attention forward + backward), so the scores come from
    matmuls in the inputs' dtype and the softmax accumulates in fp32 internally; masks and
    position bias are combined as SDPA's path does. The price: the scores are rounded to
    bf16 before the softmax (the flash kernel keeps them in fp32), so the logits' error
    against fp32 is somewhat larger than SDPA's own bf16 error (tests/test_attention.py
    holds it within twice SDPA's).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = q_len > 1 and attention_mask is None and causal
    # Decoding self-attention (one query, a cache that grows every step) stays on SDPA:
    # oneDNN would build and keep a matmul kernel for every cache length (+25 MB RSS). So does
    # a causal prefill longer than the query, which SDPA's path crops.
    decoding = q_len == 1 and getattr(module, "is_causal", False)
    if (
        query.device.type != "cpu"
        or query.dtype == torch.float32
        or decoding
        or (causal and kv_len > q_len)
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )
    if position_bias is None:
        position_bias = query.new_zeros(())
    bias = layer_bias(position_bias, attention_mask, causal, query, key)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2))
    if scale != 1.0:
        scores.mul_(scale)
    if torch.broadcast_shapes(scores.shape, bias.shape) == scores.shape:
        scores.add_(bias)  # in place: a fresh [B, H, q, k] buffer costs more than the add
    else:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def layer_bias(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """Position bias and mask combined as SDPA's path combines them, in the query's dtype.

    modeling_t5 hands every layer of a pass the same ``position_bias`` and mask tensors, so
    the [B, H, q, k] result is built by the first layer and kept on ``position_bias`` (a
    Python attribute: it lives as long as that pass's bias) for the others. Not kept when the
    bias is trained (full fine-tuning: it would hold its own autograd graph), for inference
    tensors (they have no version counter to check) or when the result is ``position_bias``
    itself (nothing to save, and it would reference itself).
    """
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    tensors = (position_bias,) if attention_mask is None else (position_bias, attention_mask)
    if position_bias.requires_grad or any(t.is_inference() for t in tensors):
        bias = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        return bias.to(query.dtype)
    mask_version = None if attention_mask is None else attention_mask._version
    shape = (query.shape[0], query.shape[2], key.shape[2])
    versions = (position_bias._version, mask_version, causal, query.dtype, shape)
    cached = getattr(position_bias, "_detox_layer_bias", None)
    if cached is not None and cached[0] is attention_mask and cached[1] == versions:
        return cached[2]
    bias = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
    bias = bias.to(query.dtype)
    if bias is not position_bias:
        position_bias._detox_layer_bias = (attention_mask, versions, bias)
    return bias


def register_attention() -> None:
    """Make ``attn_implementation="detox_t5"`` (:func:`t5_attention`) known to transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, t5_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
