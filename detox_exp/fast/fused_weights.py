"""The weights of the fast T5 decoding step (:mod:`.t5_decoding`): projections that read the
same input fused into one matmul, their LoRA updates ``s * B A x`` computed as peft does
(the A matrices of one input stacked into one matmul), and the cache that keeps what was
built with the model.

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
from detox_exp.seq2seq import plain_lora


@dataclass(frozen=True)
class Part:
    """One projection: a frozen weight [out, in] and its LoRA updates (A, B, scaling).
    ``source``: what ``weight``'s values are a function of (tensors and settings), the key
    under which a projection built from it is cached; None: never cached."""

    weight: torch.Tensor
    lora: tuple[tuple[torch.Tensor, torch.Tensor, float], ...] = ()
    source: tuple | None = None


def part(module: nn.Module) -> Part | None:
    """What ``module`` (a bias-free ``nn.Linear`` or a peft LoRA layer around one) computes,
    or None for anything else."""
    from peft.tuners.lora import LoraLayer

    if type(module) is nn.Linear:
        return Part(module.weight, source=(module.weight,)) if module.bias is None else None
    if not isinstance(module, LoraLayer):
        return None
    base = module.get_base_layer()
    if type(base) is not nn.Linear or base.bias is not None:
        return None
    weight = base.weight
    if module.merged:  # W + BA in the base weight; peft unmerges it when disabled
        # peft merges and unmerges through ``.data``, unseen by ``_version``: never cached
        return None if module.disable_adapters else Part(weight)
    folded = fold_source(weight)
    if folded is not None:  # inside folded_adapter: keyed by what was folded
        return Part(weight, source=("folded", *folded))
    if module.disable_adapters:
        return Part(weight, source=(weight,))
    if not plain_lora(module):
        return None
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    lora = tuple(
        (module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a]) for a in adapters
    )
    return Part(weight, lora, source=(weight,))


class Projection:
    """Several projections of one input as one matmul (weights concatenated), plus their
    LoRA updates: ``x A^T`` for all adapters in one matmul, then each ``B`` on its slice.
    The concatenated weight and the LoRA stack are each taken from ``cache`` (entries
    ``name.weight``, ``name.lora``) while their sources are unchanged."""

    def __init__(
        self, parts: list[Part], dtype: torch.dtype, cache: dict | None = None, name: str = ""
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


def _fuse(parts: list[Part], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The parts' weights in ``dtype``, concatenated; and whether that is a new tensor."""
    weights = [p.weight.to(dtype) for p in parts]  # no copy where the dtype matches
    if len(weights) == 1:
        return weights[0], weights[0] is not parts[0].weight
    return torch.cat(weights), True


def _stack(parts: list[Part], dtype: torch.dtype) -> tuple[tuple, bool]:
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
    for cache in list(CACHES.values()):
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
CACHES: weakref.WeakKeyDictionary[nn.Module, dict[str, _Cached]] = weakref.WeakKeyDictionary()


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
