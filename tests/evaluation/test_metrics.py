import math

import pytest

from transformers_spring.evaluation import mean_rouge, rouge_scores
from transformers_spring.evaluation.metrics import paired_bootstrap


def test_rouge_matches_a_hand_computation():
    # 2 of 3 unigrams shared both ways: P = R = F = 2/3; the LCS ("the cat") has 2 tokens, so ROUGE-L is 2/3 too.
    (score,) = rouge_scores(["the cat ran"], ["the cat sat"])
    assert score["rouge1"] == pytest.approx(2 / 3)
    assert score["rougeL"] == pytest.approx(2 / 3)
    # Unigram overlap without order: "b a" vs "a b" has R-1 = 1 but an LCS of 1 token (R-L = 1/2).
    (score,) = rouge_scores(["b a"], ["a b"])
    assert score["rouge1"] == pytest.approx(1.0)
    assert score["rougeL"] == pytest.approx(0.5)


def test_main_columns_are_unstemmed_like_lamp_and_stemmed_rouge_l_is_extra():
    """LaMP's evaluation does not stem: "Running CATS" shares no unigram with "run cat"; stemmed, all of them."""
    (score,) = rouge_scores(["Running CATS"], ["run cat"])
    assert score == {"rouge1": 0.0, "rougeL": 0.0, "rougeL_stemmed": pytest.approx(1.0)}
    (score,) = rouge_scores(["The CAT"], ["the cat"])  # case is ignored either way
    assert score == {"rouge1": pytest.approx(1.0), "rougeL": pytest.approx(1.0), "rougeL_stemmed": pytest.approx(1.0)}


def test_rouge_empty_prediction_scores_zero():
    assert rouge_scores([""], ["a headline"]) == [{"rouge1": 0.0, "rougeL": 0.0, "rougeL_stemmed": 0.0}]


def test_paired_bootstrap_interval():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]  # a - b is 1 on every item: no spread
    assert paired_bootstrap(a, b) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 4}
    result = paired_bootstrap([1.0, 0.0] * 50, [0.0, 1.0] * 50, samples=2000)
    assert result["mean"] == 0.0 and result["low"] < 0 < result["high"]
    assert math.isnan(paired_bootstrap([], [])["mean"])
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [])


def test_mean_rouge_is_the_per_sample_mean():
    scores = rouge_scores(["the cat ran", "a dog"], ["the cat sat", "a dog"])
    assert mean_rouge(scores)["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert all(math.isnan(v) for v in mean_rouge([]).values())


def test_rouge_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="sequences of strings"):
        rouge_scores("a", "a")
