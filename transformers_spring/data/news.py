"""The HuffPost News Category dataset (LaMP-4's source) as per-author interaction streams."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from ..records import Interaction
from ..utils.validation import check_int
from .jsonl import jsonl_rows, write_interactions_jsonl
from .streams import group_by_user, user_id_from_name

# Where the project's shared checkout keeps the first 10,000 records (beside the repository).
DEFAULT_NEWS_PATH = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "news-category-v3"
    / "News_Category_Dataset_v3.first10000.jsonl"
)

# A small per-author subset shipped with the package (see resources/ATTRIBUTION.md); read it with
# `read_interactions_jsonl`.
NEWS_SUBSET_PATH = Path(__file__).resolve().parent / "resources" / "news_subset.jsonl"


def read_news_jsonl(path: str | Path = DEFAULT_NEWS_PATH, min_items: int = 1) -> list[Interaction]:
    """Reads News Category JSON Lines as interactions: user = `authors`, prompt = `short_description`,
    response = `headline`, timestamp = `date`. Records without an author or text are skipped. User ids hold no path
    separator, so a `/` or `\\` in an author string (`"Rebecca Rubin, Reuters/Variety"`) becomes `|`.

    Args:
        path (`str` or `Path`): the `.jsonl` file (one news item per line).
        min_items (`int`, *optional*, defaults to 1): keep only authors with at least this many items.

    Returns:
        `list[Interaction]`, oldest first (ties keep file order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"news file not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, row in jsonl_rows(f, path):
            author = user_id_from_name(row.get("authors") or "")
            prompt, response = (row.get("short_description") or "").strip(), (row.get("headline") or "").strip()
            if not author or not prompt or not response:
                continue
            items.append(
                Interaction(
                    author,
                    prompt,
                    response,
                    timestamp=row["date"],
                    metadata={"category": row.get("category"), "link": row.get("link")},
                    id=f"news-{number}",
                )
            )
    counts: dict[str, int] = {}
    for item in items:
        counts[item.user_id] = counts.get(item.user_id, 0) + 1
    items = [item for item in items if counts[item.user_id] >= min_items]
    return sorted(items, key=lambda item: item.timestamp)


def convert_news_category(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    authors: Sequence[str] | None = None,
    min_items: int = 1,
    max_items_per_author: int | None = None,
    metadata_keys: Sequence[str] | None = None,
) -> int:
    """
    Converts News Category JSON Lines (read by [`read_news_jsonl`]) into an interaction JSONL file (written by
    [`write_interactions_jsonl`], read back by [`read_interactions_jsonl`]), oldest first.

    Args:
        source (`str` or `os.PathLike`):
            The News Category `.jsonl` file.
        destination (`str` or `os.PathLike`):
            The interaction `.jsonl` file to (over)write atomically.
        authors (`Sequence[str]`, *optional*):
            Keep only these authors (exact `authors` strings); each must have at least `min_items` items in
            `source`. All authors when not given.
        min_items (`int`, *optional*, defaults to 1):
            Keep only authors with at least this many items in `source` (counted before `max_items_per_author`).
        max_items_per_author (`int`, *optional*):
            Keep only each author's most recent items, at most this many.
        metadata_keys (`Sequence[str]`, *optional*):
            The metadata to keep (of `"category"` and `"link"`); all of it when not given.

    Returns:
        `int`: the number of interactions written.
    """
    if isinstance(authors, str):  # a str is a Sequence too, of one-letter "authors"
        raise TypeError("`authors` must be a sequence of author names, not a single str.")
    check_int(max_items_per_author, "max_items_per_author", minimum=1, optional=True)
    stream = read_news_jsonl(source, min_items=min_items)
    by_author = group_by_user(stream)
    if authors is not None:
        missing = [author for author in authors if author not in by_author]
        if missing:
            raise ValueError(f"author(s) {missing} have fewer than `min_items`={min_items} items in {source}.")
        by_author = {author: by_author[author] for author in authors}
    chosen = set()
    for items in by_author.values():  # each list is oldest first, so the tail is the most recent
        chosen.update(map(id, items if max_items_per_author is None else items[-max_items_per_author:]))
    keep = [item for item in stream if id(item) in chosen]  # one stream again, oldest first
    if metadata_keys is not None:  # interactions are immutable: filtered copies
        keep = [
            dataclasses.replace(item, metadata={k: v for k, v in item.metadata.items() if k in metadata_keys})
            for item in keep
        ]
    return write_interactions_jsonl(keep, destination)
