"""Sample from the guided teacher of a saved ``algorithm=guided`` run.

    from detox_exp.guided.teacher import load_teacher
    teacher = load_teacher("outputs/demo/runs/<run>/policy")
    teacher.generate(["Summarize the following conversation. ... Summary:"], samples_per_prompt=4)

The teacher is the reference (the saved adapter's base model, adapter disabled) reweighted
per token by the saved prefix scorer at the run's beta: ``ref(a | s) V(s, a)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from detox_exp.generation import decode, pad_queries, sample_responses
from detox_exp.guided.scorer import Guide, load_guide
from detox_exp.seq2seq import reference


class Teacher:
    """A peft model (its adapter is disabled to sample) and the run's :class:`Guide`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, guide: Guide) -> None:
        self.model, self.tokenizer, self.guide = model, tokenizer, guide

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        samples_per_prompt: int = 1,
        generation: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> list[list[str]]:
        """``samples_per_prompt`` responses of each prompt (``generation``: the
        ``model.generation`` keys; default: plain sampling of up to 64 tokens)."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer(list(prompts), truncation=True)["input_ids"]
        query, mask = pad_queries(ids, self.tokenizer.pad_token_id, device)
        generator = torch.Generator(device=device).manual_seed(seed)
        with reference(self.model):
            response, _ = sample_responses(
                self.model,
                self.tokenizer,
                query,
                mask,
                dict(generation or {}),
                samples_per_prompt=samples_per_prompt,
                generator=generator,
                guide=self.guide,
            )
        texts = decode(self.tokenizer, response)
        k = samples_per_prompt
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def load_teacher(policy_dir: str | Path, device: str = "cpu") -> Teacher:
    """The teacher of a run's saved policy folder (``<run dir>/policy``: ``adapter/``,
    ``merged/`` for the tokenizer and ``prefix_scorer.pt``)."""
    from peft import AutoPeftModelForSeq2SeqLM

    policy_dir = Path(policy_dir)
    model = AutoPeftModelForSeq2SeqLM.from_pretrained(policy_dir / "adapter").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir / "merged")
    return Teacher(model, tokenizer, load_guide(policy_dir / "prefix_scorer.pt", device))
