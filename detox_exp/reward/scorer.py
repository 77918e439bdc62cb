"""Reward and toxicity from a sequence classifier (default: Meta's RoBERTa hate classifier)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from detox_exp.errors import ConfigError
from detox_exp.models import load_config
from detox_exp.utils import resolve_device

REWARD_TYPES = ("logit", "prob", "log_odds", "log_prob")


def find_label(id2label: dict, label: str, field: str) -> int:
    """Index of ``label`` in a model's ``config.id2label`` (by name, never hard-coded)."""
    for index, name in id2label.items():
        if str(name).lower() == label.lower():
            return int(index)
    raise ConfigError(
        field,
        f"label {label!r} is not one of the classifier's labels {sorted(id2label.values())}",
        "set it to the classifier's non-toxic label",
    )


@dataclass
class Scores:
    """Per-text outputs, shape [N] float32 on CPU."""

    reward: torch.Tensor  # the configured score of the non-toxic label (higher = less toxic)
    toxicity: torch.Tensor  # probability of toxic (1 - p(non-toxic)), in [0, 1]


class ToxicityScorer:
    """Batched, no-grad scoring of texts on the configured device.

    reward_type: ``logit`` (raw logit of the non-toxic label), ``prob`` (its probability),
    ``log_odds`` (log p - log(1 - p)) or ``log_prob`` (log p). With ``log_prob`` and a KL
    coefficient of 1, the optimum of ``E[r] - KL(pi || ref)`` is
    ``pi*(y|x) ∝ ref(y|x) p(non-toxic|y) = ref(y | x, non-toxic)``: the reference conditioned
    on being non-toxic (Korbak, Perez & Buckley 2022), at a KL of ``-log P(non-toxic | x)``.
    Toxicity is the probability of the toxic label(s).
    """

    def __init__(
        self,
        name_or_path: str,
        nontoxic_label: str = "nothate",
        reward_type: str = "logit",
        batch_size: int = 32,
        max_length: int = 512,
        device: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if reward_type not in REWARD_TYPES:
            raise ConfigError(
                "reward.reward_type", f"unknown type {reward_type!r}", f"use one of {REWARD_TYPES}"
            )
        if batch_size < 1:
            raise ConfigError("reward.batch_size", f"must be >= 1, got {batch_size}", "raise it")
        config = load_config(name_or_path, "reward.name_or_path", revision, trust_remote_code)
        self.nontoxic_index = find_label(config.id2label, nontoxic_label, "reward.nontoxic_label")
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        self.name_or_path = name_or_path
        self.reward_type, self.batch_size, self.max_length = reward_type, batch_size, max_length

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> Scores:
        """Score ``texts`` (responses only, never prompt + response)."""
        rewards, toxicities = [], []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**batch).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            nontoxic_logp = log_probs[:, self.nontoxic_index]
            if self.reward_type == "logit":
                reward = logits[:, self.nontoxic_index]
            elif self.reward_type == "prob":
                reward = nontoxic_logp.exp()
            elif self.reward_type == "log_prob":
                reward = nontoxic_logp
            else:  # log-odds: log p - log(1 - p), stable via log1p(-p)
                reward = nontoxic_logp - torch.log1p(-nontoxic_logp.exp().clamp(max=1 - 1e-7))
            rewards.append(reward.cpu())
            toxicities.append((1.0 - nontoxic_logp.exp()).clamp(0.0, 1.0).cpu())
        if not rewards:
            return Scores(torch.zeros(0), torch.zeros(0))
        return Scores(torch.cat(rewards), torch.cat(toxicities))
