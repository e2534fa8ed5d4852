"""LaMP and LongLaMP benchmark files as per-user interaction streams: each question's profile is one user's history."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from ..records import Interaction
from .jsonl import jsonl_rows
from .streams import user_id_from_name

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class _Preset:
    prompt: str
    response: str
    timestamps: tuple[str, ...] = ()  # candidate time keys, first present wins
    # The instruction LaMP writes in front of a question's input; stripped so that a query's prompt is the bare
    # input, as a profile item's is (the benchmark's prompt template adds the instruction back).
    query_prefix: str = ""


# Tasks whose profile items hold a (prompt, response) pair, or only text (LaMP_7); LaMP_1/2/3 profiles map to neither.
TASK_PRESETS = {
    "LaMP_4": _Preset("text", "title", ("date",), query_prefix="Generate a headline for the following article: "),
    "LaMP_5": _Preset(
        "abstract", "title", ("date",), query_prefix="Generate a title for the following abstract of a paper: "
    ),
    "LaMP_7": _Preset(
        "text",
        "text",
        ("date",),
        query_prefix="Paraphrase the following tweet without any explanation before or after it: ",
    ),  # fmt: skip
    "abstract_generation": _Preset("title", "abstract", ("year",)),  # LongLaMP
    "product_review": _Preset("summary", "reviewText", ("unixReviewTime", "reviewTime")),  # LongLaMP
    "topic_writing": _Preset("summary", "content"),  # LongLaMP (Reddit posts carry no time)
}

# Where a LaMP / LongLaMP row keeps its user, most specific first; the question id is the last resort.
USER_KEYS = ("user_id", "reviewerId", "name", "author")

_TIME_FORMATS = ("%m %d, %Y", "%b %d, %Y", "%B %d, %Y", "%d %B %Y", "%d %b %Y", "%m/%d/%Y")


def normalize_task(task: str) -> str:
    """Maps `"LaMP-4"`, `"lamp_4"`, `"LongLaMP_abstract_generation_user"`, ... to a [`TASK_PRESETS`] key, or
    returns the cleaned-up name unchanged when it is not one."""
    name = task.strip().replace("-", "_")
    key = name.lower()
    if key.startswith("longlamp_"):
        key = key[len("longlamp_") :]
    key = re.sub(r"_(user|temporal)$", "", key)
    for preset in TASK_PRESETS:
        if key == preset.lower():
            return preset
    return name


def _normalize_time(value) -> tuple[str, float] | None:
    """A time value as (sortable date string, POSIX seconds), or None when it is not one: ISO dates stay as they are,
    integer years become `"YYYY"`, unix seconds become an ISO date, Amazon's `"MM DD, YYYY"` becomes an ISO date."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", value):
            value = float(value)
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        if float(value).is_integer() and 1000 <= value <= 9999:
            year = int(value)
            return f"{year:04d}", _dt.datetime(year, 1, 1, tzinfo=_dt.UTC).timestamp()
        try:
            when = _dt.datetime.fromtimestamp(float(value), tz=_dt.UTC)
        except (OverflowError, OSError, ValueError):
            return None
        return when.date().isoformat(), float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = _dt.datetime.fromisoformat(value)
        text = value  # already ISO, and ISO strings sort chronologically
    except ValueError:
        for pattern in _TIME_FORMATS:
            try:
                when = _dt.datetime.strptime(value, pattern)
                break
            except ValueError:
                continue
        else:
            return None
        text = when.date().isoformat()
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return text, when.timestamp()


def _read_rows(path: Path) -> list:
    """A `.json` list or `.jsonl` rows (told apart by the first character, not the suffix)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from err
    return [row for _, row in jsonl_rows(text.splitlines(), path)]


def read_outputs(path: Path) -> tuple[str | None, dict[str, str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise ValueError(f'{path}: expected an object {{"task": ..., "golds": [{{"id", "output"}}, ...]}}.')
    golds = {}
    for index, gold in enumerate(data["golds"]):
        if not isinstance(gold, dict) or gold.get("id") is None or not isinstance(gold.get("output"), str):
            raise ValueError(f'{path}: gold #{index} needs an "id" and a string "output".')
        golds[str(gold["id"])] = gold["output"]
    task = data.get("task")
    return (task if isinstance(task, str) else None), golds


def _text(value) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)  # e.g. a rating used as a response
    if isinstance(value, str) and value.strip():
        return value
    return None


def _resolve_fields(task, prompt_field, response_field, timestamp_field) -> tuple[str, str, tuple[str, ...], bool]:
    """(prompt key, response key, time keys, whether a time is required) after applying the overrides."""
    preset = TASK_PRESETS.get(task) if task is not None else None
    if preset is None and (prompt_field is None or response_field is None):
        if task is None:
            raise ValueError(
                "the task is unknown: pass `task` (one of "
                f"{sorted(TASK_PRESETS)}), an outputs file that names it, or both `prompt_field` and `response_field`."
            )
        raise ValueError(
            f"task {task!r} has no (prompt, response) field preset; supported tasks are {sorted(TASK_PRESETS)} "
            "(LaMP_1/2/3 profiles hold no such pair). Pass both `prompt_field` and `response_field` to read it "
            "anyway."
        )
    prompt = prompt_field if prompt_field is not None else preset.prompt
    response = response_field if response_field is not None else preset.response
    if timestamp_field is not None:
        return prompt, response, (timestamp_field,), True
    return prompt, response, (preset.timestamps if preset is not None else ()), False


def read_lamp(
    questions_path: str | os.PathLike,
    outputs_path: str | os.PathLike | None = None,
    *,
    task: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    timestamp_field: str | None = None,
    include_queries: bool = False,
) -> list[Interaction]:
    """
    Reads a LaMP or LongLaMP split as interactions: every question is one user, whose stream is the question's
    profile, each profile item turned into a (prompt, response) pair by the task's field preset.

    LaMP's questions file is a JSON list of `{"id", "input", "profile": [...]}` and its outputs file is
    `{"task": "LaMP_4", "golds": [{"id", "output"}, ...]}`. LongLaMP rows (as exported from the Hub dataset
    `LongLaMP/LongLaMP`) carry `input`, `output` and `profile` together, with the user under `reviewerId`, `name`
    or `author`; a `.json` list or `.jsonl` rows are both accepted. The user id is the first of `user_id`,
    `reviewerId`, `name`, `author` present in the row, else the question `id`.

    Presets (prompt, response, time): `LaMP_4` (text, title, date), `LaMP_5` (abstract, title, date), `LaMP_7`
    (text, text, date: a tweet is its own pair, marked `metadata["text_only"]`, never a test item), LongLaMP
    `abstract_generation` (title, abstract, year), `product_review` (summary, reviewText, unixReviewTime or
    reviewTime) and `topic_writing` (summary, content, none). Times are normalised to sortable date strings (ISO dates
    stay, integer years become `"YYYY"`, unix seconds an ISO date), kept in `metadata["date"]`, and converted to the
    interactions' POSIX timestamps. Where a user's profile carries no time at all (LongLaMP's user splits, or
    `topic_writing`), the timestamp is the item's position in the profile, which keeps the profile order; where only
    some items carry one, those without are skipped.

    Args:
        questions_path (`str` or `os.PathLike`):
            The questions file (`.json` list or `.jsonl` rows).
        outputs_path (`str` or `os.PathLike`, *optional*):
            LaMP's outputs file, for the task name and the gold outputs.
        task (`str`, *optional*):
            `"LaMP_4"`, `"LaMP_5"`, `"LaMP_7"`, `"abstract_generation"`, `"product_review"` or `"topic_writing"` (`"LaMP-4"`,
            `"product_review_user"` and the like are accepted). Read from the outputs file when not given; required
            otherwise, unless both `prompt_field` and `response_field` are given.
        prompt_field (`str`, *optional*):
            Overrides the preset's prompt key.
        response_field (`str`, *optional*):
            Overrides the preset's response key.
        timestamp_field (`str`, *optional*):
            Overrides the preset's time key; items without it are then skipped.
        include_queries (`bool`, *optional*, defaults to `False`):
            Also append each question itself (its `input` as the prompt, without the task's fixed LaMP instruction
            such as `"Generate a headline for the following article: "`; its gold output as the response) after the
            user's profile, with `metadata["query"] = True`. Needs gold outputs (the outputs file or LongLaMP's
            `output`).

    Returns:
        `list[Interaction]`, oldest first (equal times keep file order, so each query follows its profile).

    Raises:
        `FileNotFoundError`: for a missing file.
        `ValueError`: for an unknown or conflicting task, or a malformed question (the message names the file and
        the question id). Profile items missing a needed field are skipped and counted in one warning instead.
    """
    questions_path = Path(questions_path)
    if not questions_path.is_file():
        raise FileNotFoundError(f"questions file not found: {questions_path}")
    golds: dict[str, str] = {}
    if outputs_path is not None:
        outputs_path = Path(outputs_path)
        if not outputs_path.is_file():
            raise FileNotFoundError(f"outputs file not found: {outputs_path}")
        outputs_task, golds = read_outputs(outputs_path)
        if outputs_task is not None:
            outputs_task = normalize_task(outputs_task)
            if task is not None and normalize_task(task) != outputs_task:
                raise ValueError(f"`task` is {task!r} but {outputs_path} is for task {outputs_task!r}.")
            task = outputs_task
    task = normalize_task(task) if task is not None else None
    prompt_key, response_key, time_keys, time_required = _resolve_fields(
        task, prompt_field, response_field, timestamp_field
    )
    preset = TASK_PRESETS.get(task) if task is not None else None
    # Profile items that hold only text (LaMP-7's tweets, prompt key = response key) are their own (prompt, response)
    # pair, marked `metadata["text_only"]` so a benchmark never tests on one (its input would be its answer).
    text_only = prompt_key == response_key
    query_prefix = preset.query_prefix if preset is not None else ""

    rows = _read_rows(questions_path)
    if not isinstance(rows, list):
        raise ValueError(f"{questions_path}: expected a JSON list of questions or JSON Lines rows.")
    items: list[Interaction] = []
    skipped = total = 0
    for index, row in enumerate(rows):
        question_id = str(row["id"]) if isinstance(row, dict) and row.get("id") is not None else None
        where = f"{questions_path}, question {question_id!r}" if question_id else f"{questions_path}, row #{index}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        user_id = next((row[key] for key in USER_KEYS if row.get(key) not in (None, "")), question_id)
        if user_id is None:
            raise ValueError(f"{where}: no user id (none of {list(USER_KEYS)} or 'id').")
        user_id = user_id_from_name(str(user_id))
        profile = row.get("profile")
        if not isinstance(profile, list):
            raise ValueError(f"{where}: 'profile' must be a list, got {type(profile).__name__}.")
        base_id = question_id if question_id else f"{questions_path.stem}-{index}"

        # A user whose profile has no time at all keeps profile order; a partly timed profile drops untimed items.
        timed = time_required or any(
            isinstance(entry, dict) and any(entry.get(key) is not None for key in time_keys) for entry in profile
        )
        user_items = []
        for position, entry in enumerate(profile):
            total += 1
            if not isinstance(entry, dict):
                skipped += 1
                continue
            prompt, response = _text(entry.get(prompt_key)), _text(entry.get(response_key))
            metadata = {"task": task} if task else {}
            if text_only:
                metadata["text_only"] = True
            if timed:
                when = next((_normalize_time(entry[key]) for key in time_keys if entry.get(key) is not None), None)
                if when is None:
                    skipped += 1
                    continue
                metadata["date"], timestamp = when
            else:
                timestamp = float(position)
            if prompt is None or response is None:
                skipped += 1
                continue
            if entry.get("id") is not None:
                metadata["source_id"] = str(entry["id"])
            try:
                user_items.append(
                    Interaction(
                        user_id,
                        prompt,
                        response,
                        timestamp=timestamp,
                        metadata=metadata,
                        id=f"{base_id}#{entry['id'] if entry.get('id') is not None else position}",  # ids hold no "/"
                    )
                )
            except (TypeError, ValueError):  # e.g. a text over Interaction's length limit
                skipped += 1
        items.extend(user_items)

        if include_queries:
            gold = golds.get(question_id) if question_id is not None and question_id in golds else row.get("output")
            if not isinstance(gold, str) or not isinstance(row.get("input"), str):
                source = outputs_path if outputs_path is not None else questions_path
                raise ValueError(
                    f"{where}: `include_queries` needs the question's 'input' and its gold output, "
                    f"found no string output in {source}."
                )
            # Ties sort stably, so the query lands right after the user's latest profile item.
            if timed:
                latest = max((item.timestamp for item in user_items), default=0.0)
            else:
                latest = float(len(profile))
            metadata = {"task": task, "query": True} if task else {"query": True}
            query_input = row["input"]
            if query_prefix and query_input.startswith(query_prefix) and query_input[len(query_prefix) :].strip():
                query_input = query_input[len(query_prefix) :]
            try:
                query = Interaction(user_id, query_input, gold, timestamp=latest, metadata=metadata, id=base_id)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: invalid query: {err}") from err
            items.append(query)
    if skipped:
        logger.warning(
            f"{questions_path.name}: skipped {skipped} of {total} profile items missing '{prompt_key}', "
            f"'{response_key}'{' or a time' if time_keys else ''} (or holding an invalid value)."
        )
    return sorted(items, key=lambda item: item.timestamp)
