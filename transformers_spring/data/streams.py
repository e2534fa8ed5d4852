"""Per-user views of an interaction stream."""

from __future__ import annotations

from collections.abc import Iterable

from ..records import Interaction


def group_by_user(interactions: Iterable[Interaction], newest_first: bool = False) -> dict[str, list[Interaction]]:
    """Each user's interactions, users in order of first appearance, each list in stream order (reversed with
    `newest_first`; [`read_news_jsonl`] returns the stream oldest first).

    Args:
        interactions (`Iterable[Interaction]`): the stream.
        newest_first (`bool`, *optional*, defaults to `False`): reverse each user's list.
    """
    by_user: dict[str, list[Interaction]] = {}
    for item in interactions:
        by_user.setdefault(item.user_id, []).append(item)
    if newest_first:
        for items in by_user.values():
            items.reverse()
    return by_user


def user_id_from_name(name: str) -> str:
    """A user id from a name in a dataset (an author, a reviewer): stripped, with `/` and `\\` written as `|`, since
    user ids hold no path separator (`"Rebecca Rubin, Reuters/Variety"` -> `"Rebecca Rubin, Reuters|Variety"`)."""
    return name.strip().replace("/", "|").replace("\\", "|")
