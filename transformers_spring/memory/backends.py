"""Where a [`LoGoMemory`]'s vectors are stored and searched: the [`VectorBackend`] interface, and the write journal
that keeps a memory and its backend in step.

The default is no backend object at all: every vector lives in the process ([`VectorStore`] per user and region,
an hnswlib index for the global memory), and nothing below runs. An external backend (see
[`~memory.milvus.MilvusBackend`]) holds two collections, `"local"` (every history and buffer record, with its record)
and `"global"` (the shared items, keyed by their global label), serves the memory's dense searches unless it sets
`serves_searches = False` (then the in-process mirror answers them), and is where a memory saved with it is loaded
from again, when the caller passes it (a saved folder never names where to connect). BM25, the relevance gate, the mediator, deduplication, the sharing rule and the buffer logic stay above
it, unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

SCOPES = ("local", "global")


class BackendError(RuntimeError):
    """A backend call failed after its retries. Writes that were not confirmed stay queued (see [`WriteJournal`])."""


@runtime_checkable
class VectorBackend(Protocol):
    """A store of unit-norm vectors in two scopes, `"local"` and `"global"`, each row owned by one user.

    Rows are dicts. A `"local"` row has `user_id`, `region` (`"history"` or `"buffer"`), `record_id`, `timestamp`,
    `seq` (the memory's write order), `score` (a buffer item's score or None), `record` (the
    [`Interaction.to_dict`] form) and `vector`. A `"global"` row has `label` (an int, unique in the memory),
    `user_id`, `record_id`, `timestamp` and `vector`. Every write is idempotent (an upsert or a delete by key), so a
    retried write can never duplicate a row.

    A backend may set `serves_searches = False`: it then stores the rows (the store of record: durable, shared,
    erasable) while the in-process mirror answers the dense searches, as the default does. Without the attribute the
    backend answers them.
    """

    def connect(self, dim: int) -> None:
        """Opens the store (creating empty collections when absent) for vectors of `dim` dimensions."""

    def upsert(self, scope: str, rows: Sequence[dict]) -> None:
        """Writes rows, replacing any row with the same key (local: user, region, record id; global: label)."""

    def delete(self, scope: str, keys: Sequence[Any]) -> None:
        """Deletes rows by key: `(user_id, region, record_id)` tuples for `"local"`, labels for `"global"`."""

    def delete_user(self, scope: str, user_id: str) -> int:
        """Deletes every row of `user_id` and checks that none is left; returns how many rows were left before."""

    def search(
        self,
        scope: str,
        query: np.ndarray,
        k: int,
        *,
        users: Sequence[str] | None = None,
        exclude_users: Sequence[str] | None = None,
        region: str | None = None,
        before: float | None = None,
    ) -> list[tuple[Any, float]]:
        """The top-`k` rows by inner product among those of `users` (all when None), not of `exclude_users`, in
        `region` (local only) and dated strictly before `before`, as `(key, score)`, best first; the key is the
        record id for `"local"` and the label for `"global"`."""

    def count(self, scope: str, user_id: str | None = None) -> int:
        """How many rows the scope holds (of `user_id` only, when given)."""

    def rows(self, scope: str) -> Iterator[dict]:
        """Every row of the scope with its vector (what a memory is loaded from)."""

    def flush(self) -> None:
        """Makes every write so far visible to searches on the fast path."""

    def manifest(self) -> dict:
        """What a saved memory records about its rows: where they are inside a store (collection names) and how to
        recognise them (a fingerprint). Never where to connect (a load connects to the store its caller passes) nor
        a secret such as a token."""


def serves_searches(backend: VectorBackend | None) -> bool:
    """Whether dense searches go to `backend` (False without one: the in-process mirror answers)."""
    return backend is not None and bool(getattr(backend, "serves_searches", True))


class WriteJournal:
    """The writes a memory owes its backend, in order. Each write method of [`LoGoMemory`] changes the in-process
    memory, queues the matching backend writes and then calls [`~WriteJournal.commit`]. A write leaves the queue only
    once the backend confirmed it; when the backend stays unreachable, `commit` raises [`BackendError`] and the
    writes wait for the next commit (writes are idempotent, so replaying them is safe)."""

    def __init__(self, backend: VectorBackend):
        self.backend = backend
        self._pending: deque[tuple[str, str, Any]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def upsert(self, scope: str, rows: Sequence[dict]) -> None:
        if rows:
            self._pending.append(("upsert", scope, list(rows)))

    def delete(self, scope: str, keys: Sequence[Any]) -> None:
        if keys:
            self._pending.append(("delete", scope, list(keys)))

    def delete_user(self, scope: str, user_id: str) -> None:
        self._pending.append(("delete_user", scope, user_id))

    def commit(self) -> None:
        """Applies the queued writes in order, then flushes; raises [`BackendError`] with the rest still queued."""
        if not self._pending:
            return
        while self._pending:
            op, scope, payload = self._pending[0]
            getattr(self.backend, op)(scope, payload)
            self._pending.popleft()
        self.backend.flush()
