"""The interaction journal of `spring serve`: an append-only JSON-lines file in which every acknowledged
`POST /v1/interactions` is on disk (written and fsynced) before the server answers, so a `kill -9` loses nothing it
acknowledged. A restart replays it into the saved state (see `server/state.py`).

```
<workdir>/journal.jsonl   # one {"seq", "id", "user_id", "prompt", "response", "timestamp", "metadata"} per line
<workdir>/serve.json      # the server's own bookkeeping (initial trained counts), written atomically
```

A line cut short by a crash mid-append (no trailing newline, or not JSON) can only be the last one; it was never
acknowledged, and reading drops it with a warning. A damaged line anywhere else is an error naming the file and the
line: the journal is the only copy of what it holds, so it is never silently skipped.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..records import Interaction
from .folder import _fsync_directory, atomic_write_bytes, atomic_write_text

logger = logging.get_logger(__name__)

JOURNAL_FILE = "journal.jsonl"
SERVE_STATE_FILE = "serve.json"


def _record(seq: int, item: Interaction) -> dict[str, Any]:
    return {
        "seq": seq, "id": item.id, "user_id": item.user_id, "prompt": item.prompt, "response": item.response,
        "timestamp": item.timestamp, "metadata": dict(item.metadata),
    }  # fmt: skip


def _interaction(record: dict[str, Any]) -> Interaction:
    return Interaction(
        record["user_id"], record["prompt"], record["response"], timestamp=record["timestamp"],
        metadata=record.get("metadata") or {}, id=record["id"],
    )  # fmt: skip


class InteractionJournal:
    """The durable, append-only log of acknowledged interactions (see the module docstring). Thread-safe.

    Args:
        directory (`str` or `os.PathLike`): the server's work directory (created if missing).
        fsync (`bool`, *optional*, defaults to `True`): fsync every append before it returns (what makes an
            acknowledged write survive a crash; turn off only for throwaway servers).
    """

    def __init__(self, directory: str | os.PathLike, fsync: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / JOURNAL_FILE
        self.fsync = bool(fsync)
        self._lock = threading.Lock()
        self._entries: list[tuple[int, Interaction]] = self._read()
        self._ids = {(it.user_id, it.id) for _, it in self._entries}
        self._next_seq = (self._entries[-1][0] + 1) if self._entries else 0

    def _read(self) -> list[tuple[int, Interaction]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = number == len(lines)  # a final line without its newline was cut mid-append
            try:
                if last:
                    raise ValueError("no trailing newline")
                record = json.loads(line)
                entries.append((int(record["seq"]), _interaction(record)))
            except (ValueError, KeyError, TypeError) as err:
                if last or all(not rest.strip() for rest in lines[number:]):
                    logger.warning(f"{self.path}: line {number} was cut short by a crash and is dropped ({err}).")
                    self._truncate(len(b"\n".join(lines[: number - 1])) + (1 if number > 1 else 0))
                    break
                raise ValueError(
                    f"{self.path}: line {number} is damaged ({err}); the journal cannot be read."
                ) from err
        return entries

    def _truncate(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())

    def append(self, items: Iterable[Interaction]) -> list[int]:
        """Appends `items` and returns their sequence numbers; on disk (fsynced) when it returns.

        Raises:
            `KeyError`: an item whose `(user_id, id)` the journal holds already (nothing is written).
        """
        items = list(items)
        with self._lock:
            keys = [(it.user_id, it.id) for it in items]
            taken = [key for key in keys if key in self._ids]
            if taken or len(set(keys)) < len(keys):
                raise KeyError(f"interaction id {(taken or keys)[0][1]!r} is already recorded.")
            seqs = list(range(self._next_seq, self._next_seq + len(items)))
            payload = "".join(
                json.dumps(_record(s, it), ensure_ascii=False) + "\n" for s, it in zip(seqs, items, strict=True)
            )
            created = not self.path.exists()
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write(payload.encode("utf-8"))
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                except BaseException:  # (e.g. a full disk) no cut line may stay before the next append
                    f.truncate(start)
                    raise
            if created and self.fsync:
                _fsync_directory(self.directory)
            self._entries += list(zip(seqs, items, strict=True))
            self._ids.update(keys)
            self._next_seq += len(items)
        return seqs

    def holds(self, user_id: str, interaction_id: str) -> bool:
        """Whether the journal holds that interaction (False once its user was erased)."""
        with self._lock:
            return (user_id, interaction_id) in self._ids

    def entries(self, user_id: str | None = None) -> list[tuple[int, Interaction]]:
        """`(seq, interaction)` pairs in order, of one user or of everyone."""
        with self._lock:
            return [(s, it) for s, it in self._entries if user_id is None or it.user_id == user_id]

    def forget_user(self, user_id: str) -> int:
        """Rewrites the journal without `user_id`'s lines (atomically); returns how many were removed."""
        with self._lock:
            kept = [(s, it) for s, it in self._entries if it.user_id != user_id]
            removed = len(self._entries) - len(kept)
            if removed:
                payload = "".join(json.dumps(_record(s, it), ensure_ascii=False) + "\n" for s, it in kept)
                atomic_write_bytes(self.path, payload.encode("utf-8"))
                self._entries = kept
                self._ids = {key for key in self._ids if key[0] != user_id}
            return removed

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def read_serve_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The server's bookkeeping file (`serve.json`), `{}` when there is none."""
    path = Path(directory) / SERVE_STATE_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def write_serve_state(directory: str | os.PathLike, data: dict[str, Any]) -> None:
    """Writes `serve.json` atomically."""
    atomic_write_text(Path(directory) / SERVE_STATE_FILE, json.dumps(data, indent=1, sort_keys=True))
