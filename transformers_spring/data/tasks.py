"""Task presets (what a task fixes: the reader, the user message, how a history item is written) and the one reader
of a user stream in any supported format, shared by `spring train`, `spring bench` and `spring demo`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..records import Interaction

DATA_FORMATS = ("auto", "news", "jsonl", "lamp")

NEWS_PROMPT = "Write a headline for this news article: {prompt}"
# LaMP-4's retrieval-augmented prompt (Salemi et al., 2023) renders each profile item as `"<title>" is the title for
# "<text>"`: labelled pairs, so a small model reads them as examples instead of continuing the last article.
NEWS_HISTORY_ITEM = '"{response}" is the headline for "{prompt}"'


@dataclass(frozen=True)
class TaskPreset:
    """What a task fixes for `spring bench` and `spring train`: the data reader, the user message, how a retrieved
    history item is written into the history path's prompt, and whether decoding stops at the end of the first line.

    Args:
        prompt_template (`str`): the user message, with `{prompt}`.
        history_item_template (`str`): one retrieved item; `{response}` and optionally `{prompt}`. Tasks whose
            profile items hold only text (LaMP-7) use `{response}` alone.
        stop_at_newline (`bool`): one-line outputs (headlines, tweets) stop at the line end; long-form ones don't.
        data_format (`str`): the reader (`"news"`, `"lamp"`, ...).
        lamp_task (`str` or `None`): the LaMP / LongLaMP task the reader maps profile items with.
        lamp_queries (`bool`): also read each LaMP question (its input and gold output) as the user's latest item.
            LaMP-7 needs it: its profile tweets hold no input of their own, so its questions are the only test items.
    """

    prompt_template: str
    history_item_template: str
    stop_at_newline: bool
    data_format: str = "auto"
    lamp_task: str | None = None
    lamp_queries: bool = False


# The instructions follow each benchmark's own question wording (LaMP: Salemi et al., 2023; LongLaMP: Kumar et al.,
# 2024), with the item's input in `{prompt}`.
PRESETS: dict[str, TaskPreset] = {
    "news": TaskPreset(NEWS_PROMPT, NEWS_HISTORY_ITEM, True, "auto"),
    "LaMP_4": TaskPreset(
        "Generate a headline for the following article: {prompt}", '"{response}" is the title for "{prompt}"', True,
        "lamp", "LaMP_4",
    ),
    "LaMP_5": TaskPreset(
        "Generate a title for the following abstract of a paper: {prompt}", '"{response}" is the title for "{prompt}"',
        True, "lamp", "LaMP_5",
    ),
    "LaMP_7": TaskPreset(
        "Paraphrase the following tweet without any explanation before or after it: {prompt}", '"{response}"', True,
        "lamp", "LaMP_7", True,
    ),
    "abstract_generation": TaskPreset(
        'Generate an abstract for the title "{prompt}".', '"{response}" is the abstract for the title "{prompt}"',
        False, "lamp", "abstract_generation",
    ),
    "topic_writing": TaskPreset(
        'Generate the content of a Reddit post whose summary is "{prompt}".',
        '"{response}" is the content of the post with the summary "{prompt}"', False, "lamp", "topic_writing",
    ),
    "product_review": TaskPreset(
        'Generate the review text of a product review whose summary is "{prompt}".',
        '"{response}" is the review text for the summary "{prompt}"', False, "lamp", "product_review",
    ),
}  # fmt: skip


def detect_format(path: str | os.PathLike) -> str:
    """The format of a data file: `"lamp"` for a `.json` file, `"news"` for JSON Lines whose first object has
    `headline` and `authors`, else `"jsonl"` (the project's interaction schema).

    Raises:
        `ValueError`: when the first non-blank line of a JSON Lines file is not a JSON object.
    """
    path = Path(path)
    if path.suffix == ".json":
        return "lamp"
    with open(path, encoding="utf-8-sig") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        keys = set(json.loads(first))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}, line 1: the first line is not a JSON object ({err}).") from err
    return "news" if {"headline", "authors"} <= keys else "jsonl"


def read_stream(
    path: str | os.PathLike,
    data_format: str = "auto",
    *,
    lamp_outputs: str | os.PathLike | None = None,
    lamp_task: str | None = None,
    lamp_queries: bool = False,
) -> list[Interaction]:
    """
    Reads a user stream in any supported format, oldest first.

    Args:
        path (`str` or `os.PathLike`): the data file.
        data_format (`str`, *optional*, defaults to `"auto"`): `"jsonl"` (one interaction per line: `user_id`,
            `prompt`, `response`, `timestamp`, optional `id` and `metadata`; see [`read_interactions_jsonl`]),
            `"news"` (the News Category dataset, see [`read_news_jsonl`]), `"lamp"` (a LaMP / LongLaMP questions
            file, see [`read_lamp`]) or `"auto"` ([`detect_format`]).
        lamp_outputs (`str` or `os.PathLike`, *optional*): LaMP's outputs file (golds).
        lamp_task (`str`, *optional*): the LaMP / LongLaMP task.
        lamp_queries (`bool`, *optional*, defaults to `False`): also read each LaMP question as its user's latest
            item.

    Raises:
        `FileNotFoundError`: `path` is not a file. `ValueError`: a bad record, with the file, line and field.
    """
    from .jsonl import read_interactions_jsonl
    from .lamp import read_lamp
    from .news import read_news_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {list(DATA_FORMATS)}, got {data_format!r}.")
    if data_format == "auto":
        data_format = detect_format(path)
    if data_format == "news":
        return read_news_jsonl(path)
    if data_format == "jsonl":
        return read_interactions_jsonl(path)
    return read_lamp(path, lamp_outputs, task=lamp_task, include_queries=bool(lamp_queries))
