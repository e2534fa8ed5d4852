"""What the benchmarks read: the data file in its format, and the users' temporal splits."""

from __future__ import annotations

from pathlib import Path

from ..records import Interaction, is_testable
from .benchmark_config import BenchmarkArguments


def load_interactions(args: BenchmarkArguments) -> list[Interaction]:
    """Reads `args.data` in its format (see [`BenchmarkArguments.data_format`] and [`read_stream`])."""
    from ..data.tasks import read_stream

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"`data` file not found: {args.data}")
    return read_stream(
        args.data, args.data_format, lamp_outputs=args.lamp_outputs, lamp_task=args.lamp_task,
        lamp_queries=bool(args.lamp_queries),
    )  # fmt: skip


def benchmark_splits(args: BenchmarkArguments, items: list[Interaction] | None = None) -> dict[str, list]:
    """Each chosen user's periods (see [`ContinualBenchmark`]'s protocol): the stream (`items`, else read from
    `args.data`) cut into `num_periods` periods with the latest `test_fraction` of each held out, users picked by
    `args.user_selection` on their full counts, then capped to their latest `max_items`."""
    from ..data import group_by_user, select_users, temporal_split

    items = items if items is not None else load_interactions(args)
    least = 2 * args.num_periods  # the fewest items that give every period a training and a held-out item
    # A text-only item (a LaMP-7 tweet) has no input of its own: it trains and is history, and is never tested.
    split = dict(test_fraction=args.test_fraction, testable=is_testable)
    splits = temporal_split(items, args.num_periods, min_items=max(args.min_items, least), **split)
    # Users are picked on their full counts (so "stratified" spans heavy and light users), then capped.
    chosen = select_users(splits, args.users, strategy=args.user_selection, seed=args.seed)
    if args.max_items:  # each chosen user's most recent N items of the raw stream, split again
        streams = group_by_user(items)
        recent = []
        for user in chosen:
            recent += sorted(streams[user], key=lambda it: it.timestamp)[-args.max_items :]
        splits = temporal_split(recent, args.num_periods, min_items=least, **split)
    return {user: splits[user] for user in chosen}
