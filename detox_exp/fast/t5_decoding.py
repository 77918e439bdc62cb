"""One-token-at-a-time T5 decoding without the ``transformers`` module stack.

Sampling 32 tokens for 16 prompts spends much of its time outside the matmuls: every token
walks ~150 ``nn.Module`` calls, peft's LoRA wrapper (with two dtype casts per call under
autocast), the cache classes and the mask and position-bias builders. :func:`prepare` reads
the weights once per rollout and :meth:`T5StepDecoder.step` runs the same math as a flat
list of tensor ops:

* the cross-attention keys / values of every layer are computed once from the encoder output;
* the self-attention cache is preallocated for ``max_new_tokens`` and written in place; the
  attention always spans the whole cache, later positions masked, so every step has the same
  shapes (oneDNN keeps one kernel per matmul shape);
* the decoder's relative position bias is computed once for all steps;
* projections that read the same input are one matmul (self-attention q, k, v; the gated
  feed-forward's two input projections), their LoRA updates ``s * B A x`` computed as peft
  does, with the A matrices of one input stacked into one matmul. Under ``folded_adapter``
  (fp32) LoRA is already in the base weights.

Every other op mirrors ``modeling_t5`` (RMS norm in fp32, tied-embedding output scaling,
feed-forward cast to ``wo``'s dtype). Logits agree with the model's own forward to float
round-off (tests/test_t5_decoding.py). :func:`prepare` returns None for what it does not
mirror (other architectures, dropout on in any module, fp16, LoRA variants, merged adapters
that are switched off, adapters on embeddings, prompt learning), and the caller falls back to
the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detox_exp.ppo.policy import base_model, expand_groups, plain_lora

T5_CLASSES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")


@dataclass(frozen=True)
class _Part:
    """One projection: a frozen weight [out, in] and its LoRA updates (A, B, scaling)."""

    weight: torch.Tensor
    lora: tuple[tuple[torch.Tensor, torch.Tensor, float], ...] = ()


def _part(module: nn.Module) -> _Part | None:
    """What ``module`` (a bias-free ``nn.Linear`` or a peft LoRA layer around one) computes,
    or None for anything else."""
    from peft.tuners.lora import LoraLayer

    if type(module) is nn.Linear:
        return _Part(module.weight) if module.bias is None else None
    if not isinstance(module, LoraLayer):
        return None
    base = module.get_base_layer()
    if type(base) is not nn.Linear or base.bias is not None:
        return None
    if module.merged:  # W + BA in the base weight; peft unmerges it when disabled
        return None if module.disable_adapters else _Part(base.weight)
    if module.disable_adapters:
        return _Part(base.weight)
    if not plain_lora(module):
        return None
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    lora = tuple(
        (module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a]) for a in adapters
    )
    return _Part(base.weight, lora)


class _Projection:
    """Several projections of one input as one matmul (weights concatenated), plus their
    LoRA updates: ``x A^T`` for all adapters in one matmul, then each ``B`` on its slice."""

    def __init__(self, parts: list[_Part], dtype: torch.dtype) -> None:
        self.sizes = [p.weight.shape[0] for p in parts]
        weights = [p.weight.to(dtype) for p in parts]  # no copy where the dtype matches
        self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        a_rows, self.updates = [], []  # (output slice, rank slice, B, scaling)
        out_at, rank_at = 0, 0
        for part, size in zip(parts, self.sizes, strict=True):
            for a, b, scaling in part.lora:
                a_rows.append(a.to(dtype))
                rank = a.shape[0]
                self.updates.append(
                    (
                        slice(out_at, out_at + size),
                        slice(rank_at, rank_at + rank),
                        b.to(dtype),
                        scaling,
                    )
                )
                rank_at += rank
            out_at += size
        self.a = torch.cat(a_rows) if a_rows else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = F.linear(x, self.weight)
        if self.a is not None:
            low = F.linear(x, self.a)
            for out_slice, rank_slice, b, scaling in self.updates:
                out[..., out_slice] += F.linear(low[..., rank_slice], b) * scaling
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (out,)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``T5LayerNorm``: scale by the root mean square (accumulated in fp32), no mean, no bias."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(norm.weight.dtype)
    return norm.weight * x


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
    """T5 attention for one query (no 1/sqrt(d) scaling): [B, H, 1, dh] -> [B, 1, H * dh]."""
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + bias, dim=-1)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(q.shape[0], 1, -1)


@dataclass
class _Layer:
    self_norm: nn.Module
    qkv: _Projection
    o: _Projection
    cross_norm: nn.Module
    cross_q: _Projection
    cross_o: _Projection
    cross_k: torch.Tensor  # [B, H, S, dh], from the encoder output
    cross_v: torch.Tensor
    ff_norm: nn.Module
    wi: _Projection  # (wi,) or (wi_0, wi_1) for gated activations
    act: nn.Module
    wo: _Projection
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
        lm_head: _Projection,
        self_bias: torch.Tensor,
        cross_bias: torch.Tensor,
        heads: int,
        output_scale: float | None,
    ) -> None:
        self.layers, self.final_norm, self.embed, self.lm_head = layers, final_norm, embed, lm_head
        self.self_bias, self.cross_bias = self_bias, cross_bias  # [1, H, T, T], [B, 1, 1, S]
        self.heads, self.output_scale = heads, output_scale
        self.t = 0

    @property
    def max_steps(self) -> int:
        return self.self_bias.shape[-1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the next token, given the previous tokens [B, 1]."""
        t = self.t
        if t >= self.max_steps:
            raise IndexError(f"T5StepDecoder: more than max_steps={self.max_steps} steps")
        bias = self.self_bias[:, :, t : t + 1]  # later positions hold the dtype's minimum
        hidden = F.embedding(token, self.embed)
        heads = (token.shape[0], 1, self.heads, -1)
        for layer in self.layers:
            x = _rms_norm(hidden, layer.self_norm)
            q, k, v = (y.view(heads).transpose(1, 2) for y in layer.qkv(x))
            layer.keys[:, :, t : t + 1] = k
            layer.values[:, :, t : t + 1] = v
            (out,) = layer.o(_attend(q, layer.keys, layer.values, bias))
            hidden = hidden + out

            x = _rms_norm(hidden, layer.cross_norm)
            (q,) = layer.cross_q(x)
            q = q.view(heads).transpose(1, 2)
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

    ``encoder_hidden`` [P, S, d] and ``query_mask`` [P, S] hold one row per prompt; with
    ``samples_per_prompt`` k the decoder runs P * k rows (prompt p's samples are rows
    p * k ... p * k + k - 1), and each prompt's cross-attention keys / values are projected
    once and shared by its k rows."""
    net = base_model(model)
    if type(net).__name__ not in T5_CLASSES or any(m.training for m in model.modules()):
        return None  # dropout on somewhere: not mirrored
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # prefix / prompt tuning adds key-values this step does not have
    device = encoder_hidden.device
    dtype = _compute_dtype(net, device)
    if dtype not in (torch.float32, torch.bfloat16):
        return None  # fp16: modeling_t5 clamps activations; mixed dtypes without autocast
    config, decoder = net.config, net.decoder
    if type(decoder.embed_tokens) is not nn.Embedding:
        return None
    heads = config.num_heads
    prompts = encoder_hidden.shape[0]
    batch = prompts * samples_per_prompt
    ff_names = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)

    def projection(*modules: nn.Module) -> _Projection | None:
        parts = [_part(m) for m in modules]
        return None if any(p is None for p in parts) else _Projection(parts, dtype)

    def split_heads(y: torch.Tensor) -> torch.Tensor:  # [P, S, H * dh] -> [P * k, H, S, dh]
        y = y.view(prompts, -1, heads, config.d_kv).transpose(1, 2)
        return expand_groups(y, samples_per_prompt)

    layers = []
    memory = encoder_hidden.to(dtype)
    for block in decoder.block:
        attn, cross = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
        ff = block.layer[-1].DenseReluDense
        projections = {
            "qkv": projection(attn.q, attn.k, attn.v),
            "o": projection(attn.o),
            "cross_q": projection(cross.q),
            "cross_kv": projection(cross.k, cross.v),
            "cross_o": projection(cross.o),
            "wi": projection(*(getattr(ff, name) for name in ff_names)),
            "wo": projection(ff.wo),
        }
        if any(p is None for p in projections.values()):
            return None
        cross_k, cross_v = (split_heads(y) for y in projections["cross_kv"](memory))
        cache = (batch, heads, max_steps, config.d_kv)
        layers.append(
            _Layer(
                self_norm=block.layer[0].layer_norm,
                qkv=projections["qkv"],
                o=projections["o"],
                cross_norm=block.layer[1].layer_norm,
                cross_q=projections["cross_q"],
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
        )
    lm_head = projection(net.lm_head)
    if lm_head is None:
        return None
    # modeling_t5's biases: the first decoder layer's relative position bias, causal (later
    # positions at the dtype's minimum), and for cross-attention the encoder padding.
    low = torch.finfo(dtype).min
    self_bias = (
        decoder.block[0].layer[0].SelfAttention.compute_bias(max_steps, max_steps, device=device)
    )
    causal = torch.ones(max_steps, max_steps, dtype=torch.bool, device=device).tril()
    self_bias = torch.where(causal, self_bias.to(dtype), low)
    keep = expand_groups(query_mask[:, None, None, :].bool(), samples_per_prompt)
    cross_bias = torch.where(keep, torch.zeros((), dtype=dtype, device=device), low)
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
    )
