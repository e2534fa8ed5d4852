"""`bm25_tokenize` and `BM25Index`: rank_bm25's Okapi scores, Lucene's always-positive IDF, empty corpora."""

import math

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from transformers_spring.memory.bm25 import IDF_MODES, BM25Index, bm25_tokenize

DOCS = ["The fire spread fast.", "Cats and dogs", "A fire near the cats' home", "rain rain rain", "sun", "vote"]


def test_tokenize_lowercases_and_drops_punctuation():
    assert bm25_tokenize("Fire. FIRE, fire!") == ["fire", "fire", "fire"]
    assert bm25_tokenize("cats' home-run 2024") == ["cats", "home", "run", "2024"]
    assert bm25_tokenize("  ...  ") == []


def test_okapi_scores_are_rank_bm25s():
    index = BM25Index(DOCS)
    scores = index.scores("fire cats")
    assert scores.shape == (6,) and scores.dtype == np.float64
    expected = BM25Okapi([bm25_tokenize(d) for d in DOCS]).get_scores(["fire", "cats"])
    np.testing.assert_allclose(scores, expected)
    assert int(np.argmax(scores)) == 2  # the only document with both words
    assert scores[0] > 0 and scores[1] > 0 and scores[3] == 0.0  # one word each; no query word


def test_lucene_idf_stays_positive_on_a_tiny_corpus():
    docs = ["fire truck", "fire alarm"]
    okapi = BM25Index(docs).scores("fire")
    lucene = BM25Index(docs, idf="lucene").scores("fire")
    assert (okapi <= 0).all()  # a word in half the documents or more has no positive Okapi IDF
    assert (lucene > 0).all() and lucene[0] == pytest.approx(lucene[1])
    idf = math.log(1 + (2 - 2 + 0.5) / (2 + 0.5))
    # BM25 with k1 = 1.5, b = 0.75 on equal-length documents: idf * tf * (k1 + 1) / (tf + k1)
    assert lucene[0] == pytest.approx(idf * 1 * 2.5 / (1 + 1.5))


@pytest.mark.parametrize("docs", [[], ["", "..."]])
def test_empty_corpus_scores_zero(docs):
    index = BM25Index(docs)
    assert index.size == len(docs)
    assert index.scores("fire").tolist() == [0.0] * len(docs)


def test_bad_idf_is_named():
    assert IDF_MODES == ("okapi", "lucene")
    with pytest.raises(ValueError, match="`idf`"):
        BM25Index(DOCS, idf="tfidf")
