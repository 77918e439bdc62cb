"""The PPO actor-critic: a seq2seq LM (LoRA-wrapped) plus a value head on the decoder.

The reference model for the KL penalty is the same network with the LoRA adapter disabled
(``peft``'s ``disable_adapter()``), or a frozen copy when the whole network is fine-tuned.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from detox_exp.seq2seq import (
    base_config,
    encode,
    expand_groups,
    reference,
    shared_cross_attention,
)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T, V]
    values: torch.Tensor | None  # [B, T]


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
        return reference(self.model)

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
