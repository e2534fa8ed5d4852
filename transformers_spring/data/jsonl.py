"""Interaction streams as JSON Lines: one interaction per line, written atomically and read back losslessly."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..persistence.atomic import atomic_write_text
from ..records import Interaction

# The order keys are written in; the reader's defaults read these names.
JSONL_FIELDS = ("user_id", "prompt", "response", "timestamp", "id", "metadata")


def _reject_constant(name: str):
    # JSON has no NaN or Infinity; Python's json module accepts them unless told not to.
    raise ValueError(f"{name} is not valid JSON")


def jsonl_rows(lines: Iterable[str], where: str | os.PathLike, strict: bool = False) -> Iterator[tuple[int, Any]]:
    """The parsed rows of JSON Lines text with their 1-based line numbers, blank lines skipped; a line that is not
    JSON raises `ValueError("<where>, line <n>: not valid JSON (...)")`. `strict` also refuses NaN and Infinity, which
    Python's json module accepts but JSON does not have."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line, parse_constant=_reject_constant if strict else None)
        except ValueError as err:  # JSONDecodeError is a ValueError; so is the NaN refusal
            raise ValueError(f"{where}, line {number}: not valid JSON ({err}).") from err


def _interaction_from_row(row, path: Path, number: int, fields: dict[str, str | None]) -> Interaction:
    where = f"{path}, line {number}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    values = {}
    for attribute in ("user_id", "prompt", "response", "timestamp"):
        field = fields[attribute]
        if field is None:
            continue
        if row.get(field) is None:
            hint = " (pass `timestamp_field=None` to use line order instead)" if attribute == "timestamp" else ""
            raise ValueError(f"{where}: missing field {field!r}{hint}.")
        values[attribute] = row[field]
    if fields["timestamp"] is None:
        values["timestamp"] = float(number)  # line numbers keep the file order through any later stable sort
    for attribute in ("id", "metadata"):
        field = fields[attribute]
        if field is not None and row.get(field) is not None:
            values[attribute] = row[field]
    if values.get("id") is None:
        values["id"] = f"{path.stem}-{number}"  # deterministic, unlike Interaction's random default
    for attribute in ("user_id", "id"):  # numeric ids are common in exported data; compare as strings
        if isinstance(values[attribute], int) and not isinstance(values[attribute], bool):
            values[attribute] = str(values[attribute])
    try:
        return Interaction(**values)
    except (TypeError, ValueError) as err:
        message = str(err)
        for attribute, field in fields.items():
            if field is not None and f"`{attribute}`" in message:
                raise ValueError(f"{where}: invalid field {field!r}: {message}") from err
        raise ValueError(f"{where}: {message}") from err


def read_interactions_jsonl(
    path: str | os.PathLike,
    *,
    user_field: str = "user_id",
    prompt_field: str = "prompt",
    response_field: str = "response",
    timestamp_field: str | None = "timestamp",
    id_field: str | None = "id",
    metadata_field: str | None = "metadata",
) -> list[Interaction]:
    """
    Reads a JSON Lines file of interactions, one JSON object per line (blank lines are skipped), such as
    [`write_interactions_jsonl`] writes. Only JSON is parsed: nothing in the file is evaluated or unpickled.

    Args:
        path (`str` or `os.PathLike`):
            The `.jsonl` file (UTF-8).
        user_field (`str`, *optional*, defaults to `"user_id"`):
            The key holding the user id (a string, or an integer read as its decimal string).
        prompt_field (`str`, *optional*, defaults to `"prompt"`):
            The key holding the prompt.
        response_field (`str`, *optional*, defaults to `"response"`):
            The key holding the response.
        timestamp_field (`str`, *optional*, defaults to `"timestamp"`):
            The key holding the time (POSIX seconds or an ISO-8601 string); required on every line. With `None`,
            no time is read and each interaction's timestamp is its line number, which keeps the file order.
        id_field (`str`, *optional*, defaults to `"id"`):
            The key holding the interaction id; where it is absent (or `None`), the id is `"<file stem>-<line>"`.
        metadata_field (`str`, *optional*, defaults to `"metadata"`):
            The key holding a JSON object of extras; absent means `{}`. `None` reads no metadata.

    Returns:
        `list[Interaction]`, oldest first (equal times keep file order).

    Raises:
        `FileNotFoundError`: if `path` is not a file.
        `ValueError`: for a line that is not a JSON object, has a missing or invalid field, or repeats an id of the
        same user; the message names the file, the line number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interaction file not found: {path}")
    fields = {
        "user_id": user_field,
        "prompt": prompt_field,
        "response": response_field,
        "timestamp": timestamp_field,
        "id": id_field,
        "metadata": metadata_field,
    }
    for attribute in ("user_id", "prompt", "response"):
        if not isinstance(fields[attribute], str) or not fields[attribute]:
            raise ValueError(f"`{attribute.replace('user_id', 'user')}_field` must be a non-empty str.")
    items, first_line = [], {}
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark some editors add
        for number, row in jsonl_rows(f, path, strict=True):
            item = _interaction_from_row(row, path, number, fields)
            # A user's ids are unique (memories and trainers key records by them): refused here, by line, before
            # anything downstream has stored half of the stream.
            earlier = first_line.setdefault((item.user_id, item.id), number)
            if earlier != number:
                raise ValueError(
                    f"{path}, line {number}: field {fields['id'] or 'id'!r} {item.id!r} repeats line {earlier} "
                    f"(user {item.user_id!r}); a user's ids must be unique."
                )
            items.append(item)
    return sorted(items, key=lambda item: item.timestamp)


def write_interactions_jsonl(interactions: Iterable[Interaction], path: str | os.PathLike) -> int:
    """
    Writes interactions as UTF-8 JSON Lines, one object per line with the keys `user_id`, `prompt`, `response`,
    `timestamp` (POSIX seconds), `id` and `metadata`, in the given order. The file is written to a temporary sibling
    and then moved over `path` with `os.replace`, so readers see either the old file or the complete new one, and a
    failure leaves no partial file behind. [`read_interactions_jsonl`] reads it back unchanged.

    Args:
        interactions (`Iterable[Interaction]`):
            What to write.
        path (`str` or `os.PathLike`):
            The destination; missing parent directories are created.

    Returns:
        `int`: the number of interactions written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in interactions:
        if not isinstance(item, Interaction):
            raise TypeError(f"expected Interaction objects, got {type(item).__name__}.")
        fields = item.to_dict()
        row = {key: fields[key] for key in JSONL_FIELDS}
        lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(path, "".join(lines))
    return len(lines)
