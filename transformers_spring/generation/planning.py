"""The personalization pipeline: how a row's [`Personalization`] becomes decoding inputs.

Every personalized path of the library goes through [`PersonalizationPlanner.plan`]: `SpringForCausalLM.generate`,
`SpringForCausalLM.score`, `SpringForCausalLM.logits_processor`, the benchmark and the LoGo study. For each row it
decides, in this order:

1. **the history**: `Personalization.history` when given (explicit, never gated), else the memory's
   `retrieve_context(user, query, k, use_global, region, ...)`, whose own relevance gate and mediator have run;
2. **the gate**: a float `Personalization.gate` / `SpringConfig.gate` keeps only the *local* retrieved items whose
   score is strictly above it ([`gate_items`], paper Eq. 5); global items are the mediator's business and pass;
3. **λ**: `Personalization.weight`, else the memory's suggestion when `SpringConfig.use_memory_weight`, else
   `SpringConfig.interpolation_weight`; λ = 0 skips retrieval altogether;
4. **the history block**: the items rendered into the prompt ([`HistoryPromptBuilder`]);
5. **the adapter**: `Personalization.adapter` when given (it must exist), else the user's adapter by the one naming
   rule ([`adapter_name_for`] with `SpringConfig.adapter_name_template`); a user without one decodes with the base
   model, logged once per user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from ..memory.gate import RelevanceGate
from ..utils.compat import active_adapter_of
from .adapters import BASE_ADAPTER, AdapterRouter
from .config import SpringConfig
from .personalization import Personalization, RowPersonalization
from .prompting import HistoryPromptBuilder

logger = logging.get_logger(__name__)


def gate_items(items: Sequence[Any], threshold: float | None) -> list[Any]:
    """The relevance gate of a decoding call (paper Eq. 5): keeps every item except *local* retrieved items whose
    score is not strictly above `threshold` ([`RelevanceGate.passes`], the test the memory's own gate uses). Global
    items (cosines, weighed by the mediator) and items without a score pass. `None` keeps everything.

    Args:
        items (`Sequence`): retrieved items (`RetrievedItem`, or anything with `.score` and `.source`).
        threshold (`float`, *optional*): σ.
    """
    if threshold is None:
        return list(items)
    return [
        item
        for item in items
        if getattr(item, "source", "local") != "local"
        or getattr(item, "score", None) is None
        or RelevanceGate.passes(item.score, threshold)
    ]


class PersonalizationPlan:
    """What the pipeline decided for a batch: one [`RowPersonalization`] per row (None: not personalized), and the
    per-row adapter routing (`router`, `names`; both None when nothing needs routing)."""

    def __init__(self, rows: list[RowPersonalization | None], router: AdapterRouter | None, names: list[str] | None):
        self.rows = rows
        self.router = router
        self.names = names

    @property
    def open_rows(self) -> list[int]:
        """Rows whose history path runs (items retrieved and λ > 0)."""
        return [i for i, row in enumerate(self.rows) if row is not None and row.gate_open]


class PersonalizationPlanner:
    """Turns `personalization=` rows into decoding inputs (see the module docstring for the rules).

    Args:
        model (`nn.Module`): the wrapped model (its LoRA adapters are routed per row).
        memory (*optional*): anything with `retrieve_context(user_id, query, k=..., use_global=..., **kwargs)`.
        config ([`SpringConfig`]): the decoding settings.
        tokenizer (*optional*): renders the history and decodes retrieval queries.
        logged (`set[str]`, *optional*): users already logged as having no adapter (shared across calls, so each
            is logged once).
    """

    def __init__(
        self, model: nn.Module, memory: Any, config: SpringConfig, tokenizer: Any, *, logged: set[str] | None = None
    ):
        self.model = model
        self.memory = memory
        self.config = config
        self.tokenizer = tokenizer
        self._builder: HistoryPromptBuilder | None = None
        self._unknown_users = logged if logged is not None else set()

    def plan(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[Personalization | None]
    ) -> PersonalizationPlan:
        """Plans every row of a left-padded batch.

        Args:
            input_ids (`torch.Tensor` of shape `(batch, seq)`): the prompts.
            attention_mask (`torch.Tensor` of shape `(batch, seq)`): their mask.
            rows (sequence of [`Personalization`] or `None`): one per row (see `normalize_personalization`).
        """
        infos = [
            None
            if row is None
            else self._plan_row(index, input_ids[index][attention_mask[index].bool()].tolist(), row)
            for index, row in enumerate(rows)
        ]
        router, names = self._route(infos, rows)
        return PersonalizationPlan(infos, router, names)

    # ------------------------------------------------------------------------------------------------ one row
    def builder(self) -> HistoryPromptBuilder:
        if self.tokenizer is None:
            raise ValueError(
                "SpringForCausalLM needs a tokenizer to render retrieved history: pass `tokenizer=` to "
                "SpringForCausalLM(...) or from_pretrained(...)."
            )
        if self._builder is None:
            self._builder = HistoryPromptBuilder(self.tokenizer, self.config)
        return self._builder

    def _plan_row(self, index: int, ids: list[int], row: Personalization) -> RowPersonalization:
        cfg = self.config
        builder = self.builder()
        info = RowPersonalization(user=row.user)
        context = None
        if row.history is not None:
            items = list(row.history)
        elif row.weight == 0.0:
            items = []  # λ = 0: the history path is never used, so nothing is retrieved
        else:
            if self.memory is None:
                raise ValueError(
                    f"`personalization` for user {row.user!r} needs a memory: pass `memory=` to SpringForCausalLM "
                    "or give the history explicitly with Personalization(history=...)."
                )
            info.query = row.query if row.query is not None else builder.query_text(ids)
            if info.query.strip():
                context = self.memory.retrieve_context(
                    row.user, info.query, k=row.top_k or cfg.top_k,
                    use_global=cfg.use_global if row.use_global is None else row.use_global,
                    **self._retrieval_kwargs(row),
                )  # fmt: skip
                items = gate_items(context.items, row.gate if row.gate is not None else cfg.gate)
            else:
                logger.warning(f"Row {index} has an empty retrieval query; it is not personalised.")
                items = []
        if row.weight is not None:
            weight = row.weight
        elif cfg.use_memory_weight and context is not None:
            weight = float(context.weight)
        else:
            weight = cfg.interpolation_weight
        info.items, info.weight, info.context = items, weight, context
        if info.gate_open:
            history_ids = builder.build(ids, items)
            if len(history_ids) == len(ids):  # the budget left no room for any history
                info.items = []
            else:
                info.history_ids = history_ids
        return info

    def _retrieval_kwargs(self, row: Personalization) -> dict[str, Any]:
        kwargs = dict(row.retrieval_kwargs or {})
        region = row.region if row.region is not None else self.config.retrieval_region
        if region != "all":  # only then: a custom memory need not know regions
            kwargs.setdefault("region", region)
        return kwargs

    # ------------------------------------------------------------------------------------------------ adapters
    def _route(
        self, infos: list[RowPersonalization | None], rows: Sequence[Personalization | None]
    ) -> tuple[AdapterRouter | None, list[str] | None]:
        """Per-row adapter names, or `(None, None)` when nothing needs routing (no adapters, or every row would use
        the model's active adapter anyway)."""
        router = AdapterRouter(self.model)
        explicit = [row.adapter if row is not None else None for row in rows]
        if not router.has_adapters:
            wanted = sorted({name for name in explicit if name is not None and name != BASE_ADAPTER})
            if wanted:
                raise ValueError(f"`Personalization.adapter` {wanted} given, but the model has no adapters.")
            return None, None
        default = active_adapter_of(router.layers, router.adapters, BASE_ADAPTER)
        names = []
        for info, adapter in zip(infos, explicit, strict=True):
            if info is None:
                names.append(default)
                continue
            if adapter is not None:
                if adapter != BASE_ADAPTER and adapter not in router.adapters:
                    raise ValueError(
                        f"`Personalization.adapter` {adapter!r} is not an adapter of the model; it has "
                        f"{sorted(router.adapters)} (or '{BASE_ADAPTER}' for none)."
                    )
                info.adapter = adapter
            elif info.user is None:  # explicit history without a user
                info.adapter = default
            else:
                info.adapter = router.resolve(info.user, self.config.adapter_name_template)
                if info.adapter == BASE_ADAPTER and info.user not in self._unknown_users:
                    self._unknown_users.add(info.user)
                    logger.info(
                        f"User {info.user!r} has no adapter in the model; their rows decode with the base model."
                    )
            names.append(info.adapter)
        if all(name == default for name in names) and default is not None:
            return None, None  # the model as it is already does the right thing
        if any(name is None for name in names):
            raise ValueError(
                "the model has several adapters active at once; rows without personalization cannot be routed. "
                "Activate a single adapter (set_adapter) or personalise every row."
            )
        return router, names
