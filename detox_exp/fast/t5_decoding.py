"""One-token-at-a-time T5 decoding without the ``transformers`` module stack.

Sampling 32 tokens for 16 prompts spends much of its time outside the matmuls: every token
walks ~150 ``nn.Module`` calls, peft's LoRA wrapper (with two dtype casts per call under
autocast), the cache classes and the mask and position-bias builders. :func:`prepare` sets
up one rollout and :meth:`T5StepDecoder.step` runs the same math as a flat list of tensor ops:

* the cross-attention keys / values of every layer are computed once per prompt from the
  encoder output (two matmuls over its positions, from the model's own weights) and read by
  its k samples in place (a prompt's k queries are one batched matmul against them), never
  copied per sample;
* the self-attention cache is preallocated for ``max_new_tokens`` and written in place; the
  attention always spans the whole cache, later positions masked, so every step has the same
  shapes (oneDNN keeps one kernel per matmul shape);
* the decoder's relative position bias is computed once for all steps;
* projections that read the same input are one matmul (self-attention q, k, v; the gated
  feed-forward's two input projections), their LoRA updates ``s * B A x`` computed as peft
  does, with the A matrices of one input stacked into one matmul. Under ``folded_adapter``
  (fp32) LoRA is already in the base weights.

The fused weights are built once and kept with the model until a tensor they were built from
changes (:mod:`.fused_weights`).

Every other op mirrors ``modeling_t5`` (RMS norm in fp32, tied-embedding output scaling,
feed-forward cast to ``wo``'s dtype). Logits agree with the model's own forward to float
round-off (tests/test_t5_decoding.py). :func:`prepare` returns None for what it does not
mirror (other architectures, dropout on in any module, fp16, LoRA variants, merged adapters
that are switched off, adapters on embeddings, prompt learning), and the caller falls back to
the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detox_exp.fast.fused_weights import CACHES, Projection, part
from detox_exp.seq2seq import base_model

T5_CLASSES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``T5LayerNorm``: scale by the root mean square (accumulated in fp32), no mean, no bias."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(norm.weight.dtype)
    return norm.weight * x


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
    """T5 attention (no 1/sqrt(d) scaling) of q [N, H, m, dh] against keys / values
    [N, H, S, dh]: -> [N * m, 1, H * dh]. Self-attention: one query per row (m = 1); cross-
    attention: N prompts, the m = k queries of a prompt's k samples, one batched matmul."""
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + bias, dim=-1)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(-1, 1, q.shape[1] * q.shape[3])


@dataclass
class _Layer:
    self_norm: nn.Module
    qkv: Projection
    o: Projection
    cross_norm: nn.Module
    cross_q: Projection
    cross_kv: tuple[Projection, Projection]  # read once per call, for cross_k, cross_v
    cross_o: Projection
    cross_k: torch.Tensor  # [P, H, S, dh], from the encoder output: one row per prompt
    cross_v: torch.Tensor
    ff_norm: nn.Module
    wi: Projection  # (wi,) or (wi_0, wi_1) for gated activations
    act: nn.Module
    wo: Projection
    wo_dtype: torch.dtype
    keys: torch.Tensor  # self-attention cache [B, H, max_steps, dh]
    values: torch.Tensor


class T5StepDecoder:
    """Incremental decoding state for one batch; call :meth:`step` once per token."""

    def __init__(
        self,
        layers: list[_Layer],
        final_norm: nn.Module,
        embed: torch.Tensor,
        lm_head: Projection,
        self_bias: torch.Tensor,
        cross_bias: torch.Tensor,
        heads: int,
        output_scale: float | None,
        samples_per_prompt: int = 1,
    ) -> None:
        self.layers, self.final_norm, self.embed, self.lm_head = layers, final_norm, embed, lm_head
        self.self_bias, self.cross_bias = self_bias, cross_bias  # [1, H, T, T], [P, 1, 1, S]
        self.heads, self.output_scale = heads, output_scale
        self.samples_per_prompt = samples_per_prompt
        self.t = 0

    @property
    def max_steps(self) -> int:
        return self.self_bias.shape[-1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the next token, given the previous tokens [B, 1] (B = P * k)."""
        t = self.t
        if t >= self.max_steps:
            raise IndexError(f"T5StepDecoder: more than max_steps={self.max_steps} steps")
        bias = self.self_bias[:, :, t : t + 1]  # later positions hold the dtype's minimum
        hidden = F.embedding(token, self.embed)
        heads = (token.shape[0], 1, self.heads, -1)
        groups = (-1, self.samples_per_prompt, self.heads, self.layers[0].keys.shape[-1])
        for layer in self.layers:
            x = _rms_norm(hidden, layer.self_norm)
            q, k, v = (y.view(heads).transpose(1, 2) for y in layer.qkv(x))
            layer.keys[:, :, t : t + 1] = k
            layer.values[:, :, t : t + 1] = v
            (out,) = layer.o(_attend(q, layer.keys, layer.values, bias))
            hidden = hidden + out

            x = _rms_norm(hidden, layer.cross_norm)
            (q,) = layer.cross_q(x)
            q = q.view(groups).transpose(1, 2)  # [P, H, k, dh]: a prompt's k samples
            (out,) = layer.cross_o(_attend(q, layer.cross_k, layer.cross_v, self.cross_bias))
            hidden = hidden + out

            x = _rms_norm(hidden, layer.ff_norm)
            wi = layer.wi(x)
            x = layer.act(wi[0]) * wi[1] if len(wi) == 2 else layer.act(wi[0])
            if x.dtype != layer.wo_dtype and layer.wo_dtype != torch.int8:
                x = x.to(layer.wo_dtype)
            (out,) = layer.wo(x)
            hidden = hidden + out
        hidden = _rms_norm(hidden, self.final_norm)
        self.last_hidden = hidden[:, -1]  # the decoder's last state (value guidance reads it)
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        self.t += 1
        (logits,) = self.lm_head(hidden)
        return logits[:, -1]


def _compute_dtype(net: nn.Module, device: torch.device) -> torch.dtype | None:
    """The dtype every matmul runs in: the autocast dtype, or the weights' single dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    dtypes = {p.dtype for p in net.parameters()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _mirrored(model: nn.Module, device: torch.device) -> tuple[nn.Module, torch.dtype] | None:
    """(the T5 network, the compute dtype) when this path mirrors ``model``, else None."""
    net = base_model(model)
    if type(net).__name__ not in T5_CLASSES or any(m.training for m in model.modules()):
        return None  # dropout on somewhere: not mirrored
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # prefix / prompt tuning adds key-values this step does not have
    dtype = _compute_dtype(net, device)
    if dtype not in (torch.float32, torch.bfloat16):
        return None  # fp16: modeling_t5 clamps activations; mixed dtypes without autocast
    if type(net.decoder.embed_tokens) is not nn.Embedding:
        return None
    return net, dtype


def _layer(
    block: nn.Module,
    i: int,
    projection: Callable[..., Projection | None],
    memory: torch.Tensor,
    split_heads: Callable[[torch.Tensor], torch.Tensor],
    cache: tuple[int, int, int, int],
    ff_names: tuple[str, ...],
) -> _Layer | None:
    """Decoder block ``i`` as a :class:`_Layer` over the encoder output ``memory`` [P, S, d]
    (its cross-attention keys / values projected here, once per prompt), with empty
    self-attention caches of shape ``cache``; None when a projection is not mirrored."""
    attn, cross = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
    ff = block.layer[-1].DenseReluDense
    projections = {
        "qkv": projection(f"{i}.qkv", attn.q, attn.k, attn.v),
        "o": projection(f"{i}.o", attn.o),
        "cross_q": projection(f"{i}.cross_q", cross.q),
        "cross_k": projection(f"{i}.cross_k", cross.k),
        "cross_v": projection(f"{i}.cross_v", cross.v),
        "cross_o": projection(f"{i}.cross_o", cross.o),
        "wi": projection(f"{i}.wi", *(getattr(ff, name) for name in ff_names)),
        "wo": projection(f"{i}.wo", ff.wo),
    }
    if any(p is None for p in projections.values()):
        return None
    # once per call over S positions: two large matmuls (no gain from one, no copy)
    cross_kv = (projections["cross_k"], projections["cross_v"])
    cross_k, cross_v = (split_heads(*proj(memory)) for proj in cross_kv)
    return _Layer(
        self_norm=block.layer[0].layer_norm,
        qkv=projections["qkv"],
        o=projections["o"],
        cross_norm=block.layer[1].layer_norm,
        cross_q=projections["cross_q"],
        cross_kv=cross_kv,
        cross_o=projections["cross_o"],
        cross_k=cross_k.contiguous(),
        cross_v=cross_v.contiguous(),
        ff_norm=block.layer[-1].layer_norm,
        wi=projections["wi"],
        act=ff.act,
        wo=projections["wo"],
        wo_dtype=ff.wo.weight.dtype,
        keys=memory.new_zeros(cache),
        values=memory.new_zeros(cache),
    )


def _biases(
    decoder: nn.Module, max_steps: int, query_mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """modeling_t5's biases: the first decoder layer's relative position bias, causal (later
    positions at the dtype's minimum), and for cross-attention the encoder padding
    ([P, 1, 1, S]: one row per prompt)."""
    device, low = query_mask.device, torch.finfo(dtype).min
    self_bias = (
        decoder.block[0].layer[0].SelfAttention.compute_bias(max_steps, max_steps, device=device)
    )
    causal = torch.ones(max_steps, max_steps, dtype=torch.bool, device=device).tril()
    self_bias = torch.where(causal, self_bias.to(dtype), low)
    keep = query_mask[:, None, None, :].bool()
    cross_bias = torch.where(keep, torch.zeros((), dtype=dtype, device=device), low)
    return self_bias, cross_bias


def prepare(
    model: nn.Module,
    encoder_hidden: torch.Tensor,
    query_mask: torch.Tensor,
    max_steps: int,
    samples_per_prompt: int = 1,
) -> T5StepDecoder | None:
    """A :class:`T5StepDecoder` for ``model`` (T5 / mT5, optionally peft-wrapped with plain
    LoRA) over ``max_steps`` tokens, or None when this path does not mirror ``model`` (then
    decode with the model's forward). Call under ``torch.no_grad()`` and the autocast of the
    forward pass it replaces; inside ``folded_adapter(model)`` LoRA is already folded in.
    The fused weights come from the model's cache while their sources are unchanged (module
    docstring).

    ``encoder_hidden`` [P, S, d] and ``query_mask`` [P, S] hold one row per prompt; with
    ``samples_per_prompt`` k the decoder runs P * k rows (prompt p's samples are rows
    p * k ... p * k + k - 1), and each prompt's cross-attention keys / values are projected
    once, stored once ([P, H, S, dh]) and read by its k rows."""
    mirrored = _mirrored(model, encoder_hidden.device)
    if mirrored is None:
        return None
    net, dtype = mirrored
    config, decoder = net.config, net.decoder
    heads, prompts = config.num_heads, encoder_hidden.shape[0]
    ff_names = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
    fused = CACHES.setdefault(net, {})

    def projection(name: str, *modules: nn.Module) -> Projection | None:
        parts = [part(m) for m in modules]
        return None if any(p is None for p in parts) else Projection(parts, dtype, fused, name)

    def split_heads(y: torch.Tensor) -> torch.Tensor:  # [P, S, H * dh] -> [P, H, S, dh]
        return y.view(prompts, -1, heads, config.d_kv).transpose(1, 2)

    memory = encoder_hidden.to(dtype)
    cache = (prompts * samples_per_prompt, heads, max_steps, config.d_kv)
    layers = [
        _layer(block, i, projection, memory, split_heads, cache, ff_names)
        for i, block in enumerate(decoder.block)
    ]
    lm_head = projection("lm_head", net.lm_head)
    if lm_head is None or any(layer is None for layer in layers):
        return None
    self_bias, cross_bias = _biases(decoder, max_steps, query_mask, dtype)
    return T5StepDecoder(
        layers,
        decoder.final_layer_norm,
        decoder.embed_tokens.weight,
        lm_head,
        self_bias,
        cross_bias,
        heads,
        # T5 scales tied-embedding outputs (scale_decoder_outputs); mT5 does not
        config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else None,
        samples_per_prompt,
    )
