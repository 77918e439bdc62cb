"""Stage ``train_reward``: fine-tune the toxicity classifier on labeled text (a plain torch loop
on one process: in a multi-process run only the main process trains, while the others wait).

Reports accuracy, F1 (toxic = positive) and AUROC on the held-out split, saves the model as
safetensors in ``output_dir``, and the later stages score with it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from detox_exp.data.labeled import LabeledTextData
from detox_exp.errors import ConfigError, DataError
from detox_exp.models import load_config
from detox_exp.reward.scorer import find_label
from detox_exp.tracking import Tracker
from detox_exp.utils import progress, resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)


class RewardModelTrainer:
    """Fine-tunes ``init_from`` (a sequence classifier) on ``data``; see conf/reward."""

    def __init__(
        self,
        init_from: str,
        data: LabeledTextData,
        output_dir: str,
        nontoxic_label: str = "nothate",
        epochs: int = 1,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        batch_size: int = 16,
        max_length: int = 128,
        seed: int = 0,
        device: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        for field, value in (("epochs", epochs), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(
                    f"reward.training.{field}", f"must be >= 1, got {value}", "raise it"
                )
        if lr <= 0:
            raise ConfigError("reward.training.lr", f"must be > 0, got {lr}", "use e.g. 1e-5")
        self.init_from, self.data, self.output_dir = init_from, data, Path(output_dir)
        self.nontoxic_label = nontoxic_label
        self.epochs, self.lr, self.weight_decay = epochs, lr, weight_decay
        self.warmup_ratio, self.batch_size, self.max_length = warmup_ratio, batch_size, max_length
        self.seed, self.device = seed, device
        self.revision, self.trust_remote_code = revision, trust_remote_code

    def _label_ids(self, id2label: dict, names: list[str]) -> torch.Tensor:
        ids = {}
        for name in sorted(set(names)):
            try:
                ids[name] = find_label(id2label, name, "reward.training.data.label_names")
            except ConfigError as err:
                raise DataError(
                    "reward.training.data.label_names",
                    f"data label {name!r} is not a label of {self.init_from} "
                    f"({sorted(id2label.values())})",
                    "name the data's labels as the classifier's config.id2label does",
                ) from err
        return torch.tensor([ids[n] for n in names])

    @torch.inference_mode()
    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        texts: list[str],
        labels: torch.Tensor,
        device: torch.device,
    ) -> dict[str, float]:
        """Accuracy, F1 and AUROC with "toxic" (not the non-toxic label) as positive class."""
        model.eval()
        nontoxic = find_label(model.config.id2label, self.nontoxic_label, "reward.nontoxic_label")
        preds, tox = [], []
        for start in range(0, len(texts), 64):
            enc = tokenizer(
                texts[start : start + 64],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            logits = model(**enc).logits.float()
            preds.append(logits.argmax(-1).cpu())
            tox.append(1.0 - torch.softmax(logits, -1)[:, nontoxic].cpu())
        pred = torch.cat(preds).numpy()
        toxicity = torch.cat(tox).numpy()
        y_true = labels.numpy()
        is_toxic = (y_true != nontoxic).astype(int)
        auroc = float(roc_auc_score(is_toxic, toxicity)) if len(set(is_toxic)) == 2 else math.nan
        return {
            "accuracy": float(accuracy_score(y_true, pred)),
            "f1": float(f1_score(is_toxic, (pred != nontoxic).astype(int), zero_division=0)),
            "auroc": auroc,
        }

    def _fit(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        texts: list[str],
        labels: torch.Tensor,
        device: torch.device,
    ) -> list[float]:
        """``epochs`` passes of AdamW over ``texts`` in shuffled batches (the order from
        ``seed``), linear warm-up then decay, each step clipped to norm 1; the last epoch's
        batch losses."""
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        n = len(texts)
        total = math.ceil(n / self.batch_size) * self.epochs
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(self.warmup_ratio * total), total
        )
        generator = torch.Generator().manual_seed(self.seed)
        bar = progress(total=total, desc="reward model", unit="batch")
        for epoch in range(self.epochs):
            model.train()
            order = torch.randperm(n, generator=generator).tolist()
            losses = []
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                out = model(**enc, labels=labels[idx].to(device))
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(out.loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            log.info("reward model epoch %d: loss %.4f", epoch + 1, float(np.mean(losses)))
        bar.close()
        return losses

    def train(self, tracker: Tracker | None = None) -> dict[str, float]:
        """Train, evaluate, save; returns held-out metrics (``reward_model/eval/*``)."""
        seed_everything(self.seed)
        splits = self.data.load()
        config = load_config(
            self.init_from, "reward.training.init_from", self.revision, self.trust_remote_code
        )
        train_labels = self._label_ids(config.id2label, splits.train_labels)
        eval_labels = self._label_ids(config.id2label, splits.eval_labels)
        tokenizer = AutoTokenizer.from_pretrained(
            self.init_from, revision=self.revision, trust_remote_code=self.trust_remote_code
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            self.init_from,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            use_safetensors=True,
        )
        # One process, no DistributedDataParallel: under torchrun the other processes are
        # waiting at the stage boundary, and DDP's constructor runs a collective they would
        # never join. ``cuda`` (no index) is the current device, set per process by Dist.
        device = resolve_device(self.device)
        model.to(device)
        n_train = len(splits.train_texts)
        before = self.evaluate(model, tokenizer, splits.eval_texts, eval_labels, device)
        losses = self._fit(model, tokenizer, splits.train_texts, train_labels, device)
        after = self.evaluate(model, tokenizer, splits.eval_texts, eval_labels, device)
        metrics = {f"reward_model/eval_before/{k}": v for k, v in before.items()}
        metrics |= {f"reward_model/eval/{k}": v for k, v in after.items()}
        metrics |= {
            "reward_model/train/loss": float(np.mean(losses)),
            "reward_model/train/samples": n_train,
            "reward_model/eval/samples": len(splits.eval_texts),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(self.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(self.output_dir)
        write_json(self.output_dir / "metrics.json", metrics)
        if tracker is not None:
            tracker.log_summary(metrics)
        log.info(
            "reward model: held-out accuracy %.3f, F1 %.3f, AUROC %.3f -> %s",
            after["accuracy"],
            after["f1"],
            after["auroc"],
            self.output_dir,
        )
        return metrics
