"""Labeled toxic / non-toxic text for training the reward classifier (stages.train_reward)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets

from detox_exp.data.dialogues import load_splits
from detox_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class LabeledSplits:
    """Texts with label names (e.g. "nothate" / "hate"), train and held-out."""

    train_texts: list[str]
    train_labels: list[str]
    eval_texts: list[str]
    eval_labels: list[str]


class LabeledTextData:
    """Loads (text, label) pairs from the hub or a local file and splits them deterministically.

    Integer labels are mapped to names with ``label_names`` (index = label); string labels
    must already be one of ``label_names``. Texts are deduplicated before splitting, so the
    held-out split never repeats a training text.
    """

    def __init__(
        self,
        path: str,
        label_names: list[str],
        name: str | None = None,
        data_files: dict[str, str] | None = None,
        train_split: str = "train",
        eval_split: str | None = "test",
        eval_fraction: float | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if len(label_names) < 2:
            raise ConfigError("reward.training.data.label_names", "needs >= 2 names", "list them")
        if eval_split is None and not (eval_fraction and 0 < eval_fraction < 1):
            raise ConfigError(
                "reward.training.data.eval_fraction",
                f"must be in (0, 1) when eval_split is null, got {eval_fraction}",
                "set e.g. reward.training.data.eval_fraction=0.2",
            )
        self.path, self.name, self.data_files = path, name, data_files
        self.label_names = list(label_names)
        self.train_split, self.eval_split, self.eval_fraction = (
            train_split,
            eval_split,
            eval_fraction,
        )
        self.text_column, self.label_column = text_column, label_column
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.seed = seed

    def _load(self) -> datasets.DatasetDict:
        return load_splits(
            self.path,
            "reward.training.data",
            self.train_split,
            name=self.name,
            data_files=self.data_files,
        )

    def _columns(self, split: datasets.Dataset) -> tuple[list[str], list[str]]:
        for column in (self.text_column, self.label_column):
            if column not in split.column_names:
                raise DataError(
                    "reward.training.data",
                    f"column {column!r} missing (have {split.column_names})",
                    "set text_column / label_column",
                )
        texts, labels = [], []
        for text, label in zip(split[self.text_column], split[self.label_column]):
            if isinstance(label, int):  # bool is an int too
                if not 0 <= int(label) < len(self.label_names):
                    raise DataError(
                        "reward.training.data.label_names",
                        f"label {label} has no name in {self.label_names}",
                        "list a name for every label id",
                    )
                label = self.label_names[int(label)]
            elif label not in self.label_names:
                raise DataError(
                    "reward.training.data.label_names",
                    f"label {label!r} not in {self.label_names}",
                    "list every label name",
                )
            if isinstance(text, str) and text.strip():
                texts.append(text)
                labels.append(label)
        return texts, labels

    def load(self) -> LabeledSplits:
        raw = self._load()
        if self.train_split not in raw:
            raise DataError(
                "reward.training.data.train_split", f"no split {self.train_split!r}", "set it"
            )
        train_texts, train_labels = self._columns(raw[self.train_split])
        if self.eval_split is not None:
            if self.eval_split not in raw:
                raise DataError(
                    "reward.training.data.eval_split", f"no split {self.eval_split!r}", "set it"
                )
            eval_texts, eval_labels = self._columns(raw[self.eval_split])
        else:
            # Deduplicate, then split deterministically: held-out texts never occur in train.
            unique = dict(zip(train_texts, train_labels))
            items = sorted(unique.items())
            rng = datasets.Dataset.from_dict({"i": list(range(len(items)))}).shuffle(seed=self.seed)
            order = rng["i"]
            n_eval = max(1, int(round(len(items) * self.eval_fraction)))
            eval_items = [items[i] for i in order[:n_eval]]
            train_items = [items[i] for i in order[n_eval:]]
            train_texts, train_labels = [t for t, _ in train_items], [lb for _, lb in train_items]
            eval_texts, eval_labels = [t for t, _ in eval_items], [lb for _, lb in eval_items]
        seen = set(eval_texts)
        keep = [i for i, t in enumerate(train_texts) if t not in seen]
        train_texts = [train_texts[i] for i in keep][: self.max_train_samples]
        train_labels = [train_labels[i] for i in keep][: self.max_train_samples]
        eval_texts, eval_labels = (
            eval_texts[: self.max_eval_samples],
            eval_labels[: self.max_eval_samples],
        )
        if not train_texts or not eval_texts:
            raise DataError("reward.training.data", "no labeled texts after splitting", "add data")
        log.info("labeled data: %d train, %d held-out texts", len(train_texts), len(eval_texts))
        return LabeledSplits(train_texts, train_labels, eval_texts, eval_labels)
