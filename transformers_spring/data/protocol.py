"""The SPRInG temporal protocol: each user's stream cut into consecutive periods, each holding out its latest items."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from transformers.utils import logging

from ..records import Interaction
from ..utils.validation import check_choice, check_float, check_int
from .streams import group_by_user

logger = logging.get_logger(__name__)

SELECTION_STRATEGIES = ("top", "stratified", "random")


@dataclass(frozen=True)
class PeriodSplit:
    """One period of one user's stream.

    Args:
        period (`int`):
            The period index. Period 0 is the initialization period: its `train` items build the user's starting
            state (adapter, memory), and periods 1, 2, ... are the continual updates that follow it in time.
        train (`tuple[Interaction, ...]`):
            The period's earliest items, oldest first.
        test (`tuple[Interaction, ...]`):
            The period's latest items, oldest first; all of them come after every `train` item of the period.
    """

    period: int
    train: tuple[Interaction, ...]
    test: tuple[Interaction, ...]


def _sort_by_time(user_id: str, items: list) -> list:
    stamps = [getattr(item, "timestamp", None) for item in items]
    missing = sum(stamp is None for stamp in stamps)
    if missing == len(items):
        return items  # no clock at all: the stream order is the only order there is
    if missing:
        raise ValueError(
            f"user {user_id!r} has {missing} of {len(items)} interactions without a timestamp; "
            "either all or none of a user's interactions must have one."
        )
    return sorted(items, key=lambda item: item.timestamp)  # stable: equal times keep stream order


def temporal_split(
    interactions: Iterable[Interaction],
    num_periods: int = 5,
    test_fraction: float = 0.1,
    min_items: int | None = None,
    testable: Callable[[Interaction], bool] | None = None,
) -> dict[str, list[PeriodSplit]]:
    """
    Splits every user's stream into `num_periods` consecutive periods and holds out the latest items of each.

    Each user's items are sorted by timestamp (stable, so equal times keep stream order; a user whose items carry no
    timestamps at all keeps stream order), cut into `num_periods` contiguous chunks of near-equal size by count (chunk
    `i` spans `round(i * n / num_periods)` to `round((i + 1) * n / num_periods)`), and within each chunk the latest
    `max(1, round(test_fraction * len(chunk)))` items are the test items and the earlier ones the training items.
    Period 0 is the initialization period; periods 1 and later are the continual updates.

    Args:
        interactions (`Iterable[Interaction]`):
            The stream, any user order.
        num_periods (`int`, *optional*, defaults to 5):
            Periods per user, at least 1.
        test_fraction (`float`, *optional*, defaults to 0.1):
            The share of each period held out for testing, in `[0, 1)`. `0` holds nothing out: every item trains
            (`spring train`).
        min_items (`int`, *optional*):
            Users with fewer items are dropped (one info log line says how many). Defaults to `2 * num_periods`, the
            least that leaves every period one training and one test item (unless `testable` rules some out), and may
            not be set lower; with `test_fraction=0`, to `num_periods` (one training item a period).
        testable (`Callable[[Interaction], bool]`, *optional*):
            Which items may be test items (e.g. not a LaMP-7 tweet, whose input is its own answer). A held-out item
            that may not be tested trains when it comes before the period's first testable held-out item, and is
            dropped when it comes after it, so every test item still comes after every training item; a period can
            then have no test item. Defaults to every item.

    Returns:
        `dict[str, list[PeriodSplit]]`: per user (in order of first appearance), the `num_periods` periods in order.

    Raises:
        `ValueError`: for an invalid argument (named in the message), or for a user with timestamps on only some of
        their items (named in the message).
    """
    check_int(num_periods, "num_periods", minimum=1)
    check_float(test_fraction, "test_fraction", minimum=0.0, maximum=1.0, max_inclusive=False)
    held_out = test_fraction > 0
    least = 2 * num_periods if held_out else num_periods
    if min_items is None:
        min_items = least
    elif check_int(min_items, "min_items", minimum=1) < least:
        what = "one training and one test item" if held_out else "one training item"
        raise ValueError(
            f"`min_items` must be at least {least} ({'2 * ' if held_out else ''}num_periods) so that every period "
            f"keeps {what}, got {min_items}."
        )

    splits: dict[str, list[PeriodSplit]] = {}
    dropped = 0
    for user_id, items in group_by_user(interactions).items():
        if len(items) < min_items:
            dropped += 1
            continue
        items = _sort_by_time(user_id, items)
        n = len(items)
        bounds = [round(i * n / num_periods) for i in range(num_periods + 1)]
        periods = []
        for period in range(num_periods):
            chunk = items[bounds[period] : bounds[period + 1]]
            # min_items >= 2 * num_periods makes every chunk at least 2 long, so one training item always remains
            # (with nothing held out, min_items >= num_periods makes it at least 1 long).
            num_test = min(max(1, round(test_fraction * len(chunk))), len(chunk) - 1) if held_out else 0
            train, test = list(chunk[: len(chunk) - num_test]), list(chunk[len(chunk) - num_test :])
            if testable is not None:
                # Untestable items before the first testable held-out one still train (they precede every test
                # item); those after it are dropped, so that every test item comes after every training item.
                first = next((i for i, item in enumerate(test) if testable(item)), len(test))
                train += test[:first]
                test = [item for item in test[first:] if testable(item)]
            periods.append(PeriodSplit(period, tuple(train), tuple(test)))
        splits[user_id] = periods
    if dropped:
        logger.info(f"temporal_split: dropped {dropped} user(s) with fewer than {min_items} interactions.")
    return splits


def _count(user_id: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"the count for user {user_id!r} must be an int or a list, got bool.")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"the count for user {user_id!r} is negative ({value}).")
        return value
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(period, PeriodSplit) for period in value):
            return sum(len(period.train) + len(period.test) for period in value)
        return len(value)
    raise TypeError(f"the value for user {user_id!r} must be an int or a list, got {type(value).__name__}.")


def select_users(
    splits_or_counts: Mapping[str, int | list],
    n: int,
    strategy: str = "stratified",
    seed: int = 0,
) -> list[str]:
    """
    Picks `n` users for an experiment.

    Users are ranked by item count, most first (ties by user id). `"top"` takes the first `n`; `"stratified"` takes
    the `n` evenly spaced ranks `i * len(users) // n`, so heavy users and light (near cold-start) users are both
    included; `"random"` draws `n` users with `random.Random(seed)`. The first two are deterministic and ignore `seed`.

    Args:
        splits_or_counts (`Mapping[str, int | list]`):
            Per user, an item count, a list of [`PeriodSplit`] (as [`temporal_split`] returns; all their train and
            test items are counted) or a list of interactions (as [`group_by_user`] returns).
        n (`int`):
            How many users to pick, at least 1.
        strategy (`str`, *optional*, defaults to `"stratified"`):
            `"top"`, `"stratified"` or `"random"`.
        seed (`int`, *optional*, defaults to 0):
            The seed of the `"random"` strategy.

    Returns:
        `list[str]`: the user ids, in rank order (most items first).
    """
    check_int(n, "n", minimum=1)
    check_choice(strategy, "strategy", SELECTION_STRATEGIES)
    counts = {user_id: _count(user_id, value) for user_id, value in splits_or_counts.items()}
    if len(counts) < n:
        raise ValueError(f"cannot select n={n} users: only {len(counts)} available.")
    ranked = sorted(counts, key=lambda user_id: (-counts[user_id], user_id))
    if strategy == "top":
        return ranked[:n]
    if strategy == "stratified":
        return [ranked[i * len(ranked) // n] for i in range(n)]
    chosen = set(random.Random(seed).sample(ranked, n))
    return [user_id for user_id in ranked if user_id in chosen]
