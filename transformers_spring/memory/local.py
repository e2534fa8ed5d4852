"""A user's own memory: exact dense or BM25 search over their history, plus a pinned region for SPRInG's buffer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..records import Interaction, RetrievedItem
from ..utils.ranking import top_k_candidates
from .backends import serves_searches
from .bm25 import BM25Index

SCORERS = ("dense", "bm25")
REGIONS = ("history", "buffer", "all")


class VectorStore:
    """Rows of (record, normalised vector) with exact search and O(1) real deletion (swap with the last row).

    Not thread-safe on its own: [`LoGoMemory`] serialises access.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self._vectors = np.empty((16, dim), dtype=np.float32)
        self._timestamps = np.empty(16, dtype=np.float64)
        self._seq = np.empty(16, dtype=np.int64)  # write order: the last tie-breaker, stable under deletion
        self._next_seq = 0
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.records: dict[str, Interaction] = {}
        self.extras: dict[str, float] = {}  # e.g. a buffer item's drift score
        self._bm25: dict[str, BM25Index] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.rows

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: len(self.ids)]

    @property
    def timestamps(self) -> np.ndarray:
        return self._timestamps[: len(self.ids)]

    def ids_in_write_order(self) -> list[str]:
        return [self.ids[row] for row in np.argsort(self._seq[: len(self.ids)])]

    def vector(self, record_id: str) -> np.ndarray:
        return self._vectors[self.rows[record_id]].copy()

    def add(self, interaction: Interaction, vector: np.ndarray) -> None:
        self.add_many([interaction], np.asarray(vector)[None])

    def add_many(self, interactions: Sequence[Interaction], vectors: np.ndarray) -> None:
        """Appends records (ids new and unique) with one copy of their vectors; amortised doubling keeps appends
        O(1)."""
        n, extra = len(self.ids), len(interactions)
        if not extra:
            return
        if n + extra > self._vectors.shape[0]:
            size = max(n + extra, 2 * self._vectors.shape[0])
            for name in ("_vectors", "_timestamps", "_seq"):
                old = getattr(self, name)
                grown = np.empty((size, *old.shape[1:]), dtype=old.dtype)
                grown[:n] = old[:n]
                setattr(self, name, grown)
        self._vectors[n : n + extra] = vectors
        self._timestamps[n : n + extra] = [item.timestamp for item in interactions]
        self._seq[n : n + extra] = np.arange(self._next_seq, self._next_seq + extra)
        self._next_seq += extra
        for row, item in enumerate(interactions, start=n):
            self.ids.append(item.id)
            self.rows[item.id] = row
            self.records[item.id] = item
        self._bm25.clear()

    def remove(self, record_id: str) -> Interaction | None:
        row = self.rows.pop(record_id, None)
        if row is None:
            return None
        last = len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            self._vectors[row] = self._vectors[last]
            self._timestamps[row] = self._timestamps[last]
            self._seq[row] = self._seq[last]
            self.ids[row] = moved
            self.rows[moved] = row
        self.ids.pop()
        self.extras.pop(record_id, None)
        self._bm25.clear()
        return self.records.pop(record_id)

    def clear(self) -> None:
        self.__init__(self.dim)

    def scores(self, query_vector: np.ndarray, query_text: str, scorer: str, bm25_idf: str) -> np.ndarray:
        if scorer == "dense":
            return self.vectors @ query_vector
        index = self._bm25.get(bm25_idf)
        if index is None:  # rebuilt lazily after a change: writes stay cheap, and buffers are small
            index = self._bm25[bm25_idf] = BM25Index([self.records[i].text for i in self.ids], idf=bm25_idf)
        return index.scores(query_text)

    def search(
        self,
        query_vector: np.ndarray,
        query_text: str,
        k: int,
        scorer: str = "dense",
        before: float | None = None,
        bm25_idf: str = "okapi",
    ) -> list[tuple[str, float]]:
        """Exact top-`k` as `(record_id, score)`, best first (ties: most recent first)."""
        if not self.ids:
            return []
        scores = np.asarray(self.scores(query_vector, query_text, scorer, bm25_idf))
        if before is not None:
            scores = np.where(self.timestamps < before, scores, -np.inf)
        candidates = np.flatnonzero(scores > -np.inf) if before is not None else np.arange(scores.shape[0])
        k = min(k, candidates.shape[0])
        if k == 0:
            return []
        if k < candidates.shape[0]:  # sort only the rows that can make the top k
            candidates = top_k_candidates(scores, k)
        # Order on (score desc, timestamp desc, write order): recency breaks ties (spring-paper.md, open
        # question 15), and write order keeps the result identical after deletions and save/load round trips.
        order = candidates[np.lexsort((self._seq[candidates], -self._timestamps[candidates], -scores[candidates]))][:k]
        return [(self.ids[row], float(scores[row])) for row in order]


class LocalMemory:
    """One user's memory: a `history` region and a pinned `buffer` region (SPRInG's residual replay buffer).

    History writes deduplicate near-identical records (cosine ≥ `dedup_threshold`) and, past `capacity`, evict the
    **oldest** history record by timestamp (ties: the earliest written). The buffer is never evicted by capacity
    and is replaced only as a whole through [`~LocalMemory.set_buffer`], so a trainer can rewrite it without
    touching the history.

    Args:
        user_id (`str`): the owner.
        dim (`int`): embedding dimension.
        capacity (`int`, *optional*, defaults to 10000): most history records kept; `None` for unbounded.
        dedup_threshold (`float`, *optional*, defaults to 0.98): cosine at or above which a new record counts as
            a duplicate of a stored one; `None` disables deduplication.
        buffer_size (`int`, *optional*, defaults to 50): most records in the pinned buffer (N_max in the paper).
        bm25_idf (`str`, *optional*, defaults to `"okapi"`): IDF variant for BM25 scoring, see [`BM25Index`].
    """

    def __init__(
        self,
        user_id: str,
        dim: int,
        capacity: int | None = 10_000,
        dedup_threshold: float | None = 0.98,
        buffer_size: int = 50,
        bm25_idf: str = "okapi",
    ):
        self.user_id = user_id
        self.dim = dim
        self.capacity = capacity
        self.dedup_threshold = dedup_threshold
        self.buffer_size = buffer_size
        self.bm25_idf = bm25_idf
        self.history = VectorStore(dim)
        self.buffer = VectorStore(dim)
        self._centroid: np.ndarray | None = None
        # An external [`VectorBackend`] (set by [`LoGoMemory`]): dense searches go to it when it serves them, else here.
        self.backend = None

    def __len__(self) -> int:
        return len(self.history)

    def __bool__(self) -> bool:
        # A user's memory exists even when its history is empty (a SPRInG user may hold only a buffer):
        # `if local` must mean "this user has a memory", never "this user has history".
        return True

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.history or record_id in self.buffer

    def find_duplicate(self, vector: np.ndarray) -> str | None:
        """The id of a stored history record near-identical to `vector`, if any."""
        if self.dedup_threshold is None or not len(self.history):
            return None
        sims = self.history.vectors @ vector
        best = int(np.argmax(sims))
        return self.history.ids[best] if sims[best] >= self.dedup_threshold else None

    def add(self, interaction: Interaction, vector: np.ndarray) -> tuple[str, bool, list[Interaction]]:
        """Adds to the history.

        Returns:
            `(id, added, evicted)`: the stored id (the existing one for a duplicate), whether a new record was
            written, and the records evicted to respect `capacity`.
        """
        if interaction.id in self.history:
            raise ValueError(f"`id` {interaction.id!r} is already stored for user {self.user_id!r}.")
        duplicate = self.find_duplicate(vector)
        if duplicate is not None:
            return duplicate, False, []
        evicted = []
        while self.capacity is not None and len(self.history) >= self.capacity:
            oldest = self.history.ids[int(np.argmin(self.history.timestamps))]
            evicted.append(self.history.remove(oldest))
        self.history.add(interaction, vector)
        self._centroid = None
        return interaction.id, True, evicted

    def remove(self, record_id: str) -> bool:
        """Really deletes a record from both regions; returns whether it existed."""
        found = self.history.remove(record_id) is not None
        found = (self.buffer.remove(record_id) is not None) or found
        if found:
            self._centroid = None
        return found

    def set_buffer(
        self, interactions: Sequence[Interaction], vectors: np.ndarray, scores: Sequence[float] | None = None
    ) -> None:
        """Replaces the pinned buffer as a whole (the history is untouched).

        Args:
            interactions (`Sequence[Interaction]`): at most `buffer_size` records, ids unique.
            vectors (`np.ndarray`): their normalised embeddings, shape `(len(interactions), dim)`.
            scores (`Sequence[float]`, *optional*): e.g. the post-update drift scores, stored with each item.
        """
        if len(interactions) > self.buffer_size:
            raise ValueError(
                f"buffer for user {self.user_id!r} got {len(interactions)} items; `buffer_size` is {self.buffer_size}."
            )
        ids = [item.id for item in interactions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"buffer for user {self.user_id!r} has duplicate ids.")
        if scores is not None and len(scores) != len(interactions):
            raise ValueError(f"`scores` has {len(scores)} values for {len(interactions)} buffer items.")
        self.buffer.clear()
        for i, (item, vector) in enumerate(zip(interactions, vectors, strict=True)):
            self.buffer.add(item, vector)
            if scores is not None:
                self.buffer.extras[item.id] = float(scores[i])

    def centroid(self) -> np.ndarray | None:
        """The normalised mean of the history embeddings (the user's vector for community assignment)."""
        if self._centroid is None and len(self.history):
            mean = self.history.vectors.mean(axis=0)
            norm = np.linalg.norm(mean)
            self._centroid = (mean / norm if norm > 0 else mean).astype(np.float32)
        return self._centroid

    def search(
        self,
        query_vector: np.ndarray,
        query_text: str,
        k: int,
        scorer: str = "dense",
        region: str = "all",
        before: float | None = None,
    ) -> list[RetrievedItem]:
        """Exact top-`k` of the chosen region(s), as `source="local"` [`RetrievedItem`]s, best first.

        With `region="all"`, a record present in both regions (a buffer item copied from the history) is returned
        once, with its best score.
        """
        if scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {SCORERS}, got {scorer!r}.")
        if region not in REGIONS:
            raise ValueError(f"`region` must be one of {REGIONS}, got {region!r}.")
        stores = {"history": [self.history], "buffer": [self.buffer], "all": [self.history, self.buffer]}[region]
        stores = [store for store in stores if len(store)]  # an empty buffer costs no search (nor a backend call)
        best: dict[str, tuple[float, VectorStore]] = {}
        for store in stores:
            if scorer == "dense" and serves_searches(self.backend):
                name = "history" if store is self.history else "buffer"
                found = self.backend.search("local", query_vector, k, users=[self.user_id], region=name, before=before)
                found = [(record_id, score) for record_id, score in found if record_id in store]
            else:
                found = store.search(query_vector, query_text, k, scorer, before, self.bm25_idf)
            for record_id, score in found:
                if record_id not in best or score > best[record_id][0]:
                    best[record_id] = (score, store)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], -kv[1][1].records[kv[0]].timestamp))[:k]
        return [
            RetrievedItem(store.records[rid], score, "local", embedding=store.vector(rid))
            for rid, (score, store) in ranked
        ]
