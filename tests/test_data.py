"""Data preparation and reward scoring on local files (fast, no subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detox_exp.data.dialogues import DialogueData, PromptSplits
from detox_exp.data.labeled import LabeledTextData
from detox_exp.demo.corpus import generate_dialogues
from detox_exp.errors import ConfigError, DataError
from detox_exp.models import load_tokenizer
from detox_exp.reward.scorer import ToxicityScorer, find_label
from detox_exp.utils import write_jsonl

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


@pytest.fixture
def dialogues_file(tmp_path: Path) -> Path:
    rows = generate_dialogues(60, seed=3)
    rows.append({"id": "short", "dialogue": "too short", "summary": "s", "topic": "t"})
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    return path


def builder(path: Path, **kw) -> DialogueData:
    args = dict(
        path=str(path),
        prompt_template=TEMPLATE,
        eval_split=None,
        eval_fraction=0.2,
        min_chars=200,
        max_chars=1000,
        max_prompt_tokens=4096,
        seed=5,
    )
    return DialogueData(**(args | kw))


def test_prepare_filters_templates_and_splits(
    dialogues_file: Path, tiny_t5: Path, tmp_path
) -> None:
    tok = load_tokenizer(str(tiny_t5))
    splits = builder(dialogues_file).prepare(tok)
    assert len(splits.train) + len(splits.eval) == 60  # the short dialogue is filtered out
    assert len(splits.eval) == 12
    assert set(splits.train["id"]).isdisjoint(splits.eval["id"])
    assert set(splits.train["prompt"]).isdisjoint(splits.eval["prompt"])
    row = splits.eval[0]
    assert row["prompt"].startswith("Summarize the following conversation.\n\n#Person")
    assert row["prompt"].endswith("\n\nSummary: ")
    assert row["input_ids"] == tok(row["prompt"])["input_ids"]
    # deterministic from the seed, different for another seed
    again = builder(dialogues_file).prepare(tok)
    assert again.eval["id"] == splits.eval["id"] and again.train["id"] == splits.train["id"]
    other = builder(dialogues_file, seed=6).prepare(tok)
    assert other.eval["id"] != splits.eval["id"]
    splits.save(tmp_path / "data")
    loaded = PromptSplits.load(tmp_path / "data")
    assert loaded.eval["id"] == splits.eval["id"]


def test_prompt_token_limit_drops_long_prompts(dialogues_file: Path, tiny_t5: Path) -> None:
    tok = load_tokenizer(str(tiny_t5))
    full = builder(dialogues_file).prepare(tok)
    lengths = sorted(len(x) for x in full.train["input_ids"])
    limit = lengths[len(lengths) // 2]
    capped = builder(dialogues_file, max_prompt_tokens=limit).prepare(tok)
    assert all(len(x) <= limit for x in capped.train["input_ids"])
    assert len(capped.train) < len(full.train)


def test_bad_template_and_fraction() -> None:
    with pytest.raises(ConfigError, match="dataset.prompt_template"):
        DialogueData(path="x.jsonl", prompt_template="no field")
    with pytest.raises(ConfigError, match="dataset.eval_fraction"):
        DialogueData(path="x.jsonl", prompt_template=TEMPLATE, eval_split=None, eval_fraction=1.5)


def test_path_or_data_files_required(dialogues_file: Path, tiny_t5: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.path: is not set"):
        DialogueData(path=None, prompt_template=TEMPLATE)
    # data_files names the files instead of path (dialogsum.yaml): no path needed
    data = DialogueData(
        path=None,
        data_files={"train": str(dialogues_file)},
        prompt_template=TEMPLATE,
        eval_split=None,
        eval_fraction=0.2,
        min_chars=200,
    )
    assert len(data.prepare(load_tokenizer(str(tiny_t5))).train) == 48


def test_malformed_jsonl_reports_line(tmp_path: Path, tiny_t5: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": 1}) + "\n\n[1, 2]\n")
    with pytest.raises(DataError, match="line 3 is not a JSON object"):
        builder(path).prepare(load_tokenizer(str(tiny_t5)))


def test_labeled_data_dedups_before_split(tmp_path: Path) -> None:
    rows = [{"text": f"text {i % 50}", "label": i % 2} for i in range(100)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    data = LabeledTextData(
        path=str(tmp_path / "c.jsonl"),
        label_names=["nothate", "hate"],
        eval_split=None,
        eval_fraction=0.2,
        seed=0,
    ).load()
    assert len(data.train_texts) + len(data.eval_texts) == 50
    assert set(data.train_texts).isdisjoint(data.eval_texts)
    assert set(data.train_labels) == {"nothate", "hate"}


def test_label_found_by_name_not_position() -> None:
    assert find_label({0: "hate", 1: "nothate"}, "nothate", "f") == 1
    assert find_label({0: "NOTHATE", 1: "hate"}, "nothate", "f") == 0
    with pytest.raises(ConfigError, match="reward.nontoxic_label"):
        find_label({0: "LABEL_0", 1: "LABEL_1"}, "nothate", "reward.nontoxic_label")


@pytest.mark.parametrize("reward_type", ["logit", "prob", "log_odds"])
def test_scorer_reward_types(standins, reward_type: str) -> None:
    scorer = ToxicityScorer(
        str(standins["reward"]), reward_type=reward_type, device="cpu", batch_size=2
    )
    texts = ["a polite summary", "you idiot", "", "another one here"]
    scores = scorer.score(texts)
    enc = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**enc).logits
    p = torch.softmax(logits, -1)[:, scorer.nontoxic_index]
    expected = {
        "logit": logits[:, scorer.nontoxic_index],
        "prob": p,
        "log_odds": torch.log(p) - torch.log1p(-p),
    }[reward_type]
    torch.testing.assert_close(scores.reward, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores.toxicity, 1 - p, atol=1e-5, rtol=1e-5)


def test_reward_training_beats_chance(standins, tmp_path: Path) -> None:
    from detox_exp.demo.corpus import generate_classifier_corpus
    from detox_exp.reward.training import RewardModelTrainer

    write_jsonl(tmp_path / "c.jsonl", generate_classifier_corpus(1200, seed=0))
    data = LabeledTextData(
        path=str(tmp_path / "c.jsonl"),
        label_names=["nothate", "hate"],
        eval_split=None,
        eval_fraction=0.25,
        seed=0,
    )
    trainer = RewardModelTrainer(
        init_from=str(standins["reward"]),
        data=data,
        output_dir=str(tmp_path / "rm"),
        epochs=4,
        lr=2e-3,
        batch_size=32,
        max_length=64,
        device="cpu",
    )
    metrics = trainer.train()
    assert metrics["reward_model/eval_before/accuracy"] < 0.7  # random init: about chance
    assert metrics["reward_model/eval/accuracy"] > 0.8
    assert metrics["reward_model/eval/auroc"] > 0.85
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    # the saved model scores the held-out texts as the trainer measured
    held_out = data.load()
    tox = ToxicityScorer(str(tmp_path / "rm"), device="cpu").score(held_out.eval_texts).toxicity
    is_hate = torch.tensor([label == "hate" for label in held_out.eval_labels])
    assert tox[is_hate].mean() > tox[~is_hate].mean() + 0.5


def test_a_dialogue_in_several_rows_is_one_prompt_with_all_references(
    tmp_path: Path, tiny_t5: Path
) -> None:
    """DialogSum's test split stores each dialogue three times, one row per reference
    summary: the held-out prompts are distinct dialogues carrying all three references,
    and ROUGE is scored against the best of them."""
    import csv

    from detox_exp.metrics import rouge_l_per_example

    dialogues = generate_dialogues(30, seed=4)
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    for path, rows in ((train, dialogues[:20]), (test, dialogues[20:])):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "dialogue", "summary", "topic"])
            writer.writeheader()
            for d in rows:
                copies = 3 if path == test else 1
                for n in range(copies):
                    summary = d["summary"] if n == 0 else f"annotator {n} wrote {d['summary']}"
                    writer.writerow(d | {"id": f"{d['id']}_{n}", "summary": summary})
    data = DialogueData(
        path=None,
        data_files={"train": str(train), "test": str(test)},
        prompt_template=TEMPLATE,
        eval_split="test",
        max_prompt_tokens=4096,
        max_eval_samples=None,
    )
    splits = data.prepare(load_tokenizer(str(tiny_t5)))
    assert len(splits.eval) == 10 and len(set(splits.eval["prompt"])) == 10
    for row in splits.eval:
        assert len(row["references"]) == 3 and row["reference"] == row["references"][0]
        assert row["references"][1].startswith("annotator 1 wrote")
    assert all(len(r) == 1 for r in splits.train["references"])
    # the best of the references: a response equal to the second one scores 1
    row = splits.eval[0]
    got = rouge_l_per_example([row["references"][1]], [row["references"]])
    assert got[0] == pytest.approx(1.0)
    assert rouge_l_per_example([row["references"][1]], [row["reference"]])[0] < 1.0
    # saved and loaded back with the references
    splits.save(tmp_path / "prepared")
    again = PromptSplits.load(tmp_path / "prepared")
    assert again.eval[0]["references"] == row["references"]
