"""The `personalization=` argument of [`SpringForCausalLM.generate`]."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..records import Interaction, MediatedContext, RetrievedItem
from ..utils.validation import check_choice, check_int
from .config import RETRIEVAL_REGIONS, check_adaptive_weight, check_gate, check_weight
from .copying import check_copy_weight


@dataclass
class Personalization:
    r"""
    Per-call personalization of one row (or of every row, when passed alone).

    Args:
        user (`str`, *optional*):
            The user id. `None` means no personalization for the row.
        query (`str`, *optional*):
            The retrieval query. Defaults to the row's prompt content (decoded, without chat markers).
        weight (`float`, *optional*):
            λ for this call, in `[0, 1]`; overrides the config and the memory's suggestion.
        top_k (`int`, *optional*):
            Number of items to retrieve for this call.
        gate (`float`, *optional*):
            σ for this call: only local retrieved items scored strictly above it are kept (see
            [`SpringConfig.gate`]).
        use_global (`bool`, *optional*):
            Whether the memory may add other users' items for this call.
        history (list of `RetrievedItem`, `Interaction` or `str`, *optional*):
            Explicit history to condition on; skips retrieval (the memory is not queried). An empty list closes the
            gate.
        region (`str`, *optional*):
            Where the user's own items are retrieved from for this call: `"all"`, `"history"` or `"buffer"` (SPRInG's
            residual buffer); see [`SpringConfig.retrieval_region`].
        adapter (`str`, *optional*):
            The LoRA adapter this row decodes with, overriding the user's own (`adapter_name_for(user)`); it must be
            an adapter of the model, or `"__base__"` (peft's name for none) for the base model. For comparisons
            such as a benchmark's baselines.
        retrieval_kwargs (`dict`, *optional*):
            Extra keyword arguments for `memory.retrieve_context`, e.g. `{"before": "2022-01-01"}` (no temporal
            leakage) or `{"region": "buffer"}` (SPRInG's replay buffer only).
        copy_weight (`float`, *optional*):
            μ of the copy path for this call, in `[0, 1)`; overrides [`SpringConfig.copy_weight`].
        adaptive_weight (`float`, *optional*):
            β of the per-token adaptive λ for this call, ≥ 0; overrides [`SpringConfig.adaptive_weight`].
    """

    user: str | None = None
    query: str | None = None
    weight: float | None = None
    top_k: int | None = None
    gate: float | str | None = None
    use_global: bool | None = None
    history: list[RetrievedItem | Interaction | str] | None = field(default=None, repr=False)
    region: str | None = None
    adapter: str | None = None
    retrieval_kwargs: dict[str, Any] | None = None
    copy_weight: float | None = None
    adaptive_weight: float | None = None

    def __post_init__(self):
        if self.user is not None and (not isinstance(self.user, str) or not self.user.strip()):
            raise ValueError(f"`Personalization.user` must be a non-empty str or None, got {self.user!r}.")
        if self.query is not None and not isinstance(self.query, str):
            raise TypeError(f"`Personalization.query` must be a str, got {type(self.query).__name__}.")
        if self.weight is not None:
            self.weight = check_weight(self.weight, "Personalization.weight")
        if self.copy_weight is not None:
            self.copy_weight = check_copy_weight(self.copy_weight, "Personalization.copy_weight")
        if self.adaptive_weight is not None:
            self.adaptive_weight = check_adaptive_weight(self.adaptive_weight, "Personalization.adaptive_weight")
        self.top_k = check_int(self.top_k, "Personalization.top_k", minimum=1, optional=True)
        if self.gate == "auto":  # 0.1's "the memory's gate alone", which None means now (see SpringConfig.gate)
            self.gate = None
        if self.gate is not None:
            self.gate = check_gate(self.gate, "Personalization.gate")
        if self.region is not None:
            check_choice(self.region, "Personalization.region", RETRIEVAL_REGIONS)
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise ValueError(f"`Personalization.adapter` must be a non-empty str or None, got {self.adapter!r}.")
        if self.history is not None:
            if isinstance(self.history, (str, Interaction, RetrievedItem)) or not isinstance(self.history, Sequence):
                raise TypeError("`Personalization.history` must be a list of RetrievedItem, Interaction or str.")
            self.history = list(self.history)
        if self.retrieval_kwargs is not None:
            if not isinstance(self.retrieval_kwargs, dict):
                raise TypeError("`Personalization.retrieval_kwargs` must be a dict.")
            clash = sorted({"user_id", "query", "k", "use_global", "region"} & set(self.retrieval_kwargs))
            if clash:
                raise ValueError(f"`Personalization.retrieval_kwargs` must not set {clash}; use the dedicated fields.")

    @property
    def is_active(self) -> bool:
        return self.user is not None or self.history is not None or self.adapter is not None


@dataclass
class RowPersonalization:
    """What [`SpringForCausalLM.generate`] did for one row (see `SpringForCausalLM.last_personalization`)."""

    user: str | None
    query: str | None = None
    items: list[Any] = field(default_factory=list, repr=False)
    weight: float = 0.0
    adapter: str | None = None
    context: MediatedContext | None = field(default=None, repr=False)
    history_ids: list[int] | None = field(default=None, repr=False)
    # The copy path (generation/copying.py): μ, and the token ids of each copy source (None: no copy path).
    copy_weight: float = 0.0
    copy_sources: list[list[int]] | None = field(default=None, repr=False)
    # β of the per-token adaptive λ (0: λ fixed).
    adaptive_weight: float = 0.0

    @property
    def gate_open(self) -> bool:
        return bool(self.items) and self.weight > 0

    @property
    def copies(self) -> bool:
        """Whether the copy path is mixed into this row (μ > 0 and some copy source)."""
        return self.copy_weight > 0 and bool(self.copy_sources)


def _one(value: Any, where: str) -> Personalization | None:
    if value is None:
        return None
    if isinstance(value, Personalization):
        return value if value.is_active else None
    if isinstance(value, (str, dict)):
        fields = {"user": value} if isinstance(value, str) else value
        known = {f.name for f in dataclasses.fields(Personalization)}
        unknown = sorted(set(fields) - known, key=str)  # `key`: a dict's keys need not all be strs
        if unknown:
            raise TypeError(f"`{where}` has unknown key(s) {unknown}; allowed: {sorted(known)}.")
        try:
            row = Personalization(**fields)
        except (TypeError, ValueError) as err:  # its message names the field; this names the entry
            raise type(err)(f"`{where}`: {err}") from err
        return _one(row, where)
    raise TypeError(
        f"`{where}` must be a user id (str), a Personalization, a dict, None, or a list of those (one per row); got "
        f"{type(value).__name__}."
    )


def normalize_personalization(personalization: Any, batch_size: int) -> list[Personalization | None]:
    """Turns the `personalization=` argument into one entry per row (None = no personalization for that row)."""
    if isinstance(personalization, (list, tuple)):
        if len(personalization) != batch_size:
            raise ValueError(
                f"`personalization` has {len(personalization)} entries but the batch has {batch_size} row(s); pass "
                "one entry per row (None for rows without personalization)."
            )
        return [_one(value, f"personalization[{i}]") for i, value in enumerate(personalization)]
    row = _one(personalization, "personalization")
    return [row] * batch_size
