"""The records a memory stores and the objects it returns."""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Anything longer is almost certainly a pasted document or a bug upstream; the encoder would truncate it anyway
# (MiniLM reads 256 word pieces), so we refuse it loudly instead of storing text nobody can retrieve by.
DEFAULT_MAX_TEXT_CHARS = 20_000

SOURCES = ("local", "global")


def _check_text(name: str, value: Any, max_chars: int, allow_empty: bool = False) -> str:
    if value is None:
        raise ValueError(f"`{name}` is None; expected a non-empty string.")
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise ValueError(f"`{name}` is empty; expected a non-empty string.")
    if len(value) > max_chars:
        raise ValueError(f"`{name}` is {len(value)} characters long; the limit is {max_chars} (`max_text_chars`).")
    return value


def check_user_id(user_id: Any) -> str:
    """Validates a user id: a non-empty string without surrounding whitespace or path separators."""
    if user_id is None or not isinstance(user_id, str):
        raise TypeError(f"`user_id` must be a non-empty str, got {type(user_id).__name__}.")
    if not user_id.strip():
        raise ValueError("`user_id` is empty; expected a non-empty string.")
    if user_id != user_id.strip() or "\n" in user_id:
        raise ValueError(f"`user_id` {user_id!r} has leading/trailing whitespace or a newline.")
    return user_id


def to_timestamp(value: Any, name: str = "timestamp") -> float:
    """Converts a POSIX time, a `datetime`/`date` or an ISO-8601 string to POSIX seconds, refusing NaN and inf."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number, datetime or ISO string, got bool.")
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.timestamp()
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day, tzinfo=_dt.UTC).timestamp()
    if isinstance(value, str):
        try:
            return to_timestamp(_dt.datetime.fromisoformat(value), name)
        except ValueError as err:
            raise ValueError(f"`{name}` {value!r} is not an ISO-8601 date or time.") from err
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value}.")
        return value
    raise TypeError(f"`{name}` must be a number, datetime or ISO string, got {type(value).__name__}.")


@dataclass
class Interaction:
    """One (prompt, response) pair a user produced, the unit every memory stores.

    Args:
        user_id (`str`):
            Whose interaction this is. Non-empty, no surrounding whitespace.
        prompt (`str`):
            The query or task input (for news: the article summary).
        response (`str`):
            What the user wrote (for news: their headline).
        timestamp (`float`, `datetime`, `date` or ISO `str`, *optional*):
            When it happened; stored as POSIX seconds (UTC for naive datetimes). Defaults to now.
        metadata (`dict`, *optional*):
            Any JSON-serialisable extras (category, link, ...).
        id (`str`, *optional*):
            A stable id; a random UUID when not given.
        max_text_chars (`int`, *optional*, defaults to 20000):
            Longest accepted `prompt` or `response`.

    Raises:
        `TypeError` / `ValueError` naming the offending field, before anything is stored.
    """

    user_id: str
    prompt: str
    response: str
    timestamp: float | None = None
    metadata: dict = field(default_factory=dict)
    id: str | None = None
    max_text_chars: int = field(default=DEFAULT_MAX_TEXT_CHARS, repr=False, compare=False)

    def __post_init__(self):
        self.user_id = check_user_id(self.user_id)
        self.prompt = _check_text("prompt", self.prompt, self.max_text_chars)
        self.response = _check_text("response", self.response, self.max_text_chars)
        self.timestamp = time.time() if self.timestamp is None else to_timestamp(self.timestamp)
        if self.metadata is None:
            self.metadata = {}
        if not isinstance(self.metadata, dict):
            raise TypeError(f"`metadata` must be a dict, got {type(self.metadata).__name__}.")
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`metadata` must be JSON-serialisable: {err}") from err
        if self.id is None:
            self.id = uuid.uuid4().hex
        elif not isinstance(self.id, str) or not self.id.strip() or "\n" in self.id:
            raise ValueError(f"`id` must be a non-empty single-line str, got {self.id!r}.")

    @property
    def text(self) -> str:
        """The text that is embedded and indexed: the full (prompt, response) pair."""
        return f"{self.prompt}\n{self.response}"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "prompt": self.prompt,
            "response": self.response,
            "timestamp": self.timestamp,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> Interaction:
        if not isinstance(data, dict):
            raise TypeError(f"an interaction must be a JSON object, got {type(data).__name__}.")
        missing = [key for key in ("user_id", "prompt", "response") if key not in data]
        if missing:
            raise ValueError(f"interaction is missing field(s) {missing}.")
        return cls(
            user_id=data["user_id"],
            prompt=data["prompt"],
            response=data["response"],
            timestamp=data.get("timestamp"),
            metadata=data.get("metadata") or {},
            id=data.get("id"),
            max_text_chars=max_text_chars,
        )


@dataclass
class RetrievedItem:
    """One retrieval hit.

    Args:
        interaction (`Interaction`): the stored record.
        score (`float`): the similarity under the scorer that found it (cosine for dense and for the global path,
            BM25 for `scorer="bm25"`); higher is more relevant.
        source (`str`): `"local"` (the user's own memory) or `"global"` (another user's shared item).
        embedding (`np.ndarray`, *optional*): the record's normalised embedding, used by the mediator.
    """

    interaction: Interaction
    score: float
    source: str
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {self.source!r}.")


@dataclass
class MediatedContext:
    """What [`LoGoMemory.retrieve_context`] returns: the context to condition on and how much to trust it.

    Args:
        items (`list[RetrievedItem]`): the context, most useful first (empty when nothing passed the gate).
        weight (`float`): the suggested interpolation weight λ for the history-conditioned decoding path
            (0 when `items` is empty).
        cold_start (`bool`): whether the mediator treated the user as cold-start (leaned on global memory).
        local_hits (`list[RetrievedItem]`): the user's local hits that passed the relevance gate.
        global_hits (`list[RetrievedItem]`): the global hits before mediation.
        dropped (`list[RetrievedItem]`): global hits removed because they conflicted with strong local evidence.
        gate_threshold (`float | None`): the gate threshold that was applied (None while an "auto" gate warms up).
    """

    items: list[RetrievedItem]
    weight: float
    cold_start: bool = False
    local_hits: list[RetrievedItem] = field(default_factory=list)
    global_hits: list[RetrievedItem] = field(default_factory=list)
    dropped: list[RetrievedItem] = field(default_factory=list)
    gate_threshold: float | None = None

    @property
    def is_empty(self) -> bool:
        return not self.items
