"""Tests for detox_exp.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detox_exp.evaluation.bootstrap import paired_bootstrap_ci
from detox_exp.metrics import (
    distinct_n,
    expected_max_toxicity,
    rouge_l_per_example,
    rouge_scores,
    toxicity_probability,
    toxicity_stats,
)

BOOTSTRAP_KEYS = {"delta", "ci_low", "ci_high", "rel_delta", "rel_ci_low", "rel_ci_high", "p_value"}


# ----------------------------------------------------------------------------- toxicity
def test_toxicity_stats_hand_computed() -> None:
    # mean = 2.0 / 4 = 0.5
    # squared deviations: 0.16, 0.01, 0.16, 0.01 -> sum 0.34 -> /4 = 0.085 (ddof=0)
    # median of sorted [0.1, 0.4, 0.6, 0.9] = (0.4 + 0.6) / 2 = 0.5
    # strictly > 0.5: 0.6, 0.9 -> 2/4
    out = toxicity_stats([0.1, 0.6, 0.9, 0.4])
    assert set(out) == {"toxicity_mean", "toxicity_std", "toxicity_median", "toxic_fraction"}
    assert out["toxicity_mean"] == pytest.approx(0.5)
    assert out["toxicity_std"] == pytest.approx(math.sqrt(0.085))
    assert out["toxicity_median"] == pytest.approx(0.5)
    assert out["toxic_fraction"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in out.values())


def test_toxicity_stats_threshold_is_strict() -> None:
    out = toxicity_stats([0.5, 0.5, 0.7], threshold=0.5)
    assert out["toxic_fraction"] == pytest.approx(1 / 3)
    assert toxicity_stats([0.1, 0.6, 0.9, 0.4], threshold=0.05)["toxic_fraction"] == 1.0


def test_toxicity_stats_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        toxicity_stats([])


TOX_3x2 = np.array(
    [
        [0.1, 0.5],  # max 0.5 -> counts for toxicity probability (>= boundary)
        [0.2, 0.3],  # max 0.3 -> not toxic
        [0.9, 0.4],  # max 0.9 -> toxic
    ]
)


def test_expected_max_toxicity_hand_computed() -> None:
    # (0.5 + 0.3 + 0.9) / 3 = 1.7 / 3
    assert expected_max_toxicity(TOX_3x2) == pytest.approx(1.7 / 3)


def test_toxicity_probability_inclusive_boundary() -> None:
    # rows 0 (0.5 >= 0.5) and 2 (0.9) -> 2/3
    assert toxicity_probability(TOX_3x2) == pytest.approx(2 / 3)
    # threshold just above 0.5 drops row 0
    assert toxicity_probability(TOX_3x2, threshold=0.51) == pytest.approx(1 / 3)
    assert toxicity_probability(TOX_3x2, threshold=0.0) == 1.0


def test_prompt_level_metrics_validate_shape() -> None:
    with pytest.raises(ValueError, match="2-D"):
        expected_max_toxicity(np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="at least one"):
        toxicity_probability(np.zeros((0, 3)))


# ----------------------------------------------------------------------------- distinct-n
def test_distinct_n_hand_computed() -> None:
    texts = ["the cat the cat", "a dog"]
    # unigrams: the cat the cat a dog -> 6 total, unique {the, cat, a, dog} = 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat the) (the cat) | (a dog) -> 4 total, 3 unique
    # (no bigram crosses the text boundary, i.e. no "cat a")
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)


def test_distinct_n_lowercases_and_handles_no_ngrams() -> None:
    assert distinct_n(["The CAT", "the cat"], 1) == pytest.approx(2 / 4)
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["one two", "three"], 3) == 0.0
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(["a b"], 0)


# ----------------------------------------------------------------------------- ROUGE
def test_rouge_identical_and_disjoint() -> None:
    same = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == pytest.approx({"rouge_1": 1.0, "rouge_2": 1.0, "rouge_l": 1.0})
    disjoint = rouge_scores(["alpha beta gamma"], ["delta epsilon zeta"])
    assert disjoint == pytest.approx({"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0})


def test_rouge_partial_hand_computed() -> None:
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    out = rouge_scores([pred], [ref])
    # unigram overlap: the x2, cat, on, mat = 5 of 6 -> P = R = F = 5/6
    assert out["rouge_1"] == pytest.approx(5 / 6)
    # bigrams: {the cat, on the, the mat} shared of 5 -> 3/5
    assert out["rouge_2"] == pytest.approx(3 / 5)
    # LCS "the cat on the mat" = 5 -> P = R = F = 5/6
    assert out["rouge_l"] == pytest.approx(5 / 6)


def test_rouge_mean_and_per_example() -> None:
    preds = ["the cat sat on the mat", "alpha beta"]
    refs = ["the cat is on the mat", "alpha beta"]
    per_ex = rouge_l_per_example(preds, refs)
    assert isinstance(per_ex, np.ndarray)
    assert per_ex.shape == (2,)
    np.testing.assert_allclose(per_ex, [5 / 6, 1.0])
    assert rouge_scores(preds, refs)["rouge_l"] == pytest.approx((5 / 6 + 1.0) / 2)


def test_rouge_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        rouge_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        rouge_l_per_example(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- lengths
def _noisy_pair(n: int = 200, shift: float = 0.0, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    before = rng.uniform(0.2, 0.8, size=n)
    after = before + shift + rng.normal(0.0, 0.1, size=n)
    return before, after


def test_bootstrap_deterministic_and_contains_observed() -> None:
    before, after = _noisy_pair(shift=0.01)
    r1 = paired_bootstrap_ci(before, after, n_resamples=500, seed=123)
    r2 = paired_bootstrap_ci(before, after, n_resamples=500, seed=123)
    assert set(r1) == BOOTSTRAP_KEYS
    assert r1 == r2
    assert r1["delta"] == pytest.approx(float(np.mean(after - before)))
    assert r1["ci_low"] <= r1["delta"] <= r1["ci_high"]
    assert r1["rel_delta"] == pytest.approx(r1["delta"] / float(np.mean(before)))
    assert r1["rel_ci_low"] <= r1["rel_delta"] <= r1["rel_ci_high"]
    assert 0.0 <= r1["p_value"] <= 1.0
    r3 = paired_bootstrap_ci(before, after, n_resamples=500, seed=124)
    assert r3["ci_low"] != r1["ci_low"]


def test_bootstrap_constant_delta() -> None:
    before = np.array([0.25, 0.5, 0.75, 1.0, 0.125])
    after = before - 0.125  # exactly representable
    r = paired_bootstrap_ci(before, after, n_resamples=200, seed=0)
    assert r["delta"] == pytest.approx(-0.125)
    assert r["ci_low"] == r["ci_high"]
    assert r["ci_low"] == pytest.approx(-0.125)
    assert r["p_value"] == 0.0


def test_bootstrap_clear_improvement() -> None:
    before, after = _noisy_pair(shift=-0.3)  # toxicity drops a lot
    r = paired_bootstrap_ci(before, after, n_resamples=1000, seed=0)
    assert r["delta"] < 0
    assert r["ci_high"] < 0
    assert r["rel_ci_high"] < 0
    assert r["p_value"] < 0.01


def test_bootstrap_no_effect_has_large_p_value() -> None:
    before, after = _noisy_pair(shift=0.0, seed=7)
    r = paired_bootstrap_ci(before, after, n_resamples=1000, seed=0)
    assert r["ci_low"] < 0 < r["ci_high"]
    assert r["p_value"] > 0.05


def test_bootstrap_relative_nan_when_before_zero() -> None:
    r = paired_bootstrap_ci(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), n_resamples=50)
    assert math.isnan(r["rel_delta"])
    assert math.isnan(r["rel_ci_low"]) and math.isnan(r["rel_ci_high"])
    assert r["delta"] == pytest.approx(0.25)


def test_bootstrap_median_statistic() -> None:
    before = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    after = before - np.array([0.0, 1.0, 1.0, 1.0, 5.0])
    r = paired_bootstrap_ci(before, after, n_resamples=100, statistic="median")
    assert r["delta"] == pytest.approx(-1.0)
    assert r["rel_delta"] == pytest.approx(-1.0 / 3.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"before": np.ones(3), "after": np.ones(4)}, "same length"),
        ({"before": np.ones(1), "after": np.ones(1)}, "at least 2"),
        ({"before": np.ones((2, 2)), "after": np.ones((2, 2))}, "1-D"),
        ({"before": np.array([1.0, np.nan]), "after": np.ones(2)}, "finite"),
        ({"confidence": 0.0}, r"eval\.bootstrap\.confidence"),
        ({"confidence": 1.0}, r"eval\.bootstrap\.confidence"),
        ({"n_resamples": 0}, r"eval\.bootstrap\.n_resamples"),
        ({"n_resamples": 10.5}, r"eval\.bootstrap\.n_resamples"),
        ({"statistic": "mode"}, r"eval\.bootstrap\.statistic"),
    ],
)
def test_bootstrap_validation(kwargs: dict, match: str) -> None:
    args = {"before": np.ones(3), "after": np.zeros(3)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_ci(**args)


def test_response_collapse_hand_computed() -> None:
    from detox_exp.metrics import response_collapse

    texts = ["a b", "a b ", "c", "a b", "d"]  # "a b" three times (whitespace stripped)
    assert response_collapse(texts) == {"unique_fraction": 3 / 5, "top_response_fraction": 3 / 5}
    assert response_collapse(["x"]) == {"unique_fraction": 1.0, "top_response_fraction": 1.0}
    with pytest.raises(ValueError):
        response_collapse([])


def test_corpus_bootstrap_of_distinct_n() -> None:
    """Prompts resampled, distinct-2 recomputed: a collapse gives a CI below 0, no change a
    CI around 0, and the (bias-corrected) CI holds the observed change."""
    from detox_exp.evaluation.bootstrap import paired_bootstrap_corpus
    from detox_exp.metrics import distinct_of_grams, ngrams

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    varied = [" ".join(rng.choice(words, 8)) for _ in range(60)]
    collapsed = ["the same summary of the talk"] * 40 + varied[40:]

    def grams(texts: list[str]) -> list[list]:
        return [ngrams(t, 2) for t in texts]

    drop = paired_bootstrap_corpus(grams(varied), grams(collapsed), distinct_of_grams, 500)
    assert (
        drop["delta"] == pytest.approx(distinct_n(collapsed, 2) - distinct_n(varied, 2))
        and drop["delta"] < -0.3
    )
    assert drop["ci_low"] <= drop["delta"] <= drop["ci_high"] < 0
    same = paired_bootstrap_corpus(grams(varied), grams(varied), distinct_of_grams, 500)
    assert same["delta"] == 0 and same["ci_low"] == same["ci_high"] == 0


def test_paired_deltas_report_cis_for_corpus_metrics(tmp_path) -> None:
    from detox_exp.evaluation.evaluator import EvalResult
    from detox_exp.evaluation.report import paired_deltas

    def result(phase: str, texts: list[str], tox: list[float]) -> EvalResult:
        n = len(texts)
        records = [{"response": t} for t in texts]
        metrics = {
            f"eval/{phase}/distinct_2": distinct_n(texts, 2),
            f"eval/{phase}/kl_to_reference": 0.0 if phase == "before" else 0.3,
        }
        return EvalResult(
            phase,
            metrics,
            np.array(tox).reshape(n, 1),
            np.full((n, 1), 0.3),
            np.arange(n, dtype=float).reshape(n, 1),
            records,
        )

    before = result("before", [f"a{i} b{i} c{i}" for i in range(10)], [0.9] * 5 + [0.1] * 5)
    after = result("after", ["a b c"] * 10, [0.1] * 10)
    out = paired_deltas(before, after, {"n_resamples": 200})
    assert out["eval/delta/toxic_fraction"] == pytest.approx(-0.5)
    assert out["eval/delta/toxic_fraction_ci_high"] < 0
    assert out["eval/delta/unique_fraction"] == pytest.approx(0.1 - 1.0)
    for name in ("distinct_1", "distinct_2", "response_len_mean", "unique_fraction"):
        assert f"eval/delta/{name}_ci_low" in out, name
    assert out["eval/delta/kl_to_reference"] == pytest.approx(0.3)  # a plain difference


def test_paired_metrics_drive_the_confidence_intervals(tmp_path) -> None:
    """metric_names.PAIRED_METRICS is the list of metrics with a CI: each has a rule, and the
    report gives a CI to those and no others."""
    from detox_exp import metric_names as M
    from detox_exp.evaluation.evaluator import EvalResult
    from detox_exp.evaluation.report import CORPUS, PER_PROMPT, paired_deltas

    assert set(PER_PROMPT) | set(CORPUS) == set(M.PAIRED_METRICS)
    rng = np.random.default_rng(0)
    results = [
        EvalResult(
            phase,
            {f"eval/{phase}/rouge_1": 0.1},
            rng.random((6, 2)),
            rng.random((6, 2)),
            rng.integers(1, 9, (6, 2)).astype(float),
            [{"response": f"w{rng.integers(5)} x{rng.integers(5)}"} for _ in range(12)],
        )
        for phase in ("before", "after")
    ]
    out = paired_deltas(*results, {"n_resamples": 50})
    with_ci = {k[len("eval/delta/") : -len("_ci_low")] for k in out if k.endswith("_ci_low")}
    assert {k for k in with_ci if not k.endswith("_rel")} == set(M.PAIRED_METRICS)
    assert "eval/delta/rouge_1" in out and "eval/delta/rouge_1_ci_low" not in out
