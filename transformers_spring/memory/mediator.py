"""The mediator: reconciles a user's own (local) evidence with the community's (global) evidence.

This is `transformers_spring`'s design, not LoGo's published method (its details are not public).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..persistence.registry import ClassRegistry
from ..records import MediatedContext, RetrievedItem
from ..utils.validation import check_float, check_int


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
            check_float(value, name, minimum=0.0, maximum=1.0)
        check_float(kappa, "kappa", minimum=0.0, min_inclusive=False)
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


@dataclass
class MediatorExample:
    """One validation query for [`CalibratedMediator.fit`]: the features the mediator sees at retrieval time and the
    gold response's per-token NLL under every context and weight it could choose.

    Args:
        n_local (`int`): the size of the user's local history.
        has_local (`bool`): whether a local hit passed the relevance gate.
        agreement (`float`, *optional*): the best cosine between the top global hit and the gated local hits (`None`
            when either side is empty).
        nll (`np.ndarray` of shape `(max_slots + 1, len(weights))`): `nll[g, j]`, the mean per-token NLL with the
            context `local[: k - g] + global[: g]` and λ = `weights[j]` (a context that is empty scores the
            parametric path alone, whatever λ).
    """

    n_local: int
    has_local: bool
    agreement: float | None
    nll: np.ndarray
    has_global: bool = True


class CalibratedMediator(Mediator):
    """A mediator whose choices were fitted on validation queries (never test ones): from the features it already
    has, it picks how many of the `k` context slots go to global hits and the interpolation weight λ.

    Features: the local history size (binned by `count_edges`), whether a local hit passed the gate, and whether the
    top global hit **agrees** with the local hits (best cosine `>= agreement_threshold`) or **conflicts** with them.
    `rules` maps a feature cell to `[global_slots, weight]`; a cell the validation data left too thin falls back to
    a coarser one (`n<bin>|l<local>|a<agree>` → `n<bin>|l<local>` → `n<bin>` → `*`), and with no rule at all to the
    default [`Mediator`]'s. The context is `local[: k - global_slots] + global[: global_slots]`.

    Build one with [`CalibratedMediator.fit`]; it is saved with the memory (`config.json`, field `mediator`) and
    reloads with it.

    Args:
        rules (`dict[str, list]`, *optional*): cell -> `[global_slots, weight]`.
        count_edges (`Sequence[int]`, *optional*, defaults to `(1, 3, 6, 21)`): history-size bins
            (`[0, 1), [1, 3), ..., [21, inf)`).
        agreement_threshold (`float`, *optional*, defaults to 0.4): cosine from which global agrees with local.
        fit_counts (`dict[str, int]`, *optional*): validation examples per cell when fitted (kept for inspection).
        fit_gains (`dict[str, list]`, *optional*): per fitted cell, the best choice's mean validation NLL gain over
            the local decision and its one-sided lower confidence bound (kept for inspection).
        kwargs: the default [`Mediator`]'s settings, used where no rule applies.
    """

    def __init__(
        self,
        rules: dict[str, Sequence] | None = None,
        count_edges: Sequence[int] = (1, 3, 6, 21),
        agreement_threshold: float = 0.4,
        fit_counts: dict[str, int] | None = None,
        fit_gains: dict[str, Sequence[float]] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.fit_counts = dict(fit_counts or {})  # validation examples per cell, as fitted (a diagnostic)
        self.fit_gains = {}
        for cell, gain in (fit_gains or {}).items():
            numbers = isinstance(gain, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in gain
            )
            if not isinstance(cell, str) or not numbers or len(gain) != 2:
                raise ValueError(f"`fit_gains[{cell!r}]` must be [mean gain, lower bound] (finite numbers).")
            self.fit_gains[cell] = [float(v) for v in gain]
        edges = list(count_edges)
        bad = any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1 for e in edges)
        if not edges or bad or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"`count_edges` must be increasing positive ints, got {count_edges!r}.")
        self.count_edges = [int(e) for e in edges]
        self.agreement_threshold = check_float(
            agreement_threshold, "agreement_threshold", minimum=-1.0, maximum=1.0, hint="a cosine"
        )
        self.rules: dict[str, list] = {}
        for key, value in (rules or {}).items():
            if not isinstance(key, str) or not _RULE_KEY.fullmatch(key):
                raise ValueError(f"`rules` key {key!r} is not a feature cell such as 'n2|l1|a0', 'n2' or '*'.")
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 2
                or isinstance(value[0], bool)
                or not isinstance(value[0], (int, np.integer))
                or value[0] < 0
                or isinstance(value[1], bool)
                or not isinstance(value[1], (int, float))
                or not 0.0 <= value[1] <= 1.0
            ):
                raise ValueError(
                    f"`rules[{key!r}]` must be [global_slots (int >= 0), weight in [0, 1]], got {value!r}."
                )
            self.rules[key] = [int(value[0]), float(value[1])]

    def config(self) -> dict:
        return {
            **super().config(),
            "rules": {key: list(value) for key, value in self.rules.items()},
            "count_edges": list(self.count_edges),
            "agreement_threshold": self.agreement_threshold,
            "fit_counts": dict(self.fit_counts),
            "fit_gains": {cell: list(gain) for cell, gain in self.fit_gains.items()},
        }

    # ------------------------------------------------------------------ features
    def _bin(self, n_local: int) -> int:
        return int(np.searchsorted(self.count_edges, n_local, side="right"))

    @staticmethod
    def agreement(local_hits: list[RetrievedItem], global_hits: list[RetrievedItem]) -> float | None:
        """The best cosine between the top global hit and the local hits (`None` when either side is empty)."""
        local = [hit.embedding for hit in local_hits if hit.embedding is not None]
        if not local or not global_hits or global_hits[0].embedding is None:
            return None
        return float(np.max(np.stack(local) @ global_hits[0].embedding))

    def cells(self, n_local: int, has_local: bool, agreement: float | None) -> list[str]:
        """The feature cells of a query, most specific first."""
        agree = "-" if agreement is None else str(int(agreement >= self.agreement_threshold))
        n = f"n{self._bin(n_local)}"
        return [f"{n}|l{int(has_local)}|a{agree}", f"{n}|l{int(has_local)}", n, "*"]

    def rule_for(self, n_local: int, has_local: bool, agreement: float | None) -> list | None:
        """`[global_slots, weight]` for these features, or None when no rule covers them."""
        for cell in self.cells(n_local, has_local, agreement):
            if cell in self.rules:
                return self.rules[cell]
        return None

    def mediate(
        self, local_hits: list[RetrievedItem], global_hits: list[RetrievedItem], n_local: int, k: int
    ) -> MediatedContext:
        rule = self.rule_for(n_local, bool(local_hits), self.agreement(local_hits, global_hits))
        if rule is None:
            return super().mediate(local_hits, global_hits, n_local, k)
        slots = min(rule[0], k)
        if min(slots, len(global_hits)) == 0:  # no global item used: the local decision, untouched
            items, weight = list(local_hits[:k]), self.local_weight
        else:
            items, weight = list(local_hits[: k - slots]) + list(global_hits[:slots]), rule[1]
        return MediatedContext(
            items=items,
            weight=weight if items else 0.0,
            cold_start=n_local < self.min_local_items or not local_hits,
            local_hits=list(local_hits),
            global_hits=list(global_hits),
        )

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        examples: Sequence[MediatorExample],
        weights: Sequence[float],
        *,
        min_examples: int = 10,
        count_edges: Sequence[int] = (1, 3, 6, 21),
        agreement_threshold: float = 0.4,
        gain_z: float | None = None,
        **kwargs,
    ) -> CalibratedMediator:
        """Fits the rules on validation examples so that the mediator never hurts where validation can tell: for
        every feature cell (and every coarser cell but `*`) with at least `min_examples` examples, the
        `(global_slots, weight)` of the lowest mean NLL (ties: fewer global slots, then the smaller weight), kept
        only when it beats the **local decision** (the local hits at `local_weight`, zero global slots) with the
        one-sided bound `mean gain - gain_z * standard error > 0` over the cell's paired examples; otherwise the
        cell gets the local decision. The choice and the bound use the same examples, so the default `gain_z` is
        Bonferroni-corrected for the choices searched: a one-sided 5 % over every `(global_slots > 0, weight)`. `*`, the last fallback of a cell too thin for a rule, is always the local
        decision: validation says nothing about such a cell. An example without a servable global hit gets the
        local decision whatever the rule.

        Args:
            examples (`Sequence[MediatorExample]`): validation queries, never test ones.
            weights (`Sequence[float]`): the λ grid the examples' `nll` columns follow.
            min_examples (`int`, *optional*, defaults to 10): the fewest examples a cell needs for a rule of its own.
            gain_z (`float`, *optional*): the z of the gain's lower bound (default: the Bonferroni z above, 2.69 for
                2 slots x 7 weights; 0 keeps any mean gain).
            count_edges, agreement_threshold, kwargs: as for the constructor.
        """
        gain_z = check_float(gain_z, "gain_z", minimum=0.0, optional=True)
        min_examples = check_int(min_examples, "min_examples", minimum=2, hint="a gain needs a spread")
        weights = [float(w) for w in weights]
        if not examples:
            raise ValueError("`examples` is empty: the mediator needs validation queries to fit on.")
        mediator = cls(count_edges=count_edges, agreement_threshold=agreement_threshold, **kwargs)
        if mediator.local_weight not in weights:
            raise ValueError(f"`weights` must include the local weight {mediator.local_weight} (the local decision).")
        shape = np.asarray(examples[0].nll).shape
        if len(shape) != 2 or shape[1] != len(weights):
            raise ValueError(f"each example's `nll` must have shape (slots + 1, {len(weights)}), got {shape}.")
        local_column = weights.index(mediator.local_weight)
        if gain_z is None:  # one-sided 5 %, Bonferroni over the choices with global slots that argmin searches
            gain_z = statistics.NormalDist().inv_cdf(1 - 0.05 / max(1, (shape[0] - 1) * shape[1]))
        tables: dict[str, list[np.ndarray]] = {}
        for example in examples:
            table = np.asarray(example.nll, dtype=np.float64)
            if table.shape != shape or not np.all(np.isfinite(table)):
                raise ValueError(f"every example's `nll` must be a finite array of shape {shape}.")
            # What `mediate` does: no global slot (or no global hit) keeps the local decision at the local weight.
            table = table.copy()
            local = table[0, local_column]
            table[0, :] = np.inf
            table[0, local_column] = local
            if not example.has_global:  # every rule falls back to the local decision
                table[1:, :] = local
            for cell in mediator.cells(example.n_local, example.has_local, example.agreement):
                tables.setdefault(cell, []).append(table)
        local_rule = [0, mediator.local_weight]
        rules, gains = {"*": list(local_rule)}, {}
        for cell, group in tables.items():
            if len(group) < min_examples or cell == "*":
                continue
            stacked = np.stack(group)
            mean = stacked.mean(axis=0)
            slots, column = np.unravel_index(int(np.argmin(mean)), mean.shape)
            # Paired per example: the local decision's NLL minus the chosen one's (positive: the choice helps).
            diff = stacked[:, 0, local_column] - stacked[:, slots, column]
            error = float(diff.std(ddof=1) / math.sqrt(len(diff)))
            gain, bound = float(diff.mean()), float(diff.mean()) - gain_z * error
            gains[cell] = [gain, bound]
            rules[cell] = [int(slots), weights[column]] if slots > 0 and bound > 0 else list(local_rule)
        mediator.rules = rules
        mediator.fit_counts = {cell: len(group) for cell, group in tables.items()}
        mediator.fit_gains = gains
        return mediator


_RULE_KEY = re.compile(r"\*|n\d+(\|l[01](\|a[01-])?)?")
