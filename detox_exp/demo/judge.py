"""An independent toxicity judge for the demo (``eval.judges.insults``): a rule, not a learned
classifier. A summary is toxic (1) if it contains one of the insults the demo's rude
summaries are made of (:data:`detox_exp.demo.corpus.INSULTS`), else 0. It shares none of the
trained classifier's errors (e.g. its high scores for garbled, repetitive text), so a drop
it also sees is a drop in insults, not in what the classifier happens to dislike."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detox_exp.demo.corpus import contains_insult
from detox_exp.reward.scorer import Scores


class InsultJudge:
    """``score(texts)`` as :class:`detox_exp.reward.scorer.ToxicityScorer` returns it:
    toxicity 1 or 0, reward ``log p(non-toxic)`` (0, or log 1e-6 for an insult)."""

    def score(self, texts: Sequence[str]) -> Scores:
        toxic = torch.tensor([float(contains_insult(t)) for t in texts], dtype=torch.float32)
        reward = torch.log((1 - toxic).clamp_min(1e-6))
        return Scores(reward=reward, toxicity=toxic)
