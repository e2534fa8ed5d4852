"""The records a memory stores and the objects it returns."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Anything longer is almost certainly a pasted document or a bug upstream; the encoder would truncate it anyway
# (MiniLM reads 256 word pieces), so we refuse it loudly instead of storing text nobody can retrieve by.
DEFAULT_MAX_TEXT_CHARS = 20_000

SOURCES = ("local", "global")


# User ids and record ids are names, not paths, but they end up in folder and adapter names and in logs: keep them
# short, printable and free of anything a filesystem would interpret.
MAX_ID_CHARS = 256


def _utf8(name: str, value: str) -> None:
    """Refuses text that cannot be written as UTF-8 (a lone surrogate, as `json.loads('"\\udc80"')` produces)."""
    if value.isascii():  # (O(1) in CPython: most text is ASCII, and a load checks four strings per record)
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"`{name}` holds a lone surrogate {value[err.start]!r} at position {err.start}, which cannot be saved as "
            "UTF-8; decode the text properly (or replace it) first."
        ) from None


# In ASCII, the visible characters are exactly `!`..`~`: space is Zs, the rest control (Cc).
_ASCII_VISIBLE = re.compile(r"[!-~]")


def _visible(value: str) -> bool:
    """Whether `value` has a character that is neither whitespace/separator (Z*) nor control/format (C*), e.g. not
    only zero-width spaces."""
    if value.isascii():
        return _ASCII_VISIBLE.search(value) is not None
    return any(unicodedata.category(c)[0] not in "ZC" for c in value)


def _check_text(name: str, value: Any, max_chars: int, allow_empty: bool = False) -> str:
    if value is None:
        raise ValueError(f"`{name}` is None; expected a non-empty string.")
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}.")
    if len(value) > max_chars:
        raise ValueError(f"`{name}` is {len(value)} characters long; the limit is {max_chars} (`max_text_chars`).")
    _utf8(name, value)
    if not allow_empty and not _visible(value):
        raise ValueError(f"`{name}` has no visible character; expected a non-empty string.")
    return value


# Path separators and the control characters (Unicode category Cc: C0, DEL and C1), as one regex: a load checks
# two names per record.
_FORBIDDEN_IN_NAMES = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")


def check_name(value: Any, name: str = "id") -> str:
    """Validates a user id or record id: a non-empty str of at most `MAX_ID_CHARS` (256) characters, without
    surrounding whitespace, path separators (`/`, `\\`), `.` or `..` as the whole name, NUL or other control
    characters, encodable as UTF-8.

    Args:
        value: the id.
        name (`str`, *optional*, defaults to `"id"`): the field's name, for the error message.
    """
    if value is None or not isinstance(value, str):
        raise TypeError(f"`{name}` must be a non-empty str, got {type(value).__name__}.")
    if not value.strip():
        raise ValueError(f"`{name}` is empty; expected a non-empty string.")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"`{name}` is {len(value)} characters long; the limit is {MAX_ID_CHARS}.")
    if value != value.strip():
        raise ValueError(f"`{name}` {value!r} has leading or trailing whitespace.")
    _utf8(name, value)
    found = _FORBIDDEN_IN_NAMES.search(value)
    bad = found.group() if found else None
    if bad is not None:
        raise ValueError(
            f"`{name}` {value!r} holds {bad!r}: ids may not contain path separators or control characters."
        )
    if value in (".", ".."):
        raise ValueError(f"`{name}` may not be {value!r}.")
    return value


def check_user_id(user_id: Any) -> str:
    """Validates a user id (see [`check_name`])."""
    return check_name(user_id, "user_id")


def user_bucket(user_id: str, num_buckets: int) -> int:
    """A user's bucket among `num_buckets`: the first 8 bytes of the sha256 of the user id, modulo `num_buckets`.
    Stable across processes, machines, Python versions (unlike `hash()`) and releases, and independent of which
    other users exist: training shards and the Milvus backend's partitions both use it."""
    return int.from_bytes(hashlib.sha256(user_id.encode("utf-8")).digest()[:8], "big") % num_buckets


def _check_metadata_keys(metadata: dict) -> None:
    """Refuses a key that is not a str anywhere in `metadata`: JSON would save `{1: "x"}` as `{"1": "x"}`, so the
    record would come back from a save and a load with other keys than it was stored with."""
    stack: list[tuple[str, Any]] = [("metadata", metadata)]
    while stack:  # (iterative: deep nesting cannot overflow the stack; json.dumps has already refused cycles)
        path, node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"`{path}` has the key {key!r} of type {type(key).__name__}; `metadata` keys must be str "
                        "(JSON would turn it into a string on save)."
                    )
                stack.append((f"{path}[{key!r}]", value))
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(node))


def _freeze(value: Any) -> Any:
    """A read-only deep copy of JSON data: dicts become [`FrozenDict`], lists [`FrozenList`] (equal to the
    originals)."""
    if isinstance(value, dict):
        return FrozenDict({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return FrozenList(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    """A plain, mutable deep copy of frozen JSON data."""
    if isinstance(value, dict):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(item) for item in value]
    return value


class FrozenDict(dict):
    """A dict that refuses changes: the metadata of a stored [`Interaction`] (it serialises as a plain dict). Build a
    changed record with `dataclasses.replace(item, metadata={...})`."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("an Interaction's metadata is read-only; use dataclasses.replace(item, metadata=...).")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


class FrozenList(list):
    """A list that refuses changes (inside an [`Interaction`]'s metadata)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("an Interaction's metadata is read-only; use dataclasses.replace(item, metadata=...).")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = clear = _refuse
    sort = reverse = _refuse

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (FrozenList, (list(self),))


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
        try:
            value = float(value)
        except OverflowError:  # (an int past float's range, e.g. 10**400 in a JSON file)
            raise ValueError(f"`{name}` is too large to be a time.") from None
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value}.")
        return value
    raise TypeError(f"`{name}` must be a number, datetime or ISO string, got {type(value).__name__}.")


@dataclass(frozen=True)
class Interaction:
    """One (prompt, response) pair a user produced, the unit every memory stores. Immutable (its metadata too), so a
    stored record cannot be changed behind the memory's back; `dataclasses.replace` makes a changed copy.

    Args:
        user_id (`str`):
            Whose interaction this is: at most 256 characters, no surrounding whitespace, path separators or control
            characters (see [`check_name`]).
        prompt (`str`):
            The query or task input (for news: the article summary).
        response (`str`):
            What the user wrote (for news: their headline).
        timestamp (`float`, `datetime`, `date` or ISO `str`, *optional*):
            When it happened; stored as POSIX seconds (UTC for naive datetimes). Defaults to now.
        metadata (`dict`, *optional*):
            Any JSON-serialisable extras (category, link, ...) whose keys, nested ones too, are str (a `TypeError`
            names any other: JSON would turn it into a string on save); stored as a read-only copy.
        id (`str`, *optional*):
            A stable id (the same rules as `user_id`); a random UUID when not given.
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
        set_field = object.__setattr__  # frozen: fields are set once, here, after validation
        set_field(self, "user_id", check_user_id(self.user_id))
        set_field(self, "prompt", _check_text("prompt", self.prompt, self.max_text_chars))
        set_field(self, "response", _check_text("response", self.response, self.max_text_chars))
        set_field(self, "timestamp", time.time() if self.timestamp is None else to_timestamp(self.timestamp))
        metadata = {} if self.metadata is None else self.metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"`metadata` must be a dict, got {type(metadata).__name__}.")
        if metadata:  # (an empty dict is valid JSON: no need to serialise it)
            try:
                _utf8("metadata", json.dumps(metadata, allow_nan=False, ensure_ascii=False))
            except (TypeError, ValueError, RecursionError) as err:
                raise ValueError(f"`metadata` must be JSON-serialisable as UTF-8: {err}") from err
            _check_metadata_keys(metadata)
        set_field(self, "metadata", metadata if isinstance(metadata, FrozenDict) else _freeze(metadata))
        set_field(self, "id", uuid.uuid4().hex if self.id is None else check_name(self.id, "id"))

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
            "metadata": _thaw(self.metadata),
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


def is_testable(item: Interaction) -> bool:
    """Whether an item can be held out and predicted: a text-only item (a LaMP-7 tweet, whose input is its answer,
    `metadata["text_only"]`) cannot, since copying its input would score it perfectly. Test splits, validation splits
    and the tuner's validation items all use this one rule."""
    return not item.metadata.get("text_only")


def coerce_interaction(value: Any, max_text_chars: int | None = None) -> Interaction:
    """An [`Interaction`] from an `Interaction` or a dict (see [`Interaction.from_dict`]), its `prompt` and `response`
    held to the one text rule of a record: a str (`TypeError` otherwise) of at most `max_text_chars` characters,
    encodable as UTF-8 and with a visible character (`ValueError` otherwise).

    Args:
        value (`Interaction` or `dict`): the record.
        max_text_chars (`int`, *optional*): the longest accepted `prompt` or `response` (a memory passes its own
            limit). `None`: the record's own `max_text_chars` (`DEFAULT_MAX_TEXT_CHARS` for a dict).

    Raises:
        `TypeError` / `ValueError` naming the offending field.
    """
    if isinstance(value, dict):
        value = Interaction.from_dict(value, DEFAULT_MAX_TEXT_CHARS if max_text_chars is None else max_text_chars)
    elif not isinstance(value, Interaction):
        raise TypeError(f"expected an Interaction or a dict, got {type(value).__name__}.")
    # Checked again though `__post_init__` checked it: the record may have been built under a larger limit than the
    # caller's, or changed behind the frozen dataclass's back (`object.__setattr__`).
    limit = value.max_text_chars if max_text_chars is None else max_text_chars
    for name in ("prompt", "response"):
        _check_text(name, getattr(value, name), limit)
    return value


def coerce_interactions(
    values: Any, user_id: str | None = None, name: str = "interactions", *, max_text_chars: int | None = None
) -> list[Interaction]:
    """Validates a batch of records (see [`coerce_interaction`]), each belonging to `user_id` when given, with no
    `(user_id, id)` pair twice. An error names the record by its index, e.g. "`interactions[3]`: `prompt` must be a
    str, got int.".

    Args:
        values (`Iterable[Interaction | dict]`): the records.
        user_id (`str`, *optional*): the user every record must belong to.
        name (`str`, *optional*, defaults to `"interactions"`): the argument's name, for the messages.
        max_text_chars (`int`, *optional*): see [`coerce_interaction`].

    Returns:
        `list[Interaction]`: the records, in order.

    Raises:
        `TypeError` / `ValueError` naming the offending record and field.
    """
    if isinstance(values, (str, bytes, dict, Interaction)) or not isinstance(values, Iterable):
        raise TypeError(
            f"`{name}` must be an iterable of Interaction or dict records, got {type(values).__name__} (put a single "
            "record in a list)."
        )
    records: list[Interaction] = []
    for index, value in enumerate(values):
        try:
            record = coerce_interaction(value, max_text_chars)
        except (TypeError, ValueError) as err:
            raise type(err)(f"`{name}[{index}]`: {err}") from err
        if user_id is not None and record.user_id != user_id:
            raise ValueError(f"`{name}[{index}].user_id` is {record.user_id!r}, expected {user_id!r}.")
        records.append(record)
    first: dict[tuple[str, str], int] = {}
    for index, record in enumerate(records):
        earlier = first.setdefault((record.user_id, record.id), index)
        if earlier != index:
            raise ValueError(
                f"`{name}[{index}]`: `id` {record.id!r} repeats `{name}[{earlier}]` (user {record.user_id!r}); a "
                "user's ids must be unique."
            )
    return records


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


@runtime_checkable
class RetrievalMemory(Protocol):
    """What [`SpringForCausalLM`] needs of a memory: gated, mediated retrieval for a user and a query
    ([`LoGoMemory`] is one; any object with this method works)."""

    def retrieve_context(self, user_id: str, query: str, k: int = 4, **kwargs: Any) -> MediatedContext: ...


@runtime_checkable
class BufferStore(Protocol):
    """What [`SpringTrainer`] needs of a memory: each user's residual buffer, read and replaced as a whole."""

    def buffer(self, user_id: str) -> list[Interaction]: ...

    def buffer_scores(self, user_id: str) -> dict[str, float]: ...

    def set_buffer(
        self, user_id: str, interactions: Sequence[Interaction], scores: Sequence[float] | None = None
    ) -> None: ...
