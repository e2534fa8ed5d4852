"""The personalization pipeline: how a row's [`Personalization`] becomes decoding inputs.

Every personalized path of the library goes through [`PersonalizationPlanner.plan`]: `SpringForCausalLM.generate`,
`SpringForCausalLM.score`, `SpringForCausalLM.logits_processor`, the benchmark and the LoGo study. For each row it
decides, in this order:

1. **the history**: `Personalization.history` when given (explicit, never gated), else the memory's
   `retrieve_context(user, query, k, use_global, region, ...)`, whose own relevance gate and mediator have run;
2. **the gate**: a float `Personalization.gate` / `SpringConfig.gate` keeps only the *local* retrieved items whose
   score is strictly above it ([`gate_items`], paper Eq. 5); global items are the mediator's business and pass;
3. **λ**: `Personalization.weight`, else the memory's suggestion when `SpringConfig.use_memory_weight`, else
   `SpringConfig.interpolation_weight`; λ = 0 skips retrieval altogether; β of the per-token adaptive λ is
   `Personalization.adaptive_weight`, else `SpringConfig.adaptive_weight`;
4. **the history block**: the items rendered into the prompt ([`HistoryPromptBuilder`]);
5. **the copy path**: μ (`Personalization.copy_weight`, else `SpringConfig.copy_weight`) and, when μ > 0, the
   token ids of the row's copy sources (`SpringConfig.copy_sources`): its prompt and the responses of its planned
   history items (see `generation/copying.py`);
6. **the adapter**: `Personalization.adapter` when given (it must exist), else the user's adapter by the one naming
   rule ([`adapter_name_for`] with `SpringConfig.adapter_name_template`); a user without one decodes with the
   community adapter nearest the mean embedding of their memory items ([`CommunityAdapters.route`]) when the model
   has community adapters, else with the base model, logged once per user. A user who has no adapter *and* of whom
   the memory holds no record is unknown (usually a typo): `SpringConfig.unknown_user="error"` refuses them before anything is retrieved.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from ..memory.gate import RelevanceGate
from ..utils.compat import active_adapter_of
from .adapters import BASE_ADAPTER, AdapterRouter, adapter_name_for
from .community import CommunityAdapters
from .config import SpringConfig
from .copying import parse_copy_sources, response_text
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
        communities ([`CommunityAdapters`], *optional*): the community adapters a user without an adapter is routed
            to.
        logged (`set[str]`, *optional*): users already logged as having no adapter or as unknown (shared across
            calls, so each is logged once).
    """

    def __init__(
        self,
        model: nn.Module,
        memory: Any,
        config: SpringConfig,
        tokenizer: Any,
        *,
        logged: set[str] | None = None,
        communities: CommunityAdapters | None = None,
    ):
        self.model = model
        self.communities = communities
        self._routes: dict[str, str | None] = {}  # user -> community adapter, per `plan` call
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

        Raises:
            `ValueError`: with `SpringConfig.unknown_user="error"`, a row of a user who has no adapter and of whom
            the memory holds no record (checked before anything is retrieved).
        """
        router = AdapterRouter(self.model)
        self._routes = {}  # this call's view of the memory: a user's items may change between calls
        memory_users: dict[str, set[str] | None] = {}  # this call's view of the memory's users (thread-local)
        for row in rows:
            if row is not None:
                self._check_user(row, router, memory_users)
        infos = [
            None
            if row is None
            else self._plan_row(index, input_ids[index][attention_mask[index].bool()].tolist(), row)
            for index, row in enumerate(rows)
        ]
        router, names = self._route(infos, rows, router)
        return PersonalizationPlan(infos, router, names)

    # ------------------------------------------------------------------------------------------------ users
    def _check_user(self, row: Personalization, router: AdapterRouter, memory_users: dict) -> None:
        """Logs, once per user, a row that decodes with the base model because its user has no adapter; refuses
        an unknown user (no adapter, no memory record) under `unknown_user="error"`."""
        user = row.user
        if user is None or row.adapter is not None:  # explicit history without a user, or an adapter chosen
            return
        template = self.config.adapter_name_template
        if router.has_adapters and router.resolve(user, template) != BASE_ADAPTER:
            return
        if router.has_adapters and self._community_adapter(user, router) is not None:
            return  # (a user without an adapter of their own, routed to their community's)
        known = self._memory_knows(user, memory_users)
        unknown = known is False  # a memory that cannot say (None) is taken to know every user
        if unknown and self.config.unknown_user == "error":
            raise ValueError(self._unknown_user_message(user, router))
        if user in self._unknown_users:
            return
        if router.has_adapters:
            record = " and the memory holds no record of them" if unknown else ""
            logger.info(f"User {user!r} has no adapter in the model{record}; their rows decode with the base model.")
        elif unknown:  # a model without adapters: only a user the memory does not know is worth a line
            where = "the memory holds no record of them" if self.memory is not None else "there is no memory"
            logger.info(f"User {user!r} is unknown ({where}); their rows decode with the base model.")
        else:
            return
        self._unknown_users.add(user)

    def _memory_knows(self, user: str, cache: dict) -> bool | None:
        """Whether the memory holds a record of `user`: False without a memory, its `has_user(user)` when it has one,
        else membership in its `users` (a method or a collection, listed once per `plan` call into `cache`), None
        when it cannot say."""
        if self.memory is None:
            return False
        has_user = getattr(self.memory, "has_user", None)
        if callable(has_user):  # LoGoMemory: a dict lookup, not a copy of every user id
            return bool(has_user(user))
        if "users" not in cache:
            users = getattr(self.memory, "users", None)
            if callable(users):
                users = users()
            try:
                cache["users"] = None if users is None or isinstance(users, (str, bytes)) else set(users)
            except TypeError:  # not a collection of user ids
                cache["users"] = None
        return None if cache["users"] is None else user in cache["users"]

    def _unknown_user_message(self, user: str, router: AdapterRouter) -> str:
        template = self.config.adapter_name_template
        try:
            name = adapter_name_for(user, template)
        except ValueError:  # a reserved name: no adapter can have it
            name = None
        if not router.has_adapters:
            looked = "the model has no adapters"
        else:
            looked = f"the model has no adapter {name!r} (SpringConfig.adapter_name_template {template!r})"
        memory = "there is no memory" if self.memory is None else "the memory holds no record of them"
        users = getattr(self.memory, "users", None) if self.memory is not None else None
        try:  # (the error path only: listing every user is fine here)
            users = set(users() if callable(users) else users or ())
        except TypeError:
            users = set()
        known = sorted(u for u in users if isinstance(u, str)) + sorted(router.adapters)
        close = difflib.get_close_matches(user, known, n=3)
        if name is not None and name != user:
            close += difflib.get_close_matches(name, sorted(router.adapters), n=3)
        close = list(dict.fromkeys(close))
        hint = f" Close matches among known users and adapters: {close}." if close else ""
        return (
            f"Unknown user {user!r} in `personalization`: {looked}, and {memory}.{hint} Set "
            "SpringConfig(unknown_user='base') to decode unknown users with the base model instead."
        )

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
        info.adaptive_weight = row.adaptive_weight if row.adaptive_weight is not None else cfg.adaptive_weight
        info.copy_weight = row.copy_weight if row.copy_weight is not None else cfg.copy_weight
        if info.copy_weight > 0:
            info.copy_sources = self._copy_sources(ids, info.items)
        return info

    def _copy_sources(self, ids: list[int], items: Sequence[Any]) -> list[list[int]]:
        """The row's copy sources: its prompt tokens (no history block) and its history items' responses (tokenized
        alone, without special tokens), as `SpringConfig.copy_sources` selects; empty sources are left out."""
        wanted = parse_copy_sources(self.config.copy_sources)
        sources = [list(ids)] if "input" in wanted else []
        if "history" in wanted:
            tokenizer = self.builder().tokenizer
            for item in items:
                text = response_text(item)
                if text:
                    sources.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        return [source for source in sources if source]

    def _retrieval_kwargs(self, row: Personalization) -> dict[str, Any]:
        kwargs = dict(row.retrieval_kwargs or {})
        region = row.region if row.region is not None else self.config.retrieval_region
        if region != "all":  # only then: a custom memory need not know regions
            kwargs.setdefault("region", region)
        return kwargs

    # ------------------------------------------------------------------------------------------------ adapters
    def _community_adapter(self, user: str, router: AdapterRouter) -> str | None:
        """The community adapter of a user without an adapter: the one nearest the mean embedding of their memory
        items, among those the model holds; None without community adapters or items."""
        if self.communities is None or not len(self.communities):
            return None
        if user not in self._routes:  # asked by `_check_user` and `_route` for the same rows: computed once
            user_vector = getattr(self.memory, "user_vector", None)
            vector = user_vector(user) if callable(user_vector) else None
            self._routes[user] = self.communities.route(vector, available=router.adapters)
        return self._routes[user]

    def _route(
        self, infos: list[RowPersonalization | None], rows: Sequence[Personalization | None], router: AdapterRouter
    ) -> tuple[AdapterRouter | None, list[str] | None]:
        """Per-row adapter names, or `(None, None)` when nothing needs routing (no adapters, or every row would use
        the model's active adapter anyway)."""
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
                info.adapter = router.resolve(info.user, self.config.adapter_name_template)  # logged in _check_user
                if info.adapter == BASE_ADAPTER:
                    info.adapter = self._community_adapter(info.user, router) or BASE_ADAPTER
            names.append(info.adapter)
        if all(name == default for name in names) and default is not None:
            return None, None  # the model as it is already does the right thing
        if any(name is None for name in names):
            raise ValueError(
                "the model has several adapters active at once; rows without personalization cannot be routed. "
                "Activate a single adapter (set_adapter) or personalise every row."
            )
        return router, names
