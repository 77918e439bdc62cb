"""The PPO actor-critic: a seq2seq LM (LoRA-wrapped) plus a value head on the decoder.

The reference model for the KL penalty is the same network with the LoRA adapter disabled
(``peft``'s ``disable_adapter()``), or a frozen copy when the whole network is fine-tuned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T, V]
    values: torch.Tensor | None  # [B, T]


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


class ActorCritic(nn.Module):
    """Policy LM + value head (one value per response token, from the last decoder state).

    Every pass takes the prompts once ([P, S], one row per prompt) and the responses of
    ``samples_per_prompt`` k samples of each ([P * k, T], prompt p's samples in rows
    p * k ... p * k + k - 1): the encoder runs once per prompt and its output is expanded to
    the k decoders, forward and backward (exact: the k samples share the same encoder input).

    Args:
        model: an encoder-decoder LM, usually a ``peft.PeftModel`` with a LoRA adapter.
        separate_value_model: compute values with a separate copy of the network (its own
            adapter / weights) instead of the policy's decoder states.
        value_head: False for critic-free estimators (RLOO, GRPO): no value head, no values.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        separate_value_model: bool = False,
        value_head: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.is_peft = hasattr(model, "disable_adapter")
        hidden = base_config(model).d_model
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)
        self.value_model = copy.deepcopy(model) if separate_value_model and value_head else None
        # Full fine-tuning: the reference is a frozen copy of the initial weights.
        self.ref_model = None if self.is_peft else copy.deepcopy(model).requires_grad_(False).eval()

    @property
    def config(self):
        return base_config(self.model)

    def reference(self) -> AbstractContextManager:
        """Context in which ``self.model`` computes the reference distribution (peft only)."""
        return self.model.disable_adapter() if self.is_peft else nullcontext()

    @staticmethod
    def _run(
        model: nn.Module,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        decoder_ids: torch.Tensor,
        hidden: bool,
        encoder_hidden: torch.Tensor | None = None,
        samples_per_prompt: int = 1,
    ):
        """``model``'s decoder over [P * k, T] with its encoder run once on the [P, S]
        prompts (or ``encoder_hidden`` [P, S, d] given), expanded to the k samples, and the
        cross-attention keys / values projected once per prompt (:func:`shared_cross_attention`)."""
        if encoder_hidden is None:
            encoder_hidden = encode(model, query_ids, query_mask)
        k = samples_per_prompt
        with shared_cross_attention(model, encoder_hidden, k) as decoder_side:
            return model(
                encoder_outputs=BaseModelOutput(last_hidden_state=decoder_side),
                attention_mask=expand_groups(query_mask, k),
                decoder_input_ids=decoder_ids,
                output_hidden_states=hidden,
                use_cache=False,
                return_dict=True,
            )

    def encode(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """The policy's encoder output [P, S, d] (adapter on), to share between generation
        and the rollout's forward pass instead of running the encoder twice."""
        return encode(self.model, query_ids, query_mask)

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        decoder_ids: torch.Tensor,
        with_values: bool = True,
        encoder_hidden: torch.Tensor | None = None,
        samples_per_prompt: int = 1,
    ) -> ForwardOutput:
        """Policy logits and values for teacher-forced ``decoder_ids`` [P * k, T] of the
        [P, S] prompts; pass ``encoder_hidden`` (from :meth:`encode`) to skip the encoder."""
        with_values = with_values and self.value_head is not None
        k = samples_per_prompt
        shared = with_values and self.value_model is None
        out = self._run(self.model, query_ids, query_mask, decoder_ids, shared, encoder_hidden, k)
        values = None
        if with_values:
            if shared:
                last = out.decoder_hidden_states[-1]
            else:
                last = self._run(
                    self.value_model, query_ids, query_mask, decoder_ids, True, None, k
                ).decoder_hidden_states[-1]
            values = self.value_head(last.to(self.value_head.weight.dtype)).squeeze(-1)
        return ForwardOutput(logits=out.logits, values=values)

    def reference_logits(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        decoder_ids: torch.Tensor,
        samples_per_prompt: int = 1,
    ) -> torch.Tensor:
        """Logits of the reference model (adapter disabled, or the frozen copy) for
        [P * k, T] responses of [P, S] prompts (its encoder, too, runs once per prompt)."""
        k = samples_per_prompt
        if self.ref_model is not None:
            model = self.ref_model
            return self._run(model, query_ids, query_mask, decoder_ids, False, None, k).logits
        with self.reference():
            return self._run(self.model, query_ids, query_mask, decoder_ids, False, None, k).logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
