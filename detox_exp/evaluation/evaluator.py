"""Held-out evaluation of a policy: generate, score the RESPONSE only, compute metrics.

Writes ``<run_dir>/eval/<phase>/generations.jsonl`` (one line per prompt x sample) and
``<run_dir>/eval/<phase>/metrics.json``; metrics are returned as ``eval/<phase>/<name>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from detox_exp import metric_names as M
from detox_exp.data.dialogues import references_of
from detox_exp.errors import ConfigError
from detox_exp.generation import (
    decode,
    decoder_inputs,
    generation_kwargs,
    pad_queries,
    sample_responses,
)
from detox_exp.guidance import guided_logits
from detox_exp.kl import kl_penalty
from detox_exp.metrics import (
    distinct_n,
    expected_max_toxicity,
    response_collapse,
    rouge_l_per_example,
    rouge_scores,
    toxicity_probability,
    toxicity_stats,
)
from detox_exp.reward.scorer import ToxicityScorer
from detox_exp.seq2seq import base_config, reference
from detox_exp.utils import progress, read_jsonl, resolve_device, write_json, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    phase: str
    metrics: dict[str, float]  # keys eval/<phase>/<name>
    toxicity: np.ndarray  # [n_prompts, k] toxicity of each sample
    rouge_l: np.ndarray  # [n_prompts, k]
    lengths: np.ndarray  # [n_prompts, k] response length in tokens, EOS excluded
    records: list[dict[str, Any]] = field(default_factory=list)

    def groups(self) -> list[list[dict[str, Any]]]:
        """Each prompt's k records, in prompt order."""
        k = self.toxicity.shape[1]
        return [self.records[i : i + k] for i in range(0, len(self.records), k)]

    def responses(self) -> list[list[str]]:
        """Each prompt's k responses, in prompt order."""
        return [[r["response"] for r in group] for group in self.groups()]

    def rewards(self) -> np.ndarray:
        """Each prompt's k rewards ``[n_prompts, k]`` (the classifier's, before KL)."""
        return np.array([[r["reward"] for r in group] for group in self.groups()])

    @classmethod
    def load(cls, run_dir: str | Path, phase: str) -> EvalResult:
        """Read back an evaluation written by :meth:`Evaluator.evaluate` (used on resume)."""
        out = Path(run_dir) / "eval" / phase
        metrics = json.loads((out / "metrics.json").read_text())
        records = [r for _, r in read_jsonl(out / "generations.jsonl")]
        k = int(metrics["samples_per_prompt"])
        toxicity = np.array([r["toxicity"]["reward"] for r in records]).reshape(-1, k)
        rouge_l = np.array([r["rouge_l"] for r in records]).reshape(-1, k)
        lengths = np.array([r["length"] for r in records], dtype=float).reshape(-1, k)
        metrics = {M.eval_key(phase, n): v for n, v in metrics.items()}
        return cls(phase, metrics, toxicity, rouge_l, lengths, records)


def sequence_kl(
    model: torch.nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Exact KL(policy || reference) over the vocabulary, summed over response tokens [B].

    The reference is the same network with its adapter disabled; NaN for non-peft models.
    With ``guide`` the policy is the guided reference ``ref(a | s) V(s, a)``
    (:func:`detox_exp.generation.sample_responses`).
    """
    if not hasattr(model, "disable_adapter"):
        return np.full(len(query_ids), np.nan)
    start_id = base_config(model).decoder_start_token_id
    dec = decoder_inputs(response_ids, start_id)
    kwargs = dict(input_ids=query_ids, attention_mask=query_mask, decoder_input_ids=dec)
    if guide is None:
        logits = model(**kwargs).logits.float()
        with reference(model):
            ref_logits = model(**kwargs).logits.float()
    else:
        with reference(model):
            out = model(**kwargs, output_hidden_states=True)
        ref_logits = out.logits.float()
        logits = guided_logits(ref_logits, guide(out.decoder_hidden_states[-1], ref_logits))
    kl = kl_penalty(None, None, "full", logits=logits, ref_logits=ref_logits)
    return (kl * response_mask).sum(1).cpu().numpy()


class Evaluator:
    """Evaluates a policy on held-out prompts with a fixed sampling seed (see conf/eval)."""

    def __init__(
        self,
        num_prompts: int | None = 100,
        samples_per_prompt: int = 1,
        batch_size: int = 32,
        toxic_threshold: float = 0.5,
        generation: Mapping[str, Any] | None = None,
        bootstrap: Mapping[str, Any] | None = None,
        judges: Mapping[str, ToxicityScorer] | None = None,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.check_args(num_prompts, samples_per_prompt, batch_size, toxic_threshold, judges)
        self.num_prompts, self.k = num_prompts, samples_per_prompt
        self.batch_size, self.threshold = batch_size, toxic_threshold
        self.generation = dict(generation or {})
        self.bootstrap = dict(bootstrap or {})
        self.judges = dict(judges or {})
        self.seed, self.device = seed, device

    @staticmethod
    def check_args(
        num_prompts: int | None = 100,
        samples_per_prompt: int = 1,
        batch_size: int = 32,
        toxic_threshold: float = 0.5,
        judges: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """The ranges of the settings (the pipeline checks them before any stage runs)."""
        if num_prompts is not None and num_prompts < 1:
            raise ConfigError(
                "eval.num_prompts", f"must be >= 1, got {num_prompts}", "raise it, or null: all"
            )
        if samples_per_prompt < 1:
            raise ConfigError(
                "eval.samples_per_prompt", f"must be >= 1, got {samples_per_prompt}", "raise it"
            )
        if batch_size < 1:
            raise ConfigError("eval.batch_size", f"must be >= 1, got {batch_size}", "raise it")
        if not 0 < toxic_threshold < 1:
            raise ConfigError("eval.toxic_threshold", "must be in (0, 1)", "use e.g. 0.5")
        if "reward" in (judges or {}):
            raise ConfigError("eval.judges.reward", "the name 'reward' is reserved", "rename it")

    def prompts(self, data: Dataset) -> Dataset:
        n = len(data) if self.num_prompts is None else min(self.num_prompts, len(data))
        return data.select(range(n))

    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scorer: ToxicityScorer,
        data: Dataset,
        phase: str,
        run_dir: str | Path,
        generation_defaults: Mapping[str, Any],
        guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> EvalResult:
        """Generate k samples per prompt, score responses, write files, return metrics.
        With ``guide``, the policy evaluated is the guided reference ``ref(a | s) V(s, a)``
        (value guidance: :func:`detox_exp.generation.sample_responses`)."""
        gen = generation_kwargs({**generation_defaults, **self.generation})
        prompts = self.prompts(data)
        rows = [(i, s) for i in range(len(prompts)) for s in range(self.k)]
        responses, lengths, kl = self._sample(model, tokenizer, prompts, rows, gen, phase, guide)
        scores = scorer.score(responses)
        toxicity = scores.toxicity.numpy().reshape(len(prompts), self.k)
        references = [references_of(prompts[i]) for i, _ in rows]
        rouge_l = rouge_l_per_example(responses, references).reshape(len(prompts), self.k)
        metrics = self._metrics(responses, references, toxicity, scores.reward, lengths, kl)
        judged = {"reward": toxicity.ravel()} | self._judged(responses)
        for name in self.judges:
            stats = toxicity_stats(judged[name], self.threshold)
            metrics |= {f"judge/{name}/{k}": v for k, v in stats.items()}
            metrics[f"judge/{name}/expected_max_toxicity"] = expected_max_toxicity(
                judged[name].reshape(len(prompts), self.k)
            )
        records = [
            {
                "id": prompts[i]["id"],
                "prompt": prompts[i]["prompt"],
                "reference": references[n][0],
                "references": references[n],
                "response": responses[n],
                "sample": s,
                "toxicity": {name: float(values[n]) for name, values in judged.items()},
                "reward": float(scores.reward[n]),
                "rouge_l": float(rouge_l[i, s]),
                "length": int(lengths[n]),
            }
            for n, (i, s) in enumerate(rows)
        ]
        self._write(Path(run_dir) / "eval" / phase, records, metrics, phase)
        return EvalResult(
            phase=phase,
            metrics={M.eval_key(phase, k): v for k, v in metrics.items()},
            toxicity=toxicity,
            rouge_l=rouge_l,
            lengths=lengths.reshape(len(prompts), self.k),
            records=records,
        )

    def _judged(self, responses: list[str]) -> dict[str, np.ndarray]:
        """Each independent judge's toxicity per response."""
        judges = self.judges.items()
        return {name: judge.score(responses).toxicity.numpy() for name, judge in judges}

    @staticmethod
    def _write(out: Path, records: list[dict], metrics: Mapping[str, float], phase: str) -> None:
        """``generations.jsonl`` and ``metrics.json`` in ``out``, and the phase's console line."""
        write_jsonl(out / "generations.jsonl", records)
        write_json(out / "metrics.json", metrics)
        log.info(
            "eval %s: toxicity %.3f, toxic fraction %.3f, ROUGE-L %.3f",
            phase,
            metrics["toxicity_mean"],
            metrics["toxic_fraction"],
            metrics["rouge_l"],
        )

    def _sample(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Dataset,
        rows: list[tuple[int, int]],
        gen: Mapping[str, Any],
        phase: str,
        guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The responses of ``rows`` (prompt, sample), their lengths in tokens (EOS excluded)
        and exact KL to the reference, from a stream of their own seeded with ``seed`` (the
        same randomness before and after training; torch's global stream is left alone)."""
        device = resolve_device(self.device)
        was_training = model.training
        model.eval()
        stream = torch.Generator(device).manual_seed(self.seed)
        responses: list[str] = [""] * len(rows)
        lengths = np.zeros(len(rows))
        kl = np.full(len(rows), np.nan)
        bar = progress(total=len(rows), desc=f"eval {phase}", unit="sample")
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids, mask = pad_queries(
                [prompts[i]["input_ids"] for i, _ in chunk], tokenizer.pad_token_id, device
            )
            with reference(model) if guide is not None else contextlib.nullcontext():
                response_ids, response_mask = sample_responses(
                    model, tokenizer, ids, mask, gen, generator=stream, guide=guide
                )
            eos = (response_ids == tokenizer.eos_token_id).float() * response_mask
            lengths[start : start + len(chunk)] = (response_mask.sum(1) - eos.sum(1)).cpu().numpy()
            responses[start : start + len(chunk)] = decode(tokenizer, response_ids)
            kl[start : start + len(chunk)] = sequence_kl(
                model, ids, mask, response_ids, response_mask, guide
            )
            bar.update(len(chunk))
        bar.close()
        model.train(was_training)
        return responses, lengths, kl

    def _metrics(
        self,
        responses: list[str],
        references: list[list[str]],
        toxicity: np.ndarray,
        reward: torch.Tensor,
        lengths: np.ndarray,
        kl: np.ndarray,
    ) -> dict[str, float]:
        """The phase's metrics (``eval/<phase>/*``, before the judges') of scored responses:
        toxicity [P, k], the reward, and the corpus, reference, length and KL statistics."""
        p, k = toxicity.shape
        metrics = toxicity_stats(toxicity.ravel(), self.threshold)
        metrics |= {
            "expected_max_toxicity": expected_max_toxicity(toxicity),
            "toxicity_probability": toxicity_probability(toxicity, self.threshold),
            "reward_mean": float(reward.mean()),
        }
        metrics |= rouge_scores(responses, references)
        metrics |= {
            "distinct_1": distinct_n(responses, 1),
            "distinct_2": distinct_n(responses, 2),
            **response_collapse(responses),
            "response_len_mean": float(lengths.mean()),
            "empty_fraction": float(np.mean([not r for r in responses])),
            # exact KL(policy || reference) summed over each response's tokens
            "kl_to_reference": float(np.mean(kl)),
            "num_prompts": p,
            "samples_per_prompt": k,
        }
        return metrics
