"""The SPRInG temporal protocol: temporal_split and select_users."""

import itertools
import logging

import pytest

from transformers_spring.data import PeriodSplit, select_users, temporal_split
from transformers_spring.memory import Interaction


def stream(user, n, start=0):
    # Timestamps run upward with the index; the stream is given newest first to check the sort.
    return [Interaction(user, f"p{i}", f"r{i}", timestamp=1_000_000 + 86_400 * i, id=f"{user}-{i}") for i in range(n)][
        ::-1
    ][start:]


def indices(items):
    return [int(item.id.split("-")[1]) for item in items]


def test_periods_are_contiguous_and_ordered():
    splits = temporal_split(stream("a", 50), num_periods=5, test_fraction=0.1)
    periods = splits["a"]
    assert [p.period for p in periods] == [0, 1, 2, 3, 4]
    assert all(isinstance(p, PeriodSplit) for p in periods)
    # 50 items: 10 per period, the latest round(0.1 * 10) = 1 held out.
    assert [(len(p.train), len(p.test)) for p in periods] == [(9, 1)] * 5
    order = [i for p in periods for i in indices(p.train) + indices(p.test)]
    assert order == list(range(50))
    assert indices(periods[0].train) == list(range(9)) and indices(periods[0].test) == [9]
    assert isinstance(periods[0].train, tuple)


def test_test_items_are_the_latest_ten_percent_of_each_period():
    periods = temporal_split(stream("a", 200), num_periods=4, test_fraction=0.1)["a"]
    for p in periods:  # 50 per period: 5 test items, all later than every training item
        assert len(p.test) == 5 and len(p.train) == 45
        assert max(item.timestamp for item in p.train) < min(item.timestamp for item in p.test)


def test_near_equal_chunks_use_rounded_bounds():
    periods = temporal_split(stream("a", 23), num_periods=5)["a"]
    sizes = [len(p.train) + len(p.test) for p in periods]
    bounds = [round(i * 23 / 5) for i in range(6)]
    assert sizes == [b - a for a, b in itertools.pairwise(bounds)]
    assert all(len(p.test) == 1 and len(p.train) >= 1 for p in periods)


def test_min_items_drops_small_users_with_one_log_line(caplog):
    items = stream("big", 12) + stream("small", 9) + stream("tiny", 3)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO, logger="transformers_spring.data.protocol"):
            splits = temporal_split(items, num_periods=5)
    finally:
        hf_logging.disable_propagation()
    assert list(splits) == ["big"]  # default min_items = 2 * num_periods = 10
    messages = [r.getMessage() for r in caplog.records if r.name == "transformers_spring.data.protocol"]
    assert len(messages) == 1 and "dropped 2 user" in messages[0]
    assert list(temporal_split(items, num_periods=5, min_items=12)) == ["big"]
    assert list(temporal_split(items, num_periods=4)) == ["big", "small"]


def test_users_keep_first_appearance_order():
    items = stream("b", 10)[:5] + stream("a", 10) + stream("b", 10)[5:]
    assert list(temporal_split(items, num_periods=2)) == ["b", "a"]


def test_equal_timestamps_keep_stream_order():
    items = [Interaction("u", f"p{i}", "r", timestamp=5.0, id=f"u-{i}") for i in range(10)]
    periods = temporal_split(items, num_periods=2)["u"]
    assert [i for p in periods for i in indices(p.train) + indices(p.test)] == list(range(10))


def test_missing_timestamps():
    untimed = stream("u", 10)
    for item in untimed:  # records from elsewhere may carry no time (Interaction itself always sets one)
        object.__setattr__(item, "timestamp", None)
    periods = temporal_split(untimed, num_periods=2)["u"]
    assert [i for p in periods for i in indices(p.train) + indices(p.test)] == list(range(9, -1, -1))
    mixed = stream("mixed", 10)
    object.__setattr__(mixed[3], "timestamp", None)
    with pytest.raises(ValueError, match="'mixed'"):
        temporal_split(mixed, num_periods=2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_periods": 0}, "num_periods"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.5}, "test_fraction"),
        ({"min_items": 3}, "min_items"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        temporal_split(stream("a", 20), **kwargs)


def test_nothing_held_out_trains_every_item():
    # `spring train` holds nothing out: every item trains, periods stay consecutive and time-ordered.
    splits = temporal_split(stream("a", 11) + stream("b", 2), num_periods=3, test_fraction=0.0)
    assert list(splits) == ["a"]  # "b" has fewer than num_periods items
    periods = splits["a"]
    assert [indices(p.train) for p in periods] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]
    assert all(p.test == () for p in periods)
    with pytest.raises(ValueError, match="min_items"):
        temporal_split(stream("a", 11), num_periods=3, test_fraction=0.0, min_items=2)


def test_single_period():
    (period,) = temporal_split(stream("a", 10), num_periods=1, test_fraction=0.3)["a"]
    assert period.period == 0 and indices(period.test) == [7, 8, 9]


COUNTS = {"a": 50, "b": 40, "c": 40, "d": 30, "e": 20, "f": 10, "g": 5, "h": 1}


def test_select_top_breaks_ties_by_name():
    assert select_users(COUNTS, 3, strategy="top") == ["a", "b", "c"]
    assert select_users({"y": 2, "x": 2, "z": 3}, 2, strategy="top") == ["z", "x"]


def test_select_stratified_spans_heavy_and_light_users():
    assert select_users(COUNTS, 4) == ["a", "c", "e", "g"]  # ranks 0, 2, 4, 6 of 8
    assert select_users(COUNTS, 3) == ["a", "c", "f"]  # ranks 0, 2, 5
    assert select_users(COUNTS, 8) == list(COUNTS)
    assert select_users(COUNTS, 4) == select_users(COUNTS, 4, seed=123)  # deterministic


def test_select_accepts_splits_and_lists():
    splits = temporal_split(stream("a", 30) + stream("b", 10) + stream("c", 20), num_periods=5)
    assert select_users(splits, 3, strategy="top") == ["a", "c", "b"]
    assert select_users({"a": [1, 2], "b": [1, 2, 3]}, 1, strategy="top") == ["b"]


def test_select_random_is_seeded():
    first = select_users(COUNTS, 3, strategy="random", seed=1)
    assert first == select_users(COUNTS, 3, strategy="random", seed=1)
    assert len(set(first)) == 3


def test_select_errors():
    with pytest.raises(ValueError, match="only 8 available"):
        select_users(COUNTS, 9)
    with pytest.raises(ValueError, match="strategy"):
        select_users(COUNTS, 2, strategy="best")
    with pytest.raises(ValueError, match="`n`"):
        select_users(COUNTS, 0)


def test_testable_items_are_the_only_test_items_and_time_order_holds():
    """Untestable held-out items (text-only LaMP-7 tweets) before the first testable one train; after it they are
    dropped; every test item comes after every training item; a period may have no test item."""
    testable = {3, 4, 9, 19}
    items = [Interaction("u", f"p{i}", f"r{i}", timestamp=float(i), id=f"i{i}",
                         metadata={} if i in testable else {"text_only": True}) for i in range(20)]  # fmt: skip
    # 4 chunks of 5, the latest 2 of each held out.
    periods = temporal_split(items, num_periods=4, test_fraction=0.4, testable=lambda it: not it.metadata)["u"]
    assert [[it.id for it in p.test] for p in periods] == [["i3", "i4"], ["i9"], [], ["i19"]]
    assert [len(p.train) for p in periods] == [3, 4, 5, 4]  # i8 (before i9) and i18 (before i19) train
    assert periods[1].train[-1].id == "i8" and periods[2].train[-1].id == "i14"
    for p in periods:
        assert all(t.timestamp > it.timestamp for t in p.test for it in p.train)
    mixed = [Interaction("u", f"p{i}", f"r{i}", timestamp=float(i), id=f"m{i}",
                         metadata={} if i in (3, 8) else {"text_only": True}) for i in range(10)]  # fmt: skip
    first, second = temporal_split(mixed, num_periods=2, test_fraction=0.4, testable=lambda it: not it.metadata)["u"]
    assert [it.id for it in first.test] == ["m3"] and "m4" not in {it.id for it in first.train}  # m4 after m3: dropped
    assert [it.id for it in second.test] == ["m8"] and second.train[-1].id == "m7"
