"""Collective memory: users grouped into communities, and an ANN index over the items they share."""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Sequence

import hnswlib
import numpy as np
from transformers.utils import logging

from ..persistence.memory_files import ANN_CACHE_MIN_ITEMS
from ..utils.ranking import top_k_indices
from ..utils.validation import check_int
from .backends import serves_searches
from .support import DEFAULT_MATCH_THRESHOLD, DEFAULT_MIN_CONTRIBUTORS, ContributorSupport, check_support_rule

logger = logging.get_logger(__name__)

SCOPES = ("own", "all")
try:
    _HNSWLIB_VERSION = importlib.metadata.version("hnswlib")
except importlib.metadata.PackageNotFoundError:  # a source build without metadata
    _HNSWLIB_VERSION = "unknown"


class GlobalMemory:
    """Items shared by users who opted in, grouped by communities of similar users.

    - **User vector**: the normalised mean of the user's shared item embeddings.
    - **Communities**: k-means over user vectors, with k chosen by silhouette score in `[2, max_communities]`
      unless `n_communities` is given. They are recomputed lazily, at the next search, once the set of users has
      changed or the shared items have grown by `recluster_growth` since the last clustering.
    - **Privacy**: an item is served to other users only when at least `min_contributors` distinct users, its
      author included, wrote closely matching content (cosine `>= match_threshold`, see [`ContributorSupport`]): the
      memory hands out shared interests, never one user's unique text, however many (possibly fake) users join the
      author's community. A community feeds retrieval only if it has at least `min_community_users` distinct users,
      and a user never gets their own items back.
    - **Search**: a query goes to the user's community (`scope="own"`; a user outside any community — cold start,
      opted out, or in a community too small to share — goes to the eligible community nearest to their vector,
      or to the query) or to every eligible community (`scope="all"`). An hnswlib index over all shared items is
      queried with enough oversampling to survive the community/user/time filter; when the candidate set is small
      (≤ `exact_below`) or the filtered ANN result is short, exact search over the candidates answers instead.
    - **Deletion** marks the item deleted in hnswlib; the index is rebuilt once tombstones exceed
      `rebuild_tombstone_ratio` of it. The index is a cache: [`LoGoMemory`] rebuilds it from embeddings on load.

    Not thread-safe on its own: [`LoGoMemory`] serialises access.

    Args:
        dim (`int`): embedding dimension.
        min_community_users (`int`, *optional*, defaults to 5): smallest community allowed to feed retrieval.
        min_contributors (`int`, *optional*, defaults to 3): distinct users, the author included, whose closely
            matching content an item needs before it is served (1 turns the rule off).
        match_threshold (`float`, *optional*, defaults to 0.75): the cosine at which two users' items match.
        max_matches (`int`, *optional*, defaults to 32): above `exact_match_below` items, the nearest items of
            *other* users examined for matches of a new item (the ANN query asks for this many plus the author's own
            item count, capped at 1024; a miss can only withhold an item, never serve one).
        exact_match_below (`int`, *optional*, defaults to 20000): memory size up to which matches are found by an
            exact (blocked) matrix product.
        n_communities (`int`, *optional*): a fixed number of communities instead of the silhouette choice.
        max_communities (`int`, *optional*, defaults to 10): upper end of the silhouette search.
        recluster_growth (`float`, *optional*, defaults to 0.25): relative growth of shared items that marks
            the communities stale.
        M (`int`, *optional*, defaults to 16), ef_construction (`int`, *optional*, defaults to 200),
        ef (`int`, *optional*, defaults to 64): hnswlib parameters (`ef` is re-applied after every (re)build,
            since hnswlib does not persist it).
        exact_below (`int`, *optional*, defaults to 2048): candidate-set size up to which search is exact.
        rebuild_tombstone_ratio (`float`, *optional*, defaults to 0.2): deleted fraction that triggers a rebuild.
        seed (`int`, *optional*, defaults to 0): seed for hnswlib and k-means.
        num_threads (`int`, *optional*, defaults to 1): hnswlib insertion threads (1 keeps builds deterministic).
    """

    def __init__(
        self,
        dim: int,
        *,
        min_community_users: int = 5,
        min_contributors: int = DEFAULT_MIN_CONTRIBUTORS,
        match_threshold: float = DEFAULT_MATCH_THRESHOLD,
        max_matches: int = 32,
        exact_match_below: int = 20_000,
        n_communities: int | None = None,
        max_communities: int = 10,
        recluster_growth: float = 0.25,
        M: int = 16,
        ef_construction: int = 200,
        ef: int = 64,
        exact_below: int = 2048,
        rebuild_tombstone_ratio: float = 0.2,
        seed: int = 0,
        num_threads: int = 1,
    ):
        min_community_users = check_int(min_community_users, "min_community_users", minimum=1)
        n_communities = check_int(n_communities, "n_communities", minimum=1, optional=True)
        check_support_rule(min_contributors, match_threshold, max_matches)
        self.dim = dim
        self.min_community_users = min_community_users
        self.n_communities = n_communities
        self.max_communities = max_communities
        self.recluster_growth = recluster_growth
        self.M, self.ef_construction, self.ef = M, ef_construction, ef
        self.exact_below = exact_below
        self.rebuild_tombstone_ratio = rebuild_tombstone_ratio
        self.seed = seed
        self.num_threads = num_threads
        self.max_matches = int(max_matches)
        self.exact_match_below = check_int(exact_match_below, "exact_match_below", minimum=0)
        self.support = ContributorSupport(min_contributors, match_threshold)

        self._vectors = np.empty((64, dim), dtype=np.float32)
        self._row_user = np.empty(64, dtype=np.int64)
        self._row_ts = np.empty(64, dtype=np.float64)
        self._row_label = np.empty(64, dtype=np.int64)
        self._row_backers = np.zeros(64, dtype=np.int64)  # distinct other users with a matching item
        self._n = 0
        self._label_row = np.full(64, -1, dtype=np.int64)  # label -> row, -1 when absent
        self._users: list[str | None] = []  # user index -> id (None once forgotten; indices are never reused)
        self._user_index: dict[str, int] = {}
        self._user_count = np.zeros(16, dtype=np.int64)
        self._user_servable = np.zeros(16, dtype=np.int64)  # per user: items that may be served to others

        self._index: hnswlib.Index | None = None
        self._tombstones = 0
        self._unlinked = False  # items were added with the rule off, so their matches were never searched
        # An external [`VectorBackend`] (set by [`LoGoMemory`]): ANN searches go to it when it serves them, else here.
        self.backend = None

        self._user_community = np.full(16, -1, dtype=np.int64)
        self._centroids = np.empty((0, dim), dtype=np.float32)
        self._community_sizes = np.empty(0, dtype=np.int64)
        self._clustered_items = 0
        self._stale = True

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return self._n

    def __contains__(self, label: int) -> bool:
        return 0 <= label < self._label_row.shape[0] and self._label_row[label] >= 0

    @property
    def users(self) -> list[str]:
        return [u for u, i in self._user_index.items() if self._user_count[i] > 0]

    def _user_slot(self, user_id: str) -> int:
        index = self._user_index.get(user_id)
        if index is None:
            index = self._user_index[user_id] = len(self._users)
            self._users.append(user_id)
            if index >= self._user_count.shape[0]:
                grow = self._user_count.shape[0]
                self._user_count = np.concatenate([self._user_count, np.zeros(grow, dtype=np.int64)])
                self._user_servable = np.concatenate([self._user_servable, np.zeros(grow, dtype=np.int64)])
                self._user_community = np.concatenate([self._user_community, np.full(grow, -1, dtype=np.int64)])
            self._stale = True
        return index

    def _reserve(self, extra: int, max_label: int) -> None:
        need = self._n + extra
        if need > self._vectors.shape[0]:
            size = max(need, 2 * self._vectors.shape[0])
            # Only the live rows are copied: np.resize would also fill the new rows, a full extra pass at 100k.
            for name in ("_vectors", "_row_user", "_row_ts", "_row_label", "_row_backers"):
                old = getattr(self, name)
                grown = np.empty((size,) + old.shape[1:], dtype=old.dtype)
                grown[: self._n] = old[: self._n]
                setattr(self, name, grown)
        if max_label >= self._label_row.shape[0]:
            size = max(max_label + 1, 2 * self._label_row.shape[0])
            grown = np.full(size, -1, dtype=np.int64)
            grown[: self._label_row.shape[0]] = self._label_row
            self._label_row = grown
        if self._index is not None and self._index.get_current_count() + extra > self._index.get_max_elements():
            self._index.resize_index(max(self._index.get_current_count() + extra, 2 * self._index.get_max_elements()))

    def add(
        self, labels: Sequence[int], user_ids: Sequence[str], vectors: np.ndarray, timestamps: Sequence[float]
    ) -> None:
        """Adds shared items (normalised vectors) under integer `labels` unique across the memory."""
        rows = self._append(labels, user_ids, vectors, timestamps)
        if rows is not None:
            self._link_matches(rows)

    def _append(self, labels, user_ids, vectors, timestamps, indexed: bool = False) -> np.ndarray | None:
        """Stores the items and indexes them (unless the index already holds them); returns their rows."""
        labels = np.asarray(labels, dtype=np.int64)
        if not labels.size:
            return None
        known = labels[labels < self._label_row.shape[0]]
        if labels.min() < 0 or np.unique(labels).size < labels.size or (self._label_row[known] >= 0).any():
            raise ValueError("global labels must be new non-negative integers.")
        self._reserve(labels.size, int(labels.max()))
        rows = np.arange(self._n, self._n + labels.size)
        self._vectors[rows] = vectors
        self._row_ts[rows] = timestamps
        self._row_label[rows] = labels
        self._row_user[rows] = [self._user_slot(u) for u in user_ids]
        np.add.at(self._user_count, self._row_user[rows], 1)
        self._label_row[labels] = rows
        self._n += labels.size
        if self._index is None:
            # With a backend that answers searches, the index here is built when matching needs it.
            if not serves_searches(self.backend):
                self._build_index()
        elif not indexed:
            self._index.add_items(self._vectors[rows], labels, num_threads=self.num_threads)
        self._row_backers[rows] = 0
        self.support.register_many(labels.tolist(), self._row_user[rows].tolist())
        if self.support.needed == 0:
            np.add.at(self._user_servable, self._row_user[rows], 1)
        if self._n > self._clustered_items * (1 + self.recluster_growth):
            self._stale = True
        return rows

    def restore(
        self,
        labels: Sequence[int],
        user_ids: Sequence[str],
        vectors: np.ndarray,
        timestamps: Sequence[float],
        *,
        index: hnswlib.Index | None = None,
        matches: np.ndarray | None = None,
    ) -> None:
        """Fills an empty memory from a save: [`~GlobalMemory.add`], except that a cached ANN `index` over exactly
        these labels (see [`~persistence.memory_files.read_ann_index`]) replaces the build, and saved `matches`
        (label pairs) replace the match search. Each saved match is confirmed with its exact cosine, so an edited
        file can withhold an item but never make one servable.

        Args:
            labels, user_ids, vectors, timestamps: as for [`~GlobalMemory.add`].
            index (`hnswlib.Index`, *optional*): a cached index holding exactly `labels`.
            matches (`np.ndarray`, *optional*): saved `(label, label)` matches, shape `(n, 2)`; None searches them.
        """
        if self._n:
            raise RuntimeError("restore() fills an empty GlobalMemory.")
        if index is not None:
            index.set_ef(self.ef)
            self._index = index
        rows = self._append(labels, user_ids, vectors, timestamps, indexed=index is not None)
        if rows is None:
            return
        if matches is None:
            self._link_matches(rows)
            return
        if not len(matches):
            return
        pair_rows = self._label_row[matches]
        cosines = np.einsum("ij,ij->i", self._vectors[pair_rows[:, 0]], self._vectors[pair_rows[:, 1]])
        changed: list[int] = []
        for a, b in matches[cosines >= self.support.match_threshold].tolist():
            changed += self.support.link(a, b)
        self._update_backers(changed)

    def match_pairs(self) -> np.ndarray | None:
        """Every match of the sharing rule as a `(label, label)` pair, each pair once: what a save records so that a
        load need not search for them again. None when items were added with the rule off (their matches were never
        searched, so a load with the rule on must search them)."""
        if self._unlinked:
            return None
        return np.asarray(self.support.pairs(), dtype=np.int64).reshape(-1, 2)

    def ann_params(self) -> dict:
        """What the ANN index's structure depends on (a cached index is reused only under the same values)."""
        return {"space": "cosine", "dim": self.dim, "M": self.M, "ef_construction": self.ef_construction,
                "seed": self.seed, "hnswlib": _HNSWLIB_VERSION}  # fmt: skip

    def cacheable_index(self) -> hnswlib.Index | None:
        """The live index when it may be cached: big enough to be worth it, and without tombstones (a deleted or
        forgotten item's vector must not outlive it in a file)."""
        if self._index is None or self._tombstones or self._n < ANN_CACHE_MIN_ITEMS:
            return None
        return self._index

    def remove(self, labels: Sequence[int]) -> int:
        """Deletes items by label; returns how many existed."""
        removed = 0
        for label in labels:
            if label not in self:
                continue
            row = int(self._label_row[label])
            user = int(self._row_user[row])
            if self._row_backers[row] >= self.support.needed:
                self._user_servable[user] -= 1
            changed = self.support.unregister(int(label))
            self._user_count[user] -= 1
            if self._user_count[user] == 0:
                self._stale = True
            last = self._n - 1
            if row != last:  # swap-remove keeps the live rows contiguous
                for name in ("_vectors", "_row_user", "_row_ts", "_row_label", "_row_backers"):
                    array = getattr(self, name)
                    array[row] = array[last]
                self._label_row[self._row_label[row]] = row
            self._label_row[label] = -1
            self._n -= 1
            if self._index is not None:
                self._index.mark_deleted(int(label))
                self._tombstones += 1
            removed += 1
            self._update_backers(changed)
        if self._index is not None and self._tombstones > self.rebuild_tombstone_ratio * (self._n + self._tombstones):
            self._build_index()
        return removed

    def forget(self, user_id: str) -> int:
        """Removes every item of `user_id` and the user itself from the user table, so the id is in no later
        state or save. Returns how many items were removed. (The user's index slot stays, empty and nameless:
        indices are never reused within a session.)"""
        removed = self.remove(self.user_labels(user_id))
        index = self._user_index.pop(user_id, None)
        if index is not None:
            self._users[index] = None
            self._user_community[index] = -1
            self._stale = True
        return removed

    def user_labels(self, user_id: str) -> list[int]:
        index = self._user_index.get(user_id)
        if index is None:
            return []
        return self._row_label[: self._n][self._row_user[: self._n] == index].tolist()

    # ---------------------------------------------------------------- sharing rule
    @property
    def min_contributors(self) -> int:
        return self.support.min_contributors

    @property
    def match_threshold(self) -> float:
        return self.support.match_threshold

    def set_support_rule(self, min_contributors: int | None = None, match_threshold: float | None = None) -> None:
        """Changes the sharing rule in place: a new `match_threshold` recomputes every match, a new
        `min_contributors` only recounts which items may be served."""
        k = self.support.min_contributors if min_contributors is None else min_contributors
        tau = self.support.match_threshold if match_threshold is None else match_threshold
        check_support_rule(k, tau)
        if float(tau) != self.support.match_threshold or (self._unlinked and int(k) > 1):
            self._unlinked = False
            self.support = ContributorSupport(k, tau)
            rows = np.arange(self._n)
            self._row_backers[rows] = 0
            for row in rows.tolist():
                self.support.register(int(self._row_label[row]), int(self._row_user[row]))
            self._link_matches(rows)
        self.support.min_contributors = int(k)
        self._recount_servable()

    def _recount_servable(self) -> None:
        servable = self._row_backers[: self._n] >= self.support.needed
        self._user_servable[:] = 0
        np.add.at(self._user_servable, self._row_user[: self._n][servable], 1)

    def is_servable(self, label: int) -> bool:
        """Whether the item may be served to other users under the sharing rule (see [`ContributorSupport`])."""
        return label in self and bool(self._row_backers[self._label_row[label]] >= self.support.needed)

    def _link_matches(self, rows: np.ndarray) -> None:
        """Finds the items of other users that match the new `rows` (cosine >= `match_threshold`) and links them:
        exactly up to `exact_match_below` items, else among each new item's ANN neighbours (`max_matches` plus the
        author's own item count, so a prolific author's own items do not crowd out other users')."""
        if not len(rows):
            return
        if self.support.needed == 0:  # the rule is off: matches decide nothing (set_support_rule finds them if needed)
            self._unlinked = True
            return
        tau, n = self.support.match_threshold, self._n
        changed: list[int] = []
        queries = self._vectors[rows]
        if n <= self.exact_match_below:
            for start in range(0, len(rows), 1024):
                block = rows[start : start + 1024]
                scores = queries[start : start + 1024] @ self._vectors[:n].T
                for i, j in zip(*np.nonzero(scores >= tau), strict=True):
                    changed += self.support.link(int(self._row_label[block[i]]), int(self._row_label[j]))
        else:
            if self._index is None:
                self._build_index()
            own = int(self._user_count[self._row_user[rows]].max())
            want = min(self.max_matches + own, 1024, n)
            if want > self.ef:
                self._index.set_ef(want)
            try:
                labels, distances = self._index.knn_query(queries, k=want, num_threads=max(self.num_threads, 1))
            except RuntimeError:  # hnswlib could not return `want` live items (tombstones): match exactly instead
                saved, self.exact_match_below = self.exact_match_below, n
                try:
                    self._link_matches(rows)
                finally:
                    self.exact_match_below = saved
                return
            finally:
                if want > self.ef:
                    self._index.set_ef(self.ef)
            for i, row in enumerate(rows.tolist()):
                own = int(self._row_label[row])
                for label in labels[i][1.0 - distances[i] >= tau - 1e-6].tolist():
                    other = self._label_row[label]
                    # hnswlib's distance is float32 arithmetic: confirm each match with the exact cosine.
                    if other >= 0 and float(self._vectors[other] @ self._vectors[row]) >= tau:
                        changed += self.support.link(own, int(label))
        self._update_backers(changed)

    def _update_backers(self, labels: list[int]) -> None:
        needed = self.support.needed
        for label in set(labels):
            row = self._label_row[label] if 0 <= label < self._label_row.shape[0] else -1
            if row < 0:
                continue
            old, new = int(self._row_backers[row]), self.support.backers(label)
            self._row_backers[row] = new
            if (old >= needed) != (new >= needed):
                self._user_servable[self._row_user[row]] += 1 if new >= needed else -1

    def _build_index(self) -> None:
        """(Re)builds the hnswlib index from the live vectors: after load, and once tombstones pile up."""
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.init_index(
            max_elements=max(1024, 2 * self._n), M=self.M, ef_construction=self.ef_construction, random_seed=self.seed
        )
        if self._n:
            index.add_items(self._vectors[: self._n], self._row_label[: self._n], num_threads=self.num_threads)
        index.set_ef(self.ef)
        self._index = index
        self._tombstones = 0

    # ------------------------------------------------------------ communities
    def user_vector(self, user_id: str) -> np.ndarray | None:
        index = self._user_index.get(user_id)
        if index is None or self._user_count[index] == 0:
            return None
        return self._user_vectors(np.array([index]))[0]

    def _user_vectors(self, user_indices: np.ndarray) -> np.ndarray:
        rows_user = self._row_user[: self._n]
        # Rows in label order, so the mean is bit-identical after a save/load round trip.
        order = np.argsort(self._row_label[: self._n], kind="stable")
        out = np.zeros((len(user_indices), self.dim), dtype=np.float64)
        position = {int(u): i for i, u in enumerate(user_indices)}
        sorted_users = rows_user[order]
        for user, i in position.items():
            out[i] = self._vectors[order[sorted_users == user]].astype(np.float64).mean(axis=0)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def recluster(self) -> None:
        """Recomputes communities from the current user vectors (k-means, k by silhouette unless fixed)."""
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        active = np.flatnonzero(self._user_count[: len(self._users)] > 0)
        self._user_community[:] = -1
        self._clustered_items, self._stale = self._n, False
        if active.size == 0:
            self._centroids = np.empty((0, self.dim), dtype=np.float32)
            self._community_sizes = np.empty(0, dtype=np.int64)
            return
        vectors = self._user_vectors(active)
        n_distinct = np.unique(vectors.round(6), axis=0).shape[0]
        if self.n_communities is not None:
            candidates = [min(self.n_communities, n_distinct)]
        else:
            candidates = list(range(2, min(self.max_communities, n_distinct - 1) + 1)) or [1]
        best_labels, best_score = np.zeros(active.size, dtype=np.int64), -np.inf
        for k in candidates:
            if k == 1:
                break
            labels = KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit_predict(vectors)
            if len(candidates) == 1:
                best_labels = labels
                break
            sample = min(active.size, 2000)  # silhouette is quadratic; a fixed sample keeps reclustering bounded
            score = silhouette_score(vectors, labels, sample_size=sample, random_state=self.seed)
            if score > best_score:
                best_labels, best_score = labels, score
        n_comm = int(best_labels.max()) + 1
        self._user_community[active] = best_labels
        self._community_sizes = np.bincount(best_labels, minlength=n_comm)
        centroids = np.stack([vectors[best_labels == c].mean(axis=0) for c in range(n_comm)])
        self._centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float32)
        logger.info("global memory: %d users in %d communities (sizes %s)", active.size, n_comm, self._community_sizes)

    def community_of(self, user_id: str) -> int | None:
        if self._stale:
            self.recluster()
        index = self._user_index.get(user_id)
        if index is None or self._user_community[index] < 0:
            return None
        return int(self._user_community[index])

    def communities(self) -> dict[int, list[str]]:
        """Community id -> member user ids (reclustering first if stale)."""
        if self._stale:
            self.recluster()
        out: dict[int, list[str]] = {}
        for user, index in self._user_index.items():
            community = int(self._user_community[index])
            if community >= 0:
                out.setdefault(community, []).append(user)
        return out

    @property
    def eligible_communities(self) -> np.ndarray:
        if self._stale:
            self.recluster()
        return np.flatnonzero(self._community_sizes >= self.min_community_users)

    def _target_communities(self, query: np.ndarray, user_id: str | None, user_vector, scope: str) -> np.ndarray:
        eligible = self.eligible_communities
        if scope == "all" or eligible.size == 0:
            return eligible
        own = self.community_of(user_id) if user_id is not None else None
        if own is not None and own in eligible:
            return np.array([own])
        # Cold start, opted out, or own community too small: the nearest eligible community.
        probe = user_vector if user_vector is not None else query
        return eligible[[int(np.argmax(self._centroids[eligible] @ probe))]]

    # ----------------------------------------------------------------- search
    def search(
        self,
        query: np.ndarray,
        k: int,
        *,
        user_id: str | None = None,
        user_vector: np.ndarray | None = None,
        before: float | None = None,
        scope: str = "own",
    ) -> list[tuple[int, float]]:
        """Top-`k` shared items from other users in the target communities, as `(label, cosine)`, best first."""
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        if self._n == 0:
            return []
        communities = self._target_communities(query, user_id, user_vector, scope)
        if communities.size == 0:
            return []
        own = self._user_index.get(user_id, -1) if user_id is not None else -1
        if before is None:
            # Candidate count from per-user counts: no pass over all rows on the ANN path.
            in_scope = np.isin(self._user_community[: len(self._users)], communities)
            if own >= 0:
                in_scope[own] = False
            n_candidates = int(self._user_servable[: len(self._users)][in_scope].sum())
            row_ok = None
        else:
            row_ok = self._row_mask(communities, own, before)
            if self.support.needed:  # backed by content written before the query time, not by later content
                timestamp = self._label_timestamp
                for row in np.flatnonzero(row_ok).tolist():
                    label = int(self._row_label[row])
                    if self.support.backers_before(label, timestamp, before) < self.support.needed:
                        row_ok[row] = False
            n_candidates = int(row_ok.sum())
        if n_candidates == 0:
            return []
        k = min(k, n_candidates)
        if n_candidates > self.exact_below:
            hits = self._ann_search(query, k, communities, own, row_ok, n_candidates, before)
            if hits is not None:
                return hits
        if row_ok is None:
            row_ok = self._row_mask(communities, own, before)
        rows = np.flatnonzero(row_ok)
        rows = rows[np.argsort(self._row_label[rows], kind="stable")]  # ties go to the earliest write
        scores = self._vectors[rows] @ query
        best = top_k_indices(scores, k)
        return [(int(self._row_label[rows[i]]), float(scores[i])) for i in best]

    def _row_mask(self, communities: np.ndarray, own: int, before: float | None, rows=None) -> np.ndarray:
        """Which rows (all live rows, or `rows`) may answer: in scope, not the asker's, servable, early enough."""
        rows = np.arange(self._n) if rows is None else rows
        users = self._row_user[rows]
        ok = np.isin(self._user_community[users], communities) & (users != own)
        ok &= self._row_backers[rows] >= self.support.needed
        if before is not None:
            ok &= self._row_ts[rows] < before
        return ok

    def _label_timestamp(self, label: int) -> float:
        return float(self._row_ts[self._label_row[label]])

    def _backend_search(self, query, k, communities, own, row_ok, before):
        # The backend filters on the users in scope and the time; the sharing rule is checked here, on an oversample
        # by the servable fraction of those users' items.
        active = self._user_count[: len(self._users)] > 0
        in_scope = active & np.isin(self._user_community[: len(self._users)], communities)
        if own >= 0:
            in_scope[own] = False
        members = np.flatnonzero(in_scope)
        total = int(self._user_count[members].sum())
        servable = max(int(self._user_servable[members].sum()), 1)
        want = min(total, math.ceil(2 * k * total / servable) + 8)
        # The shorter filter: the users in scope, or every other user with items (Milvus evaluates the list per row).
        outside = np.flatnonzero(active & ~in_scope)
        if len(outside) < len(members):
            names = [self._users[i] for i in outside.tolist() if self._users[i] is not None]
            found = self.backend.search("global", query, want, exclude_users=names, before=before)
        else:
            names = [self._users[i] for i in members.tolist() if self._users[i] is not None]
            found = self.backend.search("global", query, want, users=names, before=before)
        labels = np.asarray([label for label, _ in found if label in self], dtype=np.int64)
        if not labels.size:
            return None
        scores = {label: score for label, score in found}
        rows = self._label_row[labels]
        keep = row_ok[rows] if row_ok is not None else self._row_mask(communities, own, None, rows)
        if int(keep.sum()) < k:
            return None
        return [(int(label), float(scores[int(label)])) for label in labels[keep][:k]]

    def _ann_search(self, query, k, communities, own, row_ok, n_candidates, before=None):
        if serves_searches(self.backend):
            return self._backend_search(query, k, communities, own, row_ok, before)
        # Oversample by the inverse candidate fraction (x2 margin) so the post-filter still leaves k hits. A query far
        # from the scope's items can still come back short: one wider search (x4) costs far less than the exact
        # path's gather of every row in scope, which answers only when that is short too.
        want = min(self._n, math.ceil(2 * k * self._n / n_candidates) + 8)
        for _ in range(2):  # the oversample, then one 4x wider
            try:
                if want > self.ef:
                    self._index.set_ef(want)
                labels, distances = self._index.knn_query(query, k=want, num_threads=1)
            except RuntimeError:  # "contiguous 2D array": ef/M too small for this k; the exact path answers
                return None
            finally:
                if want > self.ef:
                    self._index.set_ef(self.ef)
            labels, distances = labels[0].astype(np.int64), distances[0]
            rows = self._label_row[labels]
            keep = row_ok[rows] if row_ok is not None else self._row_mask(communities, own, None, rows)
            if int(keep.sum()) >= k:
                labels, scores = labels[keep][:k], 1.0 - distances[keep][:k]
                return [(int(label), float(score)) for label, score in zip(labels, scores, strict=True)]
            if want >= self._n // 4:  # a wider search would cost as much as the exact one
                return None
            want = min(self._n, 4 * want)
        return None

    # ------------------------------------------------------------ persistence
    def community_state(self) -> dict:
        """What to persist so a reloaded memory makes the same community decisions."""
        return {
            "user_community": {u: int(self._user_community[i]) for u, i in self._user_index.items()},
            "centroids": self._centroids.copy(),
            "sizes": self._community_sizes.tolist(),
            "clustered_items": self._clustered_items,
            "stale": self._stale,
        }

    def load_community_state(self, state: dict) -> None:
        self._user_community[:] = -1
        for user, community in state["user_community"].items():
            if user in self._user_index:
                self._user_community[self._user_index[user]] = community
        self._centroids = np.asarray(state["centroids"], dtype=np.float32).reshape(-1, self.dim)
        self._community_sizes = np.asarray(state["sizes"], dtype=np.int64)
        self._clustered_items = int(state["clustered_items"])
        self._stale = bool(state["stale"])
