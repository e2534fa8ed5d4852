"""The one top-k helper: memory search, drift selection, the residual buffer and the benchmark's retrieval all rank
with it, so they agree on ties."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of a small superset of the top-`k` scores: every score tied with or above the k-th largest.

    The k-th largest of the per-block maxima is a lower bound on the k-th largest score (those maxima are k
    distinct entries), and is much cheaper than a partition of the whole array; filtering by it keeps every
    top-k entry and its ties.
    """
    n = scores.shape[0]
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    blocks = max(4 * k, 64)
    if n >= 4 * blocks:
        maxima = scores[: n - n % blocks].reshape(blocks, -1).max(axis=1)
        bound = np.partition(maxima, blocks - k)[blocks - k]
    else:
        bound = np.partition(scores, n - k)[n - k]
    return np.flatnonzero(scores >= bound)


def top_k_indices(scores: np.ndarray | Sequence[float], k: int, ties: str = "first") -> np.ndarray:
    """Indices of the `k` largest scores, best first.

    Args:
        scores (`np.ndarray` or `Sequence[float]`): one score per candidate; NaN ranks below every number.
        k (`int`): how many to return (fewer when there are fewer candidates; none for `k <= 0`).
        ties (`str`, *optional*, defaults to `"first"`): which of equal scores ranks higher: `"first"` (the earlier
            index: drift selection, memory search) or `"last"` (the later index: the more recent of time-ordered
            candidates, as the benchmark's RAG takes).
    """
    if ties not in ("first", "last"):
        raise ValueError(f"`ties` must be 'first' or 'last', got {ties!r}.")
    scores = np.asarray(scores).reshape(-1)
    if not np.issubdtype(scores.dtype, np.floating):  # float32 cosines stay as they are: no copy per search
        scores = scores.astype(np.float64)
    if k <= 0 or scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    nan = np.isnan(scores)
    if nan.any():  # np.partition would rank NaN highest and drop real scores
        scores = np.where(nan, -np.inf, scores)
    if ties == "last":  # rank the reversed array with earlier-first ties, then map back
        reversed_best = top_k_indices(scores[::-1].copy(), k, ties="first")
        return scores.size - 1 - reversed_best
    candidates = top_k_candidates(scores, k)
    return candidates[np.argsort(-scores[candidates], kind="stable")][:k]
