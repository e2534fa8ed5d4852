"""The relevance gate: which retrieved items are relevant enough to condition on."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence

import numpy as np


class RelevanceGate:
    """Passes hits whose score is strictly above a threshold.

    - `threshold=None`: no gate, every hit passes.
    - `threshold=<float>`: an absolute threshold (in the scorer's units: cosine for dense, BM25 for `"bm25"`).
    - `threshold="auto"`: an **online** quantile (`quantile`, default the third quartile as in the paper) of the
      scores seen so far. Each query is gated with the threshold computed *before* its own scores are observed, so
      there is no look-ahead over future queries (the paper calibrates σ offline over all test queries). Until
      `min_observations` scores have been seen the gate stays open. Only the most recent `window` scores count,
      so the threshold follows a drifting score distribution.

    Args:
        threshold (`float`, `"auto"` or `None`, *optional*, defaults to `"auto"`).
        quantile (`float`, *optional*, defaults to 0.75).
        min_observations (`int`, *optional*, defaults to 10).
        window (`int`, *optional*, defaults to 100000).
    """

    def __init__(
        self,
        threshold: float | str | None = "auto",
        quantile: float = 0.75,
        min_observations: int = 10,
        window: int = 100_000,
    ):
        if threshold is not None and threshold != "auto":
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
                raise ValueError(f"`gate` must be a finite number, 'auto' or None, got {threshold!r}.")
            threshold = float(threshold)
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"`gate_quantile` must be in [0, 1], got {quantile}.")
        self.threshold = threshold
        self.quantile = quantile
        self.min_observations = min_observations
        self.window = window
        self._sorted: list[float] = []
        self._order: deque[float] = deque()

    @property
    def is_auto(self) -> bool:
        return self.threshold == "auto"

    def current_threshold(self) -> float | None:
        """The threshold the next query will be gated with (`None`: gate open)."""
        if not self.is_auto:
            return self.threshold
        n = len(self._sorted)
        if n < self.min_observations:
            return None
        # Linear interpolation between order statistics, as numpy.quantile's default.
        position = self.quantile * (n - 1)
        low = int(np.floor(position))
        high = min(low + 1, n - 1)
        return self._sorted[low] + (self._sorted[high] - self._sorted[low]) * (position - low)

    def observe(self, scores: Sequence[float]) -> None:
        if not self.is_auto:
            return
        for score in scores:
            score = float(score)
            if not np.isfinite(score):
                continue
            bisect.insort(self._sorted, score)
            self._order.append(score)
            if len(self._order) > self.window:
                oldest = self._order.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, oldest)]

    @staticmethod
    def passes(score: float, threshold: float | None) -> bool:
        """Eq. 5's test: a hit passes when its score is strictly above the threshold (`None`: gate open)."""
        return threshold is None or score > threshold

    def __call__(self, hits: list) -> tuple[list, float | None]:
        """Gates `hits` (objects with `.score`); returns `(passed, threshold used)` and observes their scores."""
        threshold = self.current_threshold()
        passed = [hit for hit in hits if self.passes(hit.score, threshold)]
        self.observe([hit.score for hit in hits])
        return passed, threshold

    def observed(self) -> np.ndarray:
        """The observed scores in arrival order (persisted so a reloaded gate continues where it stopped)."""
        return np.asarray(self._order, dtype=np.float64)

    def load_observed(self, scores: np.ndarray) -> None:
        self._sorted, self._order = [], deque()
        self.observe(np.asarray(scores, dtype=np.float64).tolist())
