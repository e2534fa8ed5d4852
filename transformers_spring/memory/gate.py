"""The relevance gate: which retrieved items are relevant enough to condition on."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence

import numpy as np

from ..utils.validation import check_float


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
            threshold = check_float(threshold, "gate", hint="or 'auto' or None")
        check_float(quantile, "gate_quantile", minimum=0.0, maximum=1.0)
        self.threshold = threshold
        self.quantile = quantile
        self.min_observations = min_observations
        self.window = window
        self._sorted: list[float] = []
        self._order: deque[float] = deque()
        self._owners: deque[str | None] = deque()  # whose query each score came from, so it can be forgotten

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

    def observe(self, scores: Sequence[float], owner: str | None = None) -> None:
        """Adds the scores of one query's hits to the quantile's window.

        Args:
            scores (`Sequence[float]`): the hits' scores (non-finite ones are skipped).
            owner (`str`, *optional*): whose query it was, so that [`forget`] can remove their contributions.
        """
        if not self.is_auto:
            return
        for score in scores:
            score = float(score)
            if not np.isfinite(score):
                continue
            bisect.insort(self._sorted, score)
            self._order.append(score)
            self._owners.append(owner)
            if len(self._order) > self.window:
                oldest = self._order.popleft()
                self._owners.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, oldest)]

    def forget(self, owner: str) -> int:
        """Removes every score `owner`'s queries contributed; returns how many."""
        kept = [(score, who) for score, who in zip(self._order, self._owners, strict=True) if who != owner]
        removed = len(self._order) - len(kept)
        if removed:
            self._order = deque(score for score, _ in kept)
            self._owners = deque(who for _, who in kept)
            self._sorted = sorted(self._order)
        return removed

    @staticmethod
    def passes(score: float, threshold: float | None) -> bool:
        """Eq. 5's test: a hit passes when its score is strictly above the threshold (`None`: gate open)."""
        return threshold is None or score > threshold

    def __call__(self, hits: list, owner: str | None = None) -> tuple[list, float | None]:
        """Gates `hits` (objects with `.score`); returns `(passed, threshold used)` and observes their scores (as
        `owner`'s, see [`observe`])."""
        threshold = self.current_threshold()
        passed = [hit for hit in hits if self.passes(hit.score, threshold)]
        self.observe([hit.score for hit in hits], owner)
        return passed, threshold

    def observed(self) -> np.ndarray:
        """The observed scores in arrival order (persisted so a reloaded gate continues where it stopped)."""
        return np.asarray(self._order, dtype=np.float64)

    def owners(self) -> list[str | None]:
        """Whose query each of [`observed`]'s scores came from (`None`: not recorded)."""
        return list(self._owners)

    def load_observed(self, scores: np.ndarray, owners: Sequence[str | None] | None = None) -> None:
        """Restores [`observed`] (and [`owners`], aligned with it)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        owners = [None] * len(scores) if owners is None else list(owners)
        if len(owners) != len(scores):
            raise ValueError(f"{len(owners)} gate owners for {len(scores)} gate scores.")
        self._sorted, self._order, self._owners = [], deque(), deque()
        for score, owner in zip(scores.tolist(), owners, strict=True):
            self.observe([score], owner)
