import numpy as np
import pytest

from transformers_spring.utils.ranking import top_k_candidates, top_k_indices


@pytest.mark.parametrize("n, k", [(5, 10), (100, 3), (5000, 10), (5003, 1), (10_000, 64)])
def test_top_k_candidates_keeps_every_top_entry_and_ties(n, k):
    rng = np.random.default_rng(n + k)
    scores = np.round(rng.normal(size=n), 2)  # rounding makes ties
    kth = np.sort(scores)[::-1][min(k, n) - 1]
    assert set(top_k_candidates(scores, k)) >= set(np.flatnonzero(scores >= kth))
    np.testing.assert_array_equal(top_k_indices(scores, k), np.argsort(-scores, kind="stable")[:k])


def test_ties_first_or_last_match_a_sort():
    scores = [1.0, 3.0, 2.0, 3.0, 2.0, 0.5]
    assert top_k_indices(scores, 4).tolist() == sorted(range(6), key=lambda i: (-scores[i], i))[:4]
    assert top_k_indices(scores, 4, ties="last").tolist() == sorted(range(6), key=lambda i: (-scores[i], -i))[:4]
    assert top_k_indices(scores, 0).tolist() == [] and top_k_indices([], 3).tolist() == []
    assert top_k_indices(scores, 99).tolist() == [1, 3, 2, 4, 0, 5]
    with pytest.raises(ValueError, match="ties"):
        top_k_indices(scores, 2, ties="latest")


def test_nan_ranks_last_and_every_k_is_returned():
    scores = [np.nan, 1.0, 2.0, np.nan]
    assert top_k_indices(scores, 1).tolist() == [2]
    assert top_k_indices(scores, 3).tolist() == [2, 1, 0]
    assert top_k_indices(scores, 3, ties="last").tolist() == [2, 1, 3]
    big = np.full(10_000, np.nan)
    big[[5, 9000]] = [0.5, 0.7]
    assert top_k_indices(big, 2).tolist() == [9000, 5]
    assert top_k_candidates(np.ones(5), 0).tolist() == []


@pytest.mark.parametrize("n, k", [(5000, 10), (10_000, 64)])
def test_ties_last_on_the_block_maxima_path(n, k):
    rng = np.random.default_rng(n)
    scores = np.round(rng.normal(size=n), 1).astype(np.float32)  # many ties, float32 kept
    expected = sorted(range(n), key=lambda i: (-float(scores[i]), -i))[:k]
    assert top_k_indices(scores, k, ties="last").tolist() == expected
