"""The mediator: reconciles a user's own (local) evidence with the community's (global) evidence.

This is `transformers_spring`'s design, not LoGo's published method (its details are not public).
"""

from __future__ import annotations

import math

import numpy as np

from ..persistence.registry import ClassRegistry
from ..records import MediatedContext, RetrievedItem


class Mediator:
    """The default, LLM-free weighting mediator. Subclass it and override [`~Mediator.mediate`] to replace it.

    The rule, for a user with `n` local history items, gated local hits `L` and global hits `G`, asked for `k`:

    1. **Trust in local evidence**: `w = n / (n + kappa)`.
    2. **Cold start** — `n < min_local_items`, or no local hit passed the gate: the context is `L` followed by the
       best of `G` up to `k` items (lean on the community).
    3. **Otherwise** the global share is `floor(k * (1 - w))` slots (strong local history leaves little room).
       When local evidence is **strong** (`n >= strong_local_items`), global items that **conflict** with it —
       cosine below `conflict_threshold` to every local hit — are dropped first. Local hits take the other
       slots; slots neither side can fill stay empty or go to the other side.
    4. **Suggested λ** for dual-path decoding: `local_weight` when the context holds a local item, `global_weight`
       when it is global-only (another user's history is weaker evidence of this user's preferences), 0 when empty.

    Args:
        kappa (`float`, *optional*, defaults to 20.0): history size at which local and global are trusted equally.
        min_local_items (`int`, *optional*, defaults to 5): below this many history items a user is cold-start.
        strong_local_items (`int`, *optional*, defaults to 20): from this many items, local evidence can veto.
        conflict_threshold (`float`, *optional*, defaults to 0.2): cosine under which a global item conflicts.
        local_weight (`float`, *optional*, defaults to 0.5): suggested λ with local context (the paper's λ).
        global_weight (`float`, *optional*, defaults to 0.25): suggested λ with global-only context.
    """

    def __init__(
        self,
        kappa: float = 20.0,
        min_local_items: int = 5,
        strong_local_items: int = 20,
        conflict_threshold: float = 0.2,
        local_weight: float = 0.5,
        global_weight: float = 0.25,
    ):
        for name, value in (("local_weight", local_weight), ("global_weight", global_weight)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
        if kappa <= 0:
            raise ValueError(f"`kappa` must be > 0, got {kappa}.")
        self.kappa = kappa
        self.min_local_items = min_local_items
        self.strong_local_items = strong_local_items
        self.conflict_threshold = conflict_threshold
        self.local_weight = local_weight
        self.global_weight = global_weight

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MEDIATORS.register(cls)  # a saved memory reloads with the mediator class it was saved with

    def config(self) -> dict:
        return {
            "kappa": self.kappa,
            "min_local_items": self.min_local_items,
            "strong_local_items": self.strong_local_items,
            "conflict_threshold": self.conflict_threshold,
            "local_weight": self.local_weight,
            "global_weight": self.global_weight,
        }

    def _conflicts(self, item: RetrievedItem, local_hits: list[RetrievedItem]) -> bool:
        local = [hit.embedding for hit in local_hits if hit.embedding is not None]
        if item.embedding is None or not local:
            return False
        return float(np.max(np.stack(local) @ item.embedding)) < self.conflict_threshold

    def mediate(
        self, local_hits: list[RetrievedItem], global_hits: list[RetrievedItem], n_local: int, k: int
    ) -> MediatedContext:
        """Builds the context from gated local hits and global hits (both best first).

        Args:
            local_hits (`list[RetrievedItem]`): the user's hits that passed the relevance gate.
            global_hits (`list[RetrievedItem]`): hits from other users' shared items.
            n_local (`int`): the size of the user's local history.
            k (`int`): the most items the context may hold.
        """
        trust = n_local / (n_local + self.kappa)
        cold = n_local < self.min_local_items or not local_hits
        dropped: list[RetrievedItem] = []
        if cold:
            items = (local_hits + global_hits)[:k]
        else:
            usable = global_hits
            if n_local >= self.strong_local_items:
                conflicting = [self._conflicts(g, local_hits) for g in global_hits]
                usable = [g for g, bad in zip(global_hits, conflicting, strict=True) if not bad]
                dropped = [g for g, bad in zip(global_hits, conflicting, strict=True) if bad]
            local_part = local_hits[: k - min(math.floor(k * (1.0 - trust)), len(usable))]
            items = local_part + usable[: k - len(local_part)]
        if not items:
            weight = 0.0
        elif any(item.source == "local" for item in items):
            weight = self.local_weight
        else:
            weight = self.global_weight
        return MediatedContext(
            items=items,
            weight=weight,
            cold_start=cold,
            local_hits=list(local_hits),
            global_hits=list(global_hits),
            dropped=dropped,
        )


MEDIATORS = ClassRegistry(Mediator, "mediator")
