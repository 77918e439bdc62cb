"""Dialogue prompts for PPO and evaluation: load (hub / local), filter, template, tokenise, split.

The same code path serves DialogSum from the hub (``path: knkarthick/dialogsum``), a local
JSON-lines / CSV file or folder (``dataset=jsonl``) and the offline demo (``dataset=demo``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from detox_exp.errors import ConfigError, DataError
from detox_exp.utils import check_utf8, is_local_path, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "dialogue", "summary")
PROMPT_COLUMNS = ("id", "prompt", "reference", "references", "topic", "input_ids")


def references_of(row: dict[str, Any]) -> list[str]:
    """Every reference summary of a prompt row (prepared data without a ``references``
    column has its one ``reference``)."""
    return list(row.get("references") or [row["reference"]])


@dataclass
class PromptSplits:
    """Tokenised prompts, one per distinct dialogue. Columns: id, prompt, reference (the
    first summary), references (all of the dialogue's summaries), topic, input_ids."""

    train: Dataset
    eval: Dataset

    def save(self, data_dir: str | Path) -> None:
        for name, split in (("train", self.train), ("eval", self.eval)):
            write_jsonl(Path(data_dir) / f"{name}.jsonl", split.to_list())

    @classmethod
    def load(cls, data_dir: str | Path) -> PromptSplits:
        splits = {}
        for name in ("train", "eval"):
            path = Path(data_dir) / f"{name}.jsonl"
            if not path.is_file():
                raise DataError(
                    "paths.data_dir",
                    f"no prepared prompts at {path}",
                    "run with stages.prepare_data=true or point paths.data_dir at a prepared run",
                )
            splits[name] = Dataset.from_list([r for _, r in read_jsonl(path)])
        return cls(**splits)


def _load_local_file(path: Path) -> Dataset:
    if path.suffix == ".jsonl":
        records = [record for _, record in read_jsonl(path)]
        if not records:
            raise DataError(
                "dataset.path", f"{path} has no records", "point it at a non-empty file"
            )
        return Dataset.from_list(records)
    builder = {".json": "json", ".csv": "csv"}.get(path.suffix)
    if builder is None:
        raise DataError("dataset.path", f"unsupported file type {path.suffix!r}", "use .jsonl/.csv")
    check_utf8(path, "dataset.path")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def load_splits(
    path: str,
    field: str,
    default_split: str,
    name: str | None = None,
    data_files: dict[str, str] | None = None,
    revision: str | None = None,
) -> DatasetDict:
    """Splits of a hub dataset id, a local folder, a local file (as ``default_split``) or
    explicit ``data_files`` (split -> file). ``field`` names the config node in errors."""
    if data_files:
        splits = {}
        for split, file in data_files.items():
            if not Path(file).is_file():
                raise DataError(f"{field}.data_files.{split}", f"file {file} not found", "check it")
            splits[split] = _load_local_file(Path(file))
        return DatasetDict(splits)
    source = Path(path).expanduser()
    if source.is_file():
        return DatasetDict({default_split: _load_local_file(source)})
    if source.is_dir():
        return datasets.load_dataset(str(source), name)
    if is_local_path(path) or source.suffix in (".jsonl", ".csv", ".json"):
        raise DataError(f"{field}.path", f"file {path} not found", "check the path")
    # snapshot_download + load_dataset(folder) works online and from a planted cache with
    # HF_HUB_OFFLINE=1 (load_dataset(repo_id) refuses to run offline).
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(path, repo_type="dataset", revision=revision)
    except Exception as err:
        raise DataError(
            f"{field}.path",
            f"cannot fetch hub dataset {path!r} ({type(err).__name__})",
            "check the id and network access, or use a local file",
        ) from err
    return datasets.load_dataset(folder, name)


class DialogueData:
    """Builds :class:`PromptSplits` from a dialogue-summary data set (see conf/dataset)."""

    def __init__(
        self,
        path: str | None,
        prompt_template: str,
        revision: str | None = None,
        data_files: dict[str, str] | None = None,
        train_split: str = "train",
        eval_split: str | None = "test",
        eval_fraction: float | None = None,
        min_chars: int = 0,
        max_chars: int | None = None,
        max_prompt_tokens: int = 512,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if not path and not data_files:
            raise ConfigError(
                "dataset.path",
                "is not set",
                "set dataset.path=FILE.jsonl (or a hub dataset id, or dataset.data_files)",
            )
        if "{dialogue}" not in prompt_template:
            raise ConfigError(
                "dataset.prompt_template", "has no {dialogue} field", "add {dialogue}"
            )
        if eval_split is None and not (eval_fraction and 0 < eval_fraction < 1):
            raise ConfigError(
                "dataset.eval_fraction",
                f"must be in (0, 1) when dataset.eval_split is null, got {eval_fraction}",
                "set e.g. dataset.eval_fraction=0.1",
            )
        if max_chars is not None and max_chars < min_chars:
            raise ConfigError("dataset.max_chars", "is below dataset.min_chars", "raise it")
        if max_prompt_tokens < 1:
            raise ConfigError("dataset.max_prompt_tokens", "must be >= 1", "raise it")
        self.path, self.revision, self.data_files = path, revision, data_files
        self.train_split, self.eval_split, self.eval_fraction = (
            train_split,
            eval_split,
            eval_fraction,
        )
        self.prompt_template = prompt_template
        self.min_chars, self.max_chars = min_chars, max_chars
        self.max_prompt_tokens = max_prompt_tokens
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.seed = seed

    # ------------------------------------------------------------------ loading
    def load_raw(self) -> DatasetDict:
        """Load every split of the source as a DatasetDict (no filtering yet)."""
        return load_splits(
            self.path,
            "dataset",
            self.train_split,
            data_files=self.data_files,
            revision=self.revision,
        )

    # ---------------------------------------------------------------- preparing
    def prepare(self, tokenizer: PreTrainedTokenizerBase) -> PromptSplits:
        """Filter by length, build prompts, tokenise, and split train / held-out eval."""
        raw = self.load_raw()
        if self.train_split not in raw:
            raise DataError(
                "dataset.train_split",
                f"no split {self.train_split!r} (have {sorted(raw)})",
                "set dataset.train_split",
            )
        for name, split in raw.items():
            missing = [c for c in REQUIRED_COLUMNS if c not in split.column_names]
            if missing:
                raise DataError(
                    "dataset.path",
                    f"split {name!r} lacks required columns {missing} (has {split.column_names})",
                    "provide columns id, dialogue, summary (and optionally topic)",
                )
        if self.eval_split is not None:
            if self.eval_split not in raw:
                raise DataError(
                    "dataset.eval_split",
                    f"no split {self.eval_split!r} (have {sorted(raw)})",
                    "set dataset.eval_split, or null with dataset.eval_fraction",
                )
            train, held_out = (
                self._process(raw[self.train_split]),
                self._process(raw[self.eval_split]),
            )
        else:
            processed = self._process(raw[self.train_split])
            if len(processed) < 2:
                raise self._nothing_left("usable", len(processed))
            parts = processed.train_test_split(test_size=self.eval_fraction, seed=self.seed)
            train, held_out = parts["train"], parts["test"]
        # Evaluation prompts never appear in PPO training, even if the source repeats them.
        held_out_prompts = set(held_out["prompt"])
        train = train.filter(lambda row: row["prompt"] not in held_out_prompts)
        for name, split in (("train", train), ("eval", held_out)):
            if len(split) == 0:
                raise self._nothing_left(name, 0)
        train = train.shuffle(seed=self.seed)
        if self.max_train_samples is not None:
            train = train.select(range(min(self.max_train_samples, len(train))))
        if self.max_eval_samples is not None:
            held_out = held_out.shuffle(seed=self.seed)
            held_out = held_out.select(range(min(self.max_eval_samples, len(held_out))))
        train = self._tokenize(tokenizer, train, "train")
        held_out = self._tokenize(tokenizer, held_out, "eval")
        log.info("prepared %d train and %d held-out prompts", len(train), len(held_out))
        return PromptSplits(train=train, eval=held_out)

    def _nothing_left(self, name: str, count: int) -> DataError:
        return DataError(
            "dataset",
            f"{count} {name} dialogues left after filtering (min_chars={self.min_chars}, "
            f"max_chars={self.max_chars}, max_prompt_tokens={self.max_prompt_tokens})",
            "loosen dataset.min_chars / max_chars / max_prompt_tokens or check the data",
        )

    def _process(self, split: Dataset) -> Dataset:
        if "topic" not in split.column_names:
            split = split.add_column("topic", [""] * len(split))
        lo, hi = self.min_chars, self.max_chars

        def keep(row: dict[str, Any]) -> bool:
            text = row["dialogue"]
            return isinstance(text, str) and lo <= len(text) and (hi is None or len(text) <= hi)

        split = split.filter(keep)
        template = self.prompt_template
        # One prompt per distinct dialogue, with every reference summary the source holds
        # for it (DialogSum's test split has three rows per dialogue, one per annotator):
        # held-out prompts are then distinct, and ROUGE is scored against all references.
        first: dict[str, int] = {}
        summaries: list[list[str]] = []
        rows: list[dict[str, Any]] = []
        for row in split:
            dialogue = row["dialogue"]
            if dialogue not in first:
                first[dialogue] = len(rows)
                rows.append(row)
                summaries.append([])
            summaries[first[dialogue]].append(row["summary"] or "")
        if len(rows) < len(split):
            log.info("%d rows hold %d distinct dialogues", len(split), len(rows))
        return Dataset.from_dict(
            {
                "id": [str(row["id"]) for row in rows],
                "prompt": [template.format(dialogue=row["dialogue"]) for row in rows],
                "reference": [refs[0] for refs in summaries],
                "references": summaries,
                "topic": [row["topic"] or "" for row in rows],
            },
            features=datasets.Features(
                {
                    "id": datasets.Value("string"),
                    "prompt": datasets.Value("string"),
                    "reference": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                    "topic": datasets.Value("string"),
                }
            ),
        )

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, split: Dataset, name: str) -> Dataset:
        if len(split) == 0:
            return split
        split = split.map(
            lambda batch: {"input_ids": tokenizer(batch["prompt"])["input_ids"]}, batched=True
        )
        before = len(split)
        split = split.filter(lambda row: len(row["input_ids"]) <= self.max_prompt_tokens)
        if len(split) < before:
            log.info(
                "%s: dropped %d prompts over %d tokens",
                name,
                before - len(split),
                self.max_prompt_tokens,
            )
        if len(split) == 0:
            raise DataError(
                "dataset.max_prompt_tokens",
                f"every {name} prompt is longer than {self.max_prompt_tokens} tokens",
                "raise dataset.max_prompt_tokens",
            )
        return split.select_columns(list(PROMPT_COLUMNS))
