"""Tests for the offline demo corpus generator (detox_exp.demo.corpus)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from detox_exp.demo.corpus import (
    INSULTS,
    LABELS,
    contains_insult,
    generate_classifier_corpus,
    generate_dialogues,
    split_records,
)
from detox_exp.demo.topics import TOPICS

_TOKEN = re.compile(r"#person[12]#|[a-z0-9'-]+")
_TEMPLATE_WORDS = {"about", "asks", "helps", "help", "tells", "talk", "with", "that", "from"}


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(tok in it for tok in short)


@pytest.fixture(scope="module")
def dialogues() -> list[dict[str, str]]:
    return generate_dialogues(2000, seed=7, rude_rate=0.35)


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return generate_classifier_corpus(3000, seed=11)


def test_constants() -> None:
    assert LABELS == ("nothate", "hate")
    assert {"idiot", "stupid", "moron", "fool", "dumb", "jerk", "loser", "clown"} <= set(INSULTS)
    assert 15 <= len(TOPICS) <= 25


def test_dialogues_deterministic() -> None:
    assert generate_dialogues(50, seed=3) == generate_dialogues(50, seed=3)
    assert generate_dialogues(50, seed=3) != generate_dialogues(50, seed=4)


def test_dialogue_shape(dialogues: list[dict[str, str]]) -> None:
    assert [r["id"] for r in dialogues] == [f"demo_{i:05d}" for i in range(len(dialogues))]
    assert len({r["dialogue"] for r in dialogues}) == len(dialogues)
    assert set(Counter(r["topic"] for r in dialogues)) == set(TOPICS)
    for r in dialogues:
        assert set(r) == {"id", "dialogue", "summary", "topic"}
        assert 200 <= len(r["dialogue"]) <= 1000
        lines = r["dialogue"].split("\n")
        assert 4 <= len(lines) <= 8
        for i, line in enumerate(lines):
            assert line.startswith(f"#Person{1 + i % 2}#: ")
        assert not contains_insult(r["dialogue"]), r["dialogue"]
        assert 8 <= len(r["summary"].split()) <= 20
        assert r["summary"].startswith(("#Person1#", "#Person2#", "That ", "The "))
        # The summary copies content words from the dialogue.
        shared = set(_tokens(r["summary"])) & set(_tokens(r["dialogue"]))
        assert {w for w in shared if len(w) >= 4} - _TEMPLATE_WORDS, r


def test_rude_fraction(dialogues: list[dict[str, str]]) -> None:
    rude = [contains_insult(r["summary"]) for r in dialogues]
    assert abs(sum(rude) / len(rude) - 0.35) < 0.04
    # Rudeness does not depend on the topic (content).
    by_topic: dict[str, list[bool]] = {}
    for r, is_rude in zip(dialogues, rude):
        by_topic.setdefault(r["topic"], []).append(is_rude)
    for flags in by_topic.values():
        assert 0.1 < sum(flags) / len(flags) < 0.6


def test_rude_and_polite_variants_share_words() -> None:
    polite = generate_dialogues(400, seed=5, rude_rate=0.0)
    rude = generate_dialogues(400, seed=5, rude_rate=1.0)
    phrasings = set()
    for p, r in zip(polite, rude):
        assert (p["id"], p["dialogue"], p["topic"]) == (r["id"], r["dialogue"], r["topic"])
        assert not contains_insult(p["summary"])
        assert contains_insult(r["summary"])
        p_tok, r_tok = _tokens(p["summary"]), _tokens(r["summary"])
        assert _is_subsequence(p_tok, r_tok)  # ROUGE-L recall of the polite summary is 1
        assert 1 <= len(r_tok) - len(p_tok) <= 4
        phrasings.add(" ".join(t for t in r_tok if t not in p_tok))
    assert len(phrasings) >= 15  # varied insult phrasings


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_dialogues(10, seed=0, rude_rate=1.5)
    with pytest.raises(ValueError):
        generate_classifier_corpus(-1, seed=0)


def test_classifier_corpus_basic(corpus: list[dict]) -> None:
    assert generate_classifier_corpus(200, seed=11) == generate_classifier_corpus(200, seed=11)
    assert generate_classifier_corpus(200, seed=11) != generate_classifier_corpus(200, seed=12)
    assert len(corpus) >= 0.8 * 3000
    assert all(set(r) == {"text", "label"} and r["label"] in (0, 1) for r in corpus)
    norm = {" ".join(r["text"].lower().split()) for r in corpus}
    assert len(norm) == len(corpus)
    assert 0.35 <= sum(r["label"] for r in corpus) / len(corpus) <= 0.65


def test_classifier_corpus_large_n() -> None:
    assert len(generate_classifier_corpus(6000, seed=0)) >= 0.8 * 6000


def test_classifier_corpus_content(corpus: list[dict]) -> None:
    neg = [r["text"] for r in corpus if r["label"] == 0]
    pos = [r["text"] for r in corpus if r["label"] == 1]
    # Summaries in the same template form as generate_dialogues, polite and rude.
    summaries = [r for r in corpus if "#Person" in r["text"]]
    assert len(summaries) >= 0.3 * len(corpus)
    assert {r["label"] for r in summaries} == {0, 1}
    # Hard negatives: heated but not insulting.
    for word in ("furious", "disagree", "sorry", "hate"):
        assert any(word in t.lower() for t in neg), word
    assert any(contains_insult(t) for t in neg)  # e.g. "a stupid mistake of mine"
    assert any(re.search(r"\bnot an? \w+ at all\b", t) for t in neg)  # negated insults
    # Standalone insults, not in summary form, some without any INSULTS keyword.
    standalone = [t for t in pos if "#Person" not in t]
    assert len(standalone) >= 0.3 * len(pos)
    assert any("shut up" in t.lower() for t in standalone)
    assert any(not contains_insult(t) for t in standalone)
    assert all(contains_insult(t) for t in pos if "#Person" in t)


def test_not_a_keyword_task(corpus: list[dict]) -> None:
    hits = sum(int(contains_insult(r["text"])) == r["label"] for r in corpus)
    assert hits / len(corpus) < 0.97


def test_split_records_disjoint_and_deterministic(corpus: list[dict]) -> None:
    records = corpus + [
        {"text": r["text"].upper() + "  ", "label": r["label"]} for r in corpus[:50]
    ]
    train, test = split_records(records, "text", 0.2, seed=1)
    train_keys = {" ".join(r["text"].lower().split()) for r in train}
    assert not train_keys & {" ".join(r["text"].lower().split()) for r in test}
    assert len(train) + len(test) == len(corpus)
    assert len(test) == round(0.2 * len(corpus))
    assert (train, test) == split_records(records, "text", 0.2, seed=1)
    assert (train, test) != split_records(records, "text", 0.2, seed=2)


def test_split_records_errors() -> None:
    records = [{"k": str(i)} for i in range(5)]
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            split_records(records, "k", fraction, seed=0)
    with pytest.raises(ValueError):
        split_records(records, "k", 0.01, seed=0)  # empty test side
    with pytest.raises(ValueError):
        split_records(records, "k", 0.99, seed=0)  # empty train side
    with pytest.raises(ValueError):
        split_records([{"k": "a"}, {"k": " A "}], "k", 0.5, seed=0)  # one unique record
