import numpy as np
import pytest

from transformers_spring.memory import RelevanceGate, RetrievedItem
from transformers_spring.records import Interaction


def hits(*scores):
    return [RetrievedItem(Interaction("u", "q", "a", id=str(i)), s, "local") for i, s in enumerate(scores)]


def test_absolute_and_none():
    passed, threshold = RelevanceGate(0.5)(hits(0.4, 0.5, 0.6))
    assert [h.score for h in passed] == [0.6] and threshold == 0.5
    assert len(RelevanceGate(None)(hits(-1.0, 0.0))[0]) == 2
    with pytest.raises(ValueError, match="gate"):
        RelevanceGate(float("nan"))


def test_auto_uses_only_past_scores():
    rng = np.random.default_rng(0)
    gate = RelevanceGate("auto", quantile=0.75, min_observations=5)
    seen = []
    for _ in range(40):
        scores = rng.normal(size=2).tolist()
        passed, threshold = gate(hits(*scores))
        if len(seen) < 5:
            assert threshold is None and len(passed) == 2  # warm-up: open
        else:
            assert threshold == pytest.approx(np.quantile(seen, 0.75))  # no look-ahead: the query's own excluded
            assert [h.score for h in passed] == [s for s in scores if s > threshold]
        seen.extend(scores)


def test_window_and_reload():
    gate = RelevanceGate("auto", min_observations=1, window=3)
    gate.observe([1.0, 2.0, 3.0, 4.0])
    assert gate.observed().tolist() == [2.0, 3.0, 4.0]
    again = RelevanceGate("auto", min_observations=1, window=3)
    again.load_observed(gate.observed())
    assert again.current_threshold() == gate.current_threshold()
