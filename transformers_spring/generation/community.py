"""Community adapters: LoRA adapters trained on the pooled items of a community of users, so that collective knowledge
reaches a new or cold-start user without quoting anyone (the parametric counterpart of LoGo's global memory).

This module holds the routing table, which decoding reads: which community adapters exist, who contributed to each,
and where each sits in embedding space. [`ContinualPersonalizer.train_community_adapters`] trains them; the file
format lives in `persistence/community_files.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from ..utils.validation import check_float, check_int

# Community adapters are named `<prefix><n>`; a user whose adapter name would be one of them is refused.
COMMUNITY_ADAPTER_PREFIX = "__community_"


@dataclasses.dataclass
class CommunityAdapter:
    """One community adapter.

    Args:
        name (`str`): the adapter's name in the model.
        members (`list[str]`): the users whose items trained it, in the order they were pooled.
        centroid (`np.ndarray` of shape `(dim,)`): the normalised mean of the members' item embeddings, where users
            are routed from.
        num_items (`int`): how many items it was trained on.
        initialized (`list[str]`, *optional*): the users whose adapters started from this version of it (what an
            erasure of a member reports: their adapters still carry what they started from).
    """

    name: str
    members: list[str]
    centroid: np.ndarray
    num_items: int
    initialized: list[str] = dataclasses.field(default_factory=list)


class CommunityAdapters:
    """The routing table of a model's community adapters.

    A user without an adapter of their own decodes with the community adapter whose centroid is nearest (cosine) to
    the mean embedding of their memory items, when that cosine is at least `min_similarity`; with no item in the
    memory, or none close enough, they decode with the base model.

    Args:
        min_users (`int`, *optional*, defaults to 3): the fewest contributing users a community adapter may have; one
            that falls below it (users erased) is dropped.
        min_similarity (`float`, *optional*, defaults to 0.0): the lowest cosine at which a user is routed.
        max_items_per_user (`int`, *optional*, defaults to 64): the most (latest) items each member contributes to
            a community adapter's training (None: all); a retrain uses it again.
        adapters (`Sequence[CommunityAdapter]`, *optional*): the adapters.
    """

    def __init__(
        self,
        min_users: int = 3,
        min_similarity: float = 0.0,
        adapters: Sequence[CommunityAdapter] | None = None,
        *,
        max_items_per_user: int | None = 64,
    ):
        self.min_users = check_int(min_users, "min_users", minimum=1)
        self.min_similarity = check_float(min_similarity, "min_similarity", minimum=-1.0, maximum=1.0)
        self.max_items_per_user = check_int(max_items_per_user, "max_items_per_user", minimum=1, optional=True)
        self._adapters: dict[str, CommunityAdapter] = {}
        for adapter in adapters or ():
            self.add(adapter)

    def __len__(self) -> int:
        return len(self._adapters)

    def __iter__(self) -> Iterator[CommunityAdapter]:
        return iter(list(self._adapters.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __getitem__(self, name: str) -> CommunityAdapter:
        return self._adapters[name]

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, adapter: CommunityAdapter) -> None:
        """Adds or replaces an adapter (its centroid is normalised)."""
        centroid = np.asarray(adapter.centroid, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(centroid))
        if not np.isfinite(centroid).all() or norm == 0.0:
            raise ValueError(f"community adapter {adapter.name!r}: `centroid` must be a finite non-zero vector.")
        self._adapters[adapter.name] = dataclasses.replace(
            adapter, centroid=centroid / norm, members=list(adapter.members), initialized=list(adapter.initialized)
        )

    def remove(self, name: str) -> None:
        self._adapters.pop(name, None)

    def contributed(self, user_id: str) -> list[str]:
        """The community adapters `user_id`'s items trained."""
        return [a.name for a in self._adapters.values() if user_id in a.members]

    def next_name(self, taken: Sequence[str] = ()) -> str:
        """A free adapter name, `<prefix><n>` with the smallest n not in use here or in `taken`."""
        used = set(self._adapters) | set(taken)
        return next(
            f"{COMMUNITY_ADAPTER_PREFIX}{n}"
            for n in range(len(used) + 1)
            if f"{COMMUNITY_ADAPTER_PREFIX}{n}" not in used
        )

    def route(self, vector: np.ndarray | None, available: Sequence[str] | None = None) -> str | None:
        """The community adapter for a user whose items' mean embedding is `vector`: the nearest centroid (cosine) at
        or above `min_similarity`, among `available` names when given; None when there is none or no vector."""
        candidates = [a for a in self._adapters.values() if available is None or a.name in available]
        if vector is None or not candidates:
            return None
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        if norm == 0.0 or vector.shape[0] != candidates[0].centroid.shape[0]:
            return None
        scores = np.stack([a.centroid for a in candidates]) @ (vector / norm)
        best = int(np.argmax(scores))
        return candidates[best].name if scores[best] >= self.min_similarity else None
