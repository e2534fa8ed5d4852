"""BM25 scoring over a small corpus, on top of the maintained `rank_bm25` package."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from rank_bm25 import BM25Okapi

_TOKEN_RE = re.compile(r"\w+")
IDF_MODES = ("okapi", "lucene")


def bm25_tokenize(text: str) -> list[str]:
    """Lower-cased word tokens. The LaMP code splits on whitespace; we also drop punctuation so `"fire."` matches
    `"fire"`."""
    return _TOKEN_RE.findall(text.lower())


class _LuceneBM25(BM25Okapi):
    """BM25Okapi with Lucene's always-positive IDF, `log(1 + (N - n + 0.5) / (n + 0.5))`.

    Okapi's IDF is zero or negative for any term found in half the documents or more, so on a 2-item buffer no
    score is ever positive (spring-paper.md, open question 16). Lucene's IDF keeps scores meaningful there.
    """

    def _calc_idf(self, nd):
        for word, freq in nd.items():
            self.idf[word] = math.log(1.0 + (self.corpus_size - freq + 0.5) / (freq + 0.5))
        self.average_idf = sum(self.idf.values()) / max(len(self.idf), 1)


class BM25Index:
    """An immutable BM25 index over `texts` (rebuild it when the corpus changes; it is cheap for buffer-sized
    corpora).

    Args:
        texts (`Sequence[str]`): the documents.
        idf (`str`, *optional*, defaults to `"okapi"`): `"okapi"` (rank_bm25's `BM25Okapi`, as in the paper's RAG
            baseline) or `"lucene"` (always-positive IDF, better for tiny corpora).
    """

    def __init__(self, texts: Sequence[str], idf: str = "okapi"):
        if idf not in IDF_MODES:
            raise ValueError(f"`idf` must be one of {IDF_MODES}, got {idf!r}.")
        self.size = len(texts)
        corpus = [bm25_tokenize(text) for text in texts]
        # rank_bm25 divides by the mean document length: an empty corpus (or one of empty docs) has none.
        self._bm25 = None
        if corpus and any(corpus):
            self._bm25 = (_LuceneBM25 if idf == "lucene" else BM25Okapi)(corpus)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`, shape `(size,)`."""
        if self._bm25 is None:
            return np.zeros(self.size, dtype=np.float64)
        return np.asarray(self._bm25.get_scores(bm25_tokenize(query)), dtype=np.float64)
