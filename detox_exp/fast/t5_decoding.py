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

The fused (and, under autocast, cast) weights and stacked LoRA matrices are built once and
kept with the model until a tensor they were built from changes. Each is keyed by its source
tensors' identity, ``_version`` (bumped by every in-place write: optimizer steps,
``load_state_dict``, ``copy_``), storage, dtype, device and shape, by the compute dtype and
by the adapter state: the active adapters and their scalings, or none when disabled; a
folded weight is new on every call and keyed by what
:func:`~detox_exp.fast.lora_fold.folded_adapter` folded (original weight, A, B, scaling).
Fused optimizers write without bumping ``_version``, so a hook after every optimizer step
bumps it for the parameters stepped. Other writes through ``.data`` go unseen; peft's merge
and unmerge write so, and weights with a merged adapter are fused on every call. So the first
rollout after an update re-fuses what the update changed (with LoRA folded, the projections
with an adapter; unfolded, only the LoRA stacks), and evaluation batches reuse everything.

Every other op mirrors ``modeling_t5`` (RMS norm in fp32, tied-embedding output scaling,
feed-forward cast to ``wo``'s dtype). Logits agree with the model's own forward to float
round-off (tests/test_t5_decoding.py). :func:`prepare` returns None for what it does not
mirror (other architectures, dropout on in any module, fp16, LoRA variants, merged adapters
that are switched off, adapters on embeddings, prompt learning), and the caller falls back to
the model's forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from detox_exp.fast.lora_fold import fold_source
from detox_exp.seq2seq import base_model, plain_lora

T5_CLASSES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")


@dataclass(frozen=True)
class _Part:
    """One projection: a frozen weight [out, in] and its LoRA updates (A, B, scaling).
    ``source``: what ``weight``'s values are a function of (tensors and settings), the key
    under which a projection built from it is cached; None: never cached."""

    weight: torch.Tensor
    lora: tuple[tuple[torch.Tensor, torch.Tensor, float], ...] = ()
    source: tuple | None = None


def _part(module: nn.Module) -> _Part | None:
    """What ``module`` (a bias-free ``nn.Linear`` or a peft LoRA layer around one) computes,
    or None for anything else."""
    from peft.tuners.lora import LoraLayer

    if type(module) is nn.Linear:
        return _Part(module.weight, source=(module.weight,)) if module.bias is None else None
    if not isinstance(module, LoraLayer):
        return None
    base = module.get_base_layer()
    if type(base) is not nn.Linear or base.bias is not None:
        return None
    weight = base.weight
    if module.merged:  # W + BA in the base weight; peft unmerges it when disabled
        # peft merges and unmerges through ``.data``, unseen by ``_version``: never cached
        return None if module.disable_adapters else _Part(weight)
    folded = fold_source(weight)
    if folded is not None:  # inside folded_adapter: keyed by what was folded
        return _Part(weight, source=("folded", *folded))
    if module.disable_adapters:
        return _Part(weight, source=(weight,))
    if not plain_lora(module):
        return None
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    lora = tuple(
        (module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a]) for a in adapters
    )
    return _Part(weight, lora, source=(weight,))


class _Projection:
    """Several projections of one input as one matmul (weights concatenated), plus their
    LoRA updates: ``x A^T`` for all adapters in one matmul, then each ``B`` on its slice.
    The concatenated weight and the LoRA stack are each taken from ``cache`` (entries
    ``name.weight``, ``name.lora``) while their sources are unchanged."""

    def __init__(
        self, parts: list[_Part], dtype: torch.dtype, cache: dict | None = None, name: str = ""
    ) -> None:
        cache = {} if cache is None else cache
        self.sizes = [p.weight.shape[0] for p in parts]
        weight_items: list | None = [dtype]
        lora_items: list = [dtype]
        for part in parts:  # each part's items, after their count
            if part.source is None or weight_items is None:
                weight_items = None  # not cacheable
            else:
                weight_items += [len(part.source), *part.source]
            lora_items += [len(part.lora), *(x for update in part.lora for x in update)]
        self.weight = _reuse(cache, f"{name}.weight", weight_items, lambda: _fuse(parts, dtype))
        self.a, self.updates = _reuse(
            cache, f"{name}.lora", lora_items, lambda: _stack(parts, dtype)
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = F.linear(x, self.weight)
        if self.a is not None:
            low = F.linear(x, self.a)
            for out_slice, rank_slice, b, scaling in self.updates:
                out[..., out_slice] += F.linear(low[..., rank_slice], b) * scaling
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (out,)


def _fuse(parts: list[_Part], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The parts' weights in ``dtype``, concatenated; and whether that is a new tensor."""
    weights = [p.weight.to(dtype) for p in parts]  # no copy where the dtype matches
    if len(weights) == 1:
        return weights[0], weights[0] is not parts[0].weight
    return torch.cat(weights), True


def _stack(parts: list[_Part], dtype: torch.dtype) -> tuple[tuple, bool]:
    """(the parts' LoRA A matrices stacked [sum of ranks, in] or None, and for each update
    (output slice, rank slice, B, scaling)); and whether there are any."""
    a_rows, updates = [], []
    out_at, rank_at = 0, 0
    for part in parts:
        size = part.weight.shape[0]
        for a, b, scaling in part.lora:
            a_rows.append(a.to(dtype))
            rank = a.shape[0]
            out_slice, rank_slice = slice(out_at, out_at + size), slice(rank_at, rank_at + rank)
            updates.append((out_slice, rank_slice, b.to(dtype), scaling))
            rank_at += rank
        out_at += size
    return (torch.cat(a_rows) if a_rows else None, updates), bool(a_rows)


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
    qkv: _Projection
    o: _Projection
    cross_norm: nn.Module
    cross_q: _Projection
    cross_kv: tuple[_Projection, _Projection]  # read once per call, for cross_k, cross_v
    cross_o: _Projection
    cross_k: torch.Tensor  # [P, H, S, dh], from the encoder output: one row per prompt
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


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """After any optimizer's step, bump the ``_version`` of every parameter it had a gradient
    for (fused optimizers, ``fused=True``, and others that write through ``.data`` or their
    own kernels leave it unchanged; for the rest it is one bump more), and free the cached
    tensors built from them now rather than at the next call: stale, they only hold memory
    through the rest of the update."""
    stepped = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not stepped:
        return
    increment_version(stepped)
    ids = {id(p) for p in stepped}
    for cache in list(_CACHES.values()):
        for name, hit in list(cache.items()):
            if any(id(ref()) in ids for ref in hit.tensors):
                del cache[name]


register_optimizer_step_post_hook(_after_optimizer_step)  # every optimizer, once per process


@dataclass
class _Cached:
    key: tuple
    tensors: tuple[weakref.ref, ...]  # the source tensors (ids alone could be reused)
    value: Any


# per model (held weakly: the cache goes with the model): "layer.name" -> cached projection
_CACHES: weakref.WeakKeyDictionary[nn.Module, dict[str, _Cached]] = weakref.WeakKeyDictionary()


def _key(items: Iterable) -> tuple[tuple[Hashable, ...], list[torch.Tensor]]:
    """A key that changes whenever the value of any tensor among ``items`` may have changed
    (identity, in-place writes, storage, dtype, device, shape), with the other items
    (settings) as they are; and the tensors."""
    key, tensors = [], []
    for item in items:
        if isinstance(t := item, torch.Tensor):
            tensors.append(t)
            item = (id(t), t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))
        key.append(item)
    return tuple(key), tensors


def _reuse(
    cache: dict[str, _Cached], name: str, items: list | None, build: Callable[[], tuple]
) -> Any:
    """``build()``'s value, reused from ``cache[name]`` while ``items`` (tensors and settings
    it is a function of; None: not cacheable) are unchanged. ``build`` returns (value,
    whether the value holds new tensors); a value made only of the sources themselves (a
    weight already in the compute dtype) is not kept."""
    key, tensors = _key(items or ())
    hit = cache.get(name)
    if (
        items is not None
        and hit is not None
        and hit.key == key
        and all(ref() is t for ref, t in zip(hit.tensors, tensors, strict=True))
    ):
        return hit.value
    with torch.no_grad():  # a decoder never carries gradients
        value, new = build()
    if new and items is not None:
        cache[name] = _Cached(key, tuple(weakref.ref(t) for t in tensors), value)
    else:
        cache.pop(name, None)
    return value


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
    projection: Callable[..., _Projection | None],
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
    fused = _CACHES.setdefault(net, {})

    def projection(name: str, *modules: nn.Module) -> _Projection | None:
        parts = [_part(m) for m in modules]
        return None if any(p is None for p in parts) else _Projection(parts, dtype, fused, name)

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
