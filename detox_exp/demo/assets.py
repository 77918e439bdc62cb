"""Offline demo assets, built on first use and cached (rebuilt when their config changes).

``<cache_dir>/``
- ``data/train.jsonl``, ``data/test.jsonl``: DialogSum-shaped dialogues (disjoint),
- ``data/classifier.jsonl``: labeled toxic / non-toxic texts (text, label: 0 nothate, 1 hate),
- ``policy/``: a tiny T5 (random init) warm-started by supervised fine-tuning on train.jsonl,
- ``reward_init/``: a tiny random-init RoBERTa classifier (nothate / hate) that
  ``stages.train_reward`` trains,
- ``assets.json``: the config the assets were built from (the cache key).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    get_linear_schedule_with_warmup,
)

from detox_exp.demo.corpus import (
    LABELS,
    generate_classifier_corpus,
    generate_dialogues,
    split_records,
)
from detox_exp.utils import progress, write_json, write_jsonl

log = logging.getLogger(__name__)

ASSETS_VERSION = 1  # bump when the build code changes what it produces


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer (exact round trip of any text) trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def t5_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """T5 conventions: pad=0, eos=1, unk=2; every sequence ends with </s>."""
    tok = train_bpe(texts, vocab_size, ["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def roberta_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """RoBERTa conventions: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4."""
    tok = train_bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def random_t5(vocab_size: int, **dims: Any) -> T5ForConditionalGeneration:
    """A random-init T5 (gated-gelu) from torch's global RNG. A fresh T5Config lacks T5's
    special ids, so they are set here: pad=0, eos=1, decoder start = pad."""
    config = T5Config(
        vocab_size=vocab_size,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        feed_forward_proj="gated-gelu",
        **dims,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.decoder_start_token_id = 0
    return model


def random_classifier(
    tokenizer: PreTrainedTokenizerFast,
    labels: tuple[str, ...] | list[str] = LABELS,
    vocab_size: int | None = None,
    **dims: Any,
) -> RobertaForSequenceClassification:
    """A random-init RoBERTa sequence classifier with ``labels`` (index = label id) and the
    special ids of ``tokenizer`` (from :func:`roberta_tokenizer`)."""
    config = RobertaConfig(
        vocab_size=vocab_size or len(tokenizer),
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **dims,
    )
    return RobertaForSequenceClassification(config)


class DemoAssets:
    """Builds the demo's data, tokenizers and tiny models into ``cache_dir``; see conf."""

    def __init__(
        self,
        cache_dir: str,
        prompt_template: str,
        seed: int = 1234,
        n_dialogues: int = 2400,
        n_test_dialogues: int = 240,
        rude_rate: float = 0.35,
        n_classifier_texts: int = 5000,
        vocab_size: int = 2000,
        policy: dict[str, Any] | None = None,
        classifier: dict[str, Any] | None = None,
        sft: dict[str, Any] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.params = {
            "version": ASSETS_VERSION,
            "prompt_template": prompt_template,
            "seed": seed,
            "n_dialogues": n_dialogues,
            "n_test_dialogues": n_test_dialogues,
            "rude_rate": rude_rate,
            "n_classifier_texts": n_classifier_texts,
            "vocab_size": vocab_size,
            "policy": dict(policy or {}),
            "classifier": dict(classifier or {}),
            "sft": dict(sft or {}),
        }
        self.key = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]

    def is_built(self) -> bool:
        stamp = self.cache_dir / "assets.json"
        return stamp.is_file() and json.loads(stamp.read_text()).get("key") == self.key

    def build(self) -> Path:
        """Build unless an up-to-date copy is cached; returns ``cache_dir``."""
        if self.is_built():
            log.info("demo assets: cached in %s", self.cache_dir)
            return self.cache_dir
        start = time.perf_counter()
        tmp = self.cache_dir.with_name(f".{self.cache_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("demo assets: building in %s (first use or config changed)", self.cache_dir)
        self._build_into(tmp)
        write_json(tmp / "assets.json", {"key": self.key, "params": self.params})
        # Swap in atomically: a crash never leaves a half-built cache behind the stamp.
        old = self.cache_dir.with_name(f".{self.cache_dir.name}.old-{os.getpid()}")
        if self.cache_dir.exists():
            os.replace(self.cache_dir, old)
        os.replace(tmp, self.cache_dir)
        shutil.rmtree(old, ignore_errors=True)
        log.info("demo assets: built in %.1f s", time.perf_counter() - start)
        return self.cache_dir

    def _build_into(self, out: Path) -> None:
        p = self.params
        total = p["n_dialogues"] + p["n_test_dialogues"]
        dialogues = generate_dialogues(total, seed=p["seed"], rude_rate=p["rude_rate"])
        train, test = split_records(dialogues, "dialogue", p["n_test_dialogues"] / total, p["seed"])
        corpus = generate_classifier_corpus(p["n_classifier_texts"], seed=p["seed"] + 1)
        write_jsonl(out / "data" / "train.jsonl", train)
        write_jsonl(out / "data" / "test.jsonl", test)
        write_jsonl(out / "data" / "classifier.jsonl", corpus)

        prompts = [p["prompt_template"].format(dialogue=d["dialogue"]) for d in train]
        texts = prompts + [d["summary"] for d in train] + [c["text"] for c in corpus]
        policy_tok = t5_tokenizer(texts, p["vocab_size"])
        self._build_policy(out / "policy", policy_tok, prompts, [d["summary"] for d in train])
        reward_tok = roberta_tokenizer(texts, p["vocab_size"])
        self._build_classifier(out / "reward_init", reward_tok)

    def _build_classifier(self, out: Path, tokenizer: PreTrainedTokenizerFast) -> None:
        torch.manual_seed(self.params["seed"])
        model = random_classifier(tokenizer, **self.params["classifier"])
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    def _build_policy(
        self, out: Path, tokenizer: PreTrainedTokenizerFast, prompts: list[str], targets: list[str]
    ) -> None:
        sft = {
            "epochs": 4,
            "batch_size": 32,
            "lr": 3e-3,
            "max_source_tokens": 320,
            "max_target_tokens": 40,
        } | self.params["sft"]
        torch.manual_seed(self.params["seed"])
        model = random_t5(len(tokenizer), tie_word_embeddings=False, **self.params["policy"])
        src = tokenizer(prompts, truncation=True, max_length=sft["max_source_tokens"])["input_ids"]
        tgt = tokenizer(targets, truncation=True, max_length=sft["max_target_tokens"])["input_ids"]
        # Length-sorted batches, shuffled batch order: little padding, still stochastic.
        order = sorted(range(len(src)), key=lambda i: len(src[i]))
        batches = [
            order[i : i + sft["batch_size"]] for i in range(0, len(order), sft["batch_size"])
        ]
        optimizer = torch.optim.AdamW(model.parameters(), lr=sft["lr"], weight_decay=0.01)
        total = len(batches) * sft["epochs"]
        scheduler = get_linear_schedule_with_warmup(optimizer, max(1, total // 20), total)
        generator = torch.Generator().manual_seed(self.params["seed"])
        model.train()
        bar = progress(total=total, desc="demo policy SFT", unit="batch")
        for _ in range(sft["epochs"]):
            for b in torch.randperm(len(batches), generator=generator).tolist():
                idx = batches[b]
                enc = tokenizer.pad({"input_ids": [src[i] for i in idx]}, return_tensors="pt")
                labels = tokenizer.pad({"input_ids": [tgt[i] for i in idx]}, return_tensors="pt")
                label_ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
                loss = model(**enc, labels=label_ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        if not math.isfinite(loss.item()):
            raise RuntimeError("demo policy SFT diverged (non-finite loss)")
        log.info("demo policy SFT: final batch loss %.3f", loss.item())
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
