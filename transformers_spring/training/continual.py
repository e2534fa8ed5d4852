"""`ContinualPersonalizer`: SPRInG updates for many users over time. It coordinates the period trainer
([`SpringTrainer`]), the bounded adapter pool ([`~training.adapter_pool.AdapterPool`]), the state files
([`~persistence.continual_state`]), the serving export ([`~persistence.serving_export`]) and the shard merge
([`~training.sharding.merge_shards`])."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..generation.adapters import DEFAULT_ADAPTER_NAME_TEMPLATE, check_adapter_name_template
from ..generation.community import CommunityAdapter, CommunityAdapters
from ..generation.config import SPRING_CONFIG_NAME, SpringConfig
from ..generation.model import ADAPTERS_DIR, MEMORY_DIR, load_memory_component, save_spring_files, spring_components
from ..memory import LoGoMemory
from ..persistence.adapter_checks import adapter_tree
from ..persistence.cards import render_card
from ..persistence.community_files import read_community_adapters
from ..persistence.continual_state import (
    CACHE_FILE,
    STATE_FILE,
    ContinualState,
    UserState,
    read_continual_state,
    read_training_args,
    write_continual_state,
    write_training_args,
)
from ..persistence.folder import reading, save_folder
from ..persistence.hub import HubMixin, resolve_folder
from ..persistence.safe_copy import copy_tree
from ..persistence.serving import check_max_lora_rank
from ..persistence.serving_export import export_adapters_for_serving
from ..records import Interaction, check_user_id, coerce_interactions
from ..utils.compat import erase_adapter
from ..utils.modeling import base_name_or_path, is_peft_model
from ..utils.validation import check_bool, check_int
from .adapter_pool import AdapterPool
from .data import EncodedSample, SpringFormatter
from .drift import BaseLogProbCache, compute_logprobs
from .lora import (
    adapter_name_for,
    adapter_names,
    adapter_state,
    copy_adapter_weights,
    find_lora_target_modules,
    restore_adapter_state,
)
from .sharding import UserShard, merge_shards
from .spring_config import (
    AUTO_LEARNING_RATE,
    SPRING_FIELDS,
    SpringTrainingArguments,
    count_model_parameters,
    default_learning_rate,
)
from .spring_trainer import SpringPeriodOutput, SpringTrainer

logger = logging.get_logger(__name__)

# `learning_rate="auto"`: the validation search runs on the first period-0 update with at least
# `AUTO_SEARCH_MIN_ITEMS` items. Its latest `AUTO_SEARCH_VALIDATION_FRACTION` (at least
# `AUTO_SEARCH_MIN_VALIDATION_ITEMS`) are held out and the rest train a fresh LoRA per candidate: the rates of
# `AUTO_SEARCH_LEARNING_RATES` (around the measured 3e-3, see `TRAINING_PRESETS`), then the model's size default when
# it is another. Like `spring bench`'s validation selection (docs/benchmark.md), the latest items of period 0 hold out,
# with at least 2 of them here, so that one odd headline does not decide.
AUTO_SEARCH_MIN_ITEMS = 10
AUTO_SEARCH_VALIDATION_FRACTION = 0.2
AUTO_SEARCH_MIN_VALIDATION_ITEMS = 2
AUTO_SEARCH_LEARNING_RATES = (1e-3, 3e-3)
# The search's throwaway adapter: one per search, reset to the same initial weights for every candidate, removed right
# after it. Named `<prefix><n>` with the first free n: peft keeps a model's only adapter (zeroed, see
# `erase_adapter`), and a zeroed LoRA (A = B = 0) has no gradient, so a stuck one is never trained again.
SEARCH_ADAPTER_PREFIX = "__spring_lr_search_"


@dataclasses.dataclass
class ForgetReport:
    """What [`~ContinualPersonalizer.forget_user`] did; true when the user was known.

    Args:
        known (`bool`): whether the user was known (to the personalizer, its memory or a community adapter).
        retrained (`list[str]`): the community adapters retrained without the user.
        dropped (`list[str]`): the community adapters dropped (too few members left).
        derived_users (`list[str]`): users whose adapters started from one of those community adapters before the
            erasure: their adapters still carry what they started from (retrain them with `forget_user` and
            `observe`, or keep them, as your erasure policy says).
    """

    known: bool
    retrained: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    derived_users: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.known


def _adapter_folders(directory: Path) -> set[str]:
    """The adapter folder names under a state's `adapters/` (checked for links by `adapter_tree` before)."""
    return (
        {p.name for p in directory.iterdir() if (p / "adapter_config.json").is_file()} if directory.is_dir() else set()
    )


def held_out_nll(model: torch.nn.Module, samples: Sequence[EncodedSample], args: Any, pad_token_id: int) -> float:
    """The mean over `samples` of their responses' per-token NLL under `model` as it is (its active adapter): the
    criterion `spring bench` and `spring tune` validate a learning rate with.

    Args:
        model (`nn.Module`): the model, with the adapter to judge active.
        samples (`Sequence[EncodedSample]`): the held-out samples (their responses are the gold ones).
        args ([`SpringTrainingArguments`]): the scoring batch size and shared-prefix setting.
        pad_token_id (`int`): the padding id.
    """
    logprobs = compute_logprobs(
        model, samples, batch_size=args.effective_scoring_batch_size, pad_token_id=pad_token_id,
        shared_prefix=args.scoring_shared_prefix,
    )  # fmt: skip
    return statistics.fmean(-lp.reduce("mean") for lp in logprobs)


class ContinualPersonalizer(HubMixin):
    r"""
    SPRInG for many users over time: call [`~ContinualPersonalizer.observe`] with each user's new interactions, once
    per period; it runs a [`SpringTrainer`] (score → select → train → rebuild the buffer) on that user's adapter and
    counts the user's periods (the first call is period 0, which trains on everything).

    All users share one base model; each has a LoRA adapter in it named `adapter_name_for(user_id, template)`, with
    the template of `spring_config.adapter_name_template` (`"{user_id}"` without a `spring_config`): the name
    [`SpringForCausalLM`] routes `personalization=user_id` to. The template is saved with the state. Only
    `max_resident_adapters` adapters stay loaded (least recently used first out, see
    [`~training.adapter_pool.AdapterPool`], `personalizer.adapter_pool`); the rest are offloaded to disk and loaded
    back when their user comes again (a bit-exact safetensors round trip).

    Everything is saved by [`~ContinualPersonalizer.save_pretrained`] (atomically) and resumed by
    [`~ContinualPersonalizer.from_pretrained`]:

    ```
    <dir>/adapters/<adapter>/adapter_config.json, adapter_model.safetensors  # peft multi-adapter layout
    <dir>/memory/                                                          # LoGoMemory with the residual buffers
    <dir>/continual_state.json                                             # users, adapters, naming template
    <dir>/training_args.json, base_logprobs.json, spring_config.json, README.md, tokenizer files
    ```

    The directory is also a [`SpringForCausalLM`] checkpoint (`SpringForCausalLM.from_pretrained(dir)` loads every
    adapter and the memory), and one user's adapter loads with
    `PeftModel.from_pretrained(base, f"{dir}/adapters", subfolder=name, adapter_name=name)`, where `name` is
    `personalizer.adapter_name(user)`.

    Note: **the model you pass is modified in place.** Like peft's `get_peft_model`, the personalizer injects the
    users' LoRA layers into `model` itself (no copy, so no doubled memory): after the first `observe`, `model`'s own
    outputs are those of the active user's adapter. For a non-personalized baseline, use
    `with personalizer.model.disable_adapter():` or load a separate copy of the base model. A warning says so when
    `model` is not a `PeftModel` yet (silence it with
    `transformers.utils.logging.get_logger("transformers_spring.training.continual").setLevel(logging.ERROR)`).

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The base causal LM, **modified in place**: its LoRA layers are injected at the first user (see the note
            above); `personalizer.model` is the peft-wrapped one.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        args ([`SpringTrainingArguments`], *optional*):
            Training and SPRInG settings for every user; defaults to `SpringTrainingArguments()` (the `"measured"`
            preset: `learning_rate="auto"`, every sample), with `output_dir` in a temporary directory.
        memory (`LoGoMemory`, *optional*):
            Holds the residual buffers. Defaults to a `LoGoMemory(scorer="bm25", gate=None,
            buffer_size=args.buffer_size)` (SPRInG retrieves from the buffer with BM25) with the default encoder.
        spring_config ([`SpringConfig`], *optional*):
            Decoding settings used by [`~ContinualPersonalizer.to_spring_model`] and saved with the state; its
            `adapter_name_template` names the users' adapters.
        max_resident_adapters (`int`, *optional*, defaults to 8):
            How many user adapters stay loaded in the model.
        offload_dir (`str`, *optional*):
            Where offloaded adapters are kept; a private temporary directory (removed with the object) by default.
        callbacks (`list[TrainerCallback]`, *optional*):
            Passed to every [`SpringTrainer`].
        score_cache ([`BaseLogProbCache`], *optional*):
            Base log-probs already computed.
        shard ([`UserShard`], *optional*):
            Train only this worker's users (see [`claim_user_shard`]): `observe` for another worker's user is a
            logged no-op. Save each worker's state into its own folder and combine them with
            [`~ContinualPersonalizer.merge_shards`].
        community_init (`bool`, *optional*, defaults to `True`):
            Once [`~ContinualPersonalizer.train_community_adapters`] has run, a new user's adapter starts from the
            community adapter nearest their first items instead of from peft's initialisation.

    With `args.learning_rate="auto"` (the default), the learning rate is chosen once for all users: the first
    period-0 update with at least 10 items runs a small validation search first. Its latest 20 % (at least 2 items)
    are held out, a throwaway LoRA trains on the rest (every sample, `args.num_train_epochs`) for each of 1e-3, 3e-3
    and the model's size default ([`default_learning_rate`]) when it is another, and the rate of the lowest mean
    per-token NLL of the held-out gold responses (adapter only; ties: the earlier) trains that update and every later
    one of every user. Updates before it (users whose period 0 has fewer items) train at the size default. How the
    rate was chosen is `personalizer.learning_rate_choice` (`learning_rate`, `rule`: `"validation"` or
    `"size default"`, `grid`: the NLL of each rate tried), logged at info and saved with the state, so a resumed
    personalizer does not search again.

    Example:

    ```python
    >>> personalizer = ContinualPersonalizer(model, tokenizer, SpringTrainingArguments(output_dir="out"), memory)
    >>> for period in periods:
    ...     for user, items in period.items():
    ...         personalizer.observe(user, items)
    >>> personalizer.save_pretrained("spring-state")
    >>> resumed = ContinualPersonalizer.from_pretrained(base_model, "spring-state")  # later, with a fresh base model
    >>> spring = personalizer.to_spring_model()
    >>> spring.generate(**inputs, personalization="alice")
    ```
    """

    hub_commit_message = "Upload SPRInG personalization state"
    hub_delete_patterns = (f"{ADAPTERS_DIR}/**", f"{MEMORY_DIR}/**")

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        args: SpringTrainingArguments | None = None,
        memory: Any = None,
        *,
        spring_config: SpringConfig | None = None,
        max_resident_adapters: int = 8,
        offload_dir: str | os.PathLike | None = None,
        callbacks: list | None = None,
        score_cache: BaseLogProbCache | None = None,
        shard: UserShard | None = None,
        community_init: bool = True,
    ):
        if shard is not None and not isinstance(shard, UserShard):
            raise TypeError(f"`shard` must be a UserShard, got {type(shard).__name__}.")
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a causal LM (nn.Module), got {type(model).__name__}.")
        if not is_peft_model(model):
            # A module-level logger: callers that know (the `spring train` CLI) raise its level to silence it.
            logger.warning(
                "ContinualPersonalizer modifies the model you pass in place: the users' LoRA layers are injected into "
                "it (as peft's get_peft_model does), so after the first `observe` its outputs are no longer the base "
                "model's. For a base-model baseline use `with personalizer.model.disable_adapter():` or load a "
                "separate copy of the model."
            )
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be a tokenizer, got {type(tokenizer).__name__}.")
        max_resident_adapters = check_int(max_resident_adapters, "max_resident_adapters", minimum=1)
        if spring_config is not None and not isinstance(spring_config, SpringConfig):
            raise TypeError(f"`spring_config` must be a SpringConfig, got {type(spring_config).__name__}.")
        template = spring_config.adapter_name_template if spring_config is not None else DEFAULT_ADAPTER_NAME_TEMPLATE
        self._template = check_adapter_name_template(template, "spring_config.adapter_name_template")
        if offload_dir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="spring-personalizer-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._workdir), True)
        else:
            self._workdir = Path(offload_dir)
            self._workdir.mkdir(parents=True, exist_ok=True)
        if args is None:
            args = SpringTrainingArguments(output_dir=str(self._workdir / "trainer_output"))
        if not isinstance(args, SpringTrainingArguments):
            raise TypeError(f"`args` must be a SpringTrainingArguments, got {type(args).__name__}.")
        if memory is None:
            memory = LoGoMemory(scorer="bm25", gate=None, buffer_size=max(args.buffer_size, 1))
        self.adapter_pool = AdapterPool(model, max_resident_adapters, self._workdir / "offloaded")
        self.tokenizer = tokenizer
        self.args = args
        self.memory = memory
        self.spring_config = spring_config
        self.callbacks = callbacks
        self.score_cache = score_cache if score_cache is not None else BaseLogProbCache(base_name_or_path(model))
        self.shard = shard
        self.saved_base_model: str | None = None  # the base model a loaded state says it was trained on
        # How `learning_rate="auto"` was resolved (None until the first update, and with a float learning rate).
        self.learning_rate_choice: dict[str, Any] | None = None
        self._users: dict[str, UserState] = {}
        # Community adapters (`train_community_adapters`): in the adapter pool with the users', routed by this table.
        self.community_adapters: CommunityAdapters | None = None
        self.community_init = check_bool(community_init, "community_init")

    @property
    def model(self) -> torch.nn.Module:
        """The shared model (a `PeftModel` once the first user's adapter exists)."""
        return self.adapter_pool.model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self.adapter_pool.model = model

    @property
    def max_resident_adapters(self) -> int:
        """How many user adapters stay loaded in the model."""
        return self.adapter_pool.max_resident

    @property
    def adapter_name_template(self) -> str:
        """How a user id becomes an adapter name (`adapter_name_for(user_id, template)`)."""
        return self._template

    # ------------------------------------------------------------------------------------------------ users
    @property
    def users(self) -> list[str]:
        """Users with an adapter, in first-observed order."""
        return list(self._users)

    @property
    def resident_users(self) -> list[str]:
        """Users whose adapter is loaded in the model, least recently used first."""
        by_name = {entry.adapter: user for user, entry in self._users.items()}
        return [by_name[name] for name in self.adapter_pool.resident if name in by_name]

    def period(self, user_id: str) -> int:
        """The period index the user's next [`~ContinualPersonalizer.observe`] call will run (0 for a new user)."""
        entry = self._users.get(check_user_id(user_id))
        return entry.next_period if entry else 0

    def adapter_name(self, user_id: str) -> str:
        """The user's adapter name in `model`. Raises `KeyError` for an unknown user."""
        return self.user_state(user_id).adapter

    def user_state(self, user_id: str) -> UserState:
        """The user's saved entry (adapter name, next period, number of observed interactions). Raises `KeyError`
        for an unknown user."""
        user_id = check_user_id(user_id)
        if user_id not in self._users:
            raise KeyError(f"unknown user {user_id!r}: no period was observed for it (known: {len(self._users)}).")
        return self._users[user_id]

    def add_user(self, user_id: str, state: UserState, adapter_path: str | os.PathLike) -> None:
        """Adds a user trained elsewhere (a saved state, another worker's shard): their counters and their adapter,
        copied from the peft folder `adapter_path` and loaded when first needed.

        Args:
            user_id (`str`): a user this personalizer does not know yet.
            state ([`~persistence.continual_state.UserState`]): the user's entry; its adapter name must be
                `adapter_name_for(user_id, self.adapter_name_template)`.
            adapter_path (`str` or `os.PathLike`): the adapter's folder (`adapter_config.json` and weights).

        Raises:
            `ValueError`: a known user, another adapter name, no adapter folder, a model that already holds an
            adapter of that name, or an adapter folder that
            [`~persistence.adapter_checks.check_adapter_folder`] refuses (a symlink, a field that would change the
            base model, targets other than `args.lora_target_modules`).
        """
        user_id = check_user_id(user_id)
        if user_id in self._users:
            raise ValueError(f"user {user_id!r} is already known.")
        name = adapter_name_for(user_id, self._template)
        if state.adapter != name:
            raise ValueError(f"the adapter of user {user_id!r} is {name!r}, not {state.adapter!r}.")
        source = Path(adapter_path)
        if not (source / "adapter_config.json").is_file() or source.is_symlink():
            raise ValueError(f"user {user_id!r} has no saved adapter ({name!r}) at {source}.")
        if name in adapter_names(self.model) or name in self.adapter_pool:
            raise ValueError(f"`model` already has an adapter named {name!r}; pass the plain base model.")
        self.adapter_pool.add_offloaded(name, source, allowed_targets=self._expected_targets())
        self._users[user_id] = UserState(name, state.next_period, state.num_observed)

    def _expected_targets(self) -> list[str] | str | None:
        """The `target_modules` this personalizer gives adapters (`args.lora_target_modules`, else the detected
        query/value projections): an added adapter must target only those. None when they cannot be detected."""
        if self.args.lora_target_modules is not None:
            return self.args.lora_target_modules
        try:
            return find_lora_target_modules(self.model)
        except ValueError:
            return None

    def state_dict(self, user_id: str) -> dict[str, torch.Tensor]:
        """A copy of the user's adapter weights (peft state-dict keys), loading it from disk when offloaded."""
        from peft import get_peft_model_state_dict

        name = self.load_user(user_id)
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def load_user(self, user_id: str) -> str:
        """Makes the user's adapter resident (loading it from disk if offloaded); returns its name."""
        name = self.adapter_name(user_id)
        self.adapter_pool.make_resident(name)
        return name

    # ------------------------------------------------------------------------------------------------ periods
    def observe(
        self,
        user_id: str,
        interactions: Sequence[Interaction | dict],
        *,
        eval_interactions: Sequence[Interaction | dict] | None = None,
        **trainer_kwargs,
    ) -> SpringPeriodOutput:
        """Runs the user's next SPRInG period on `interactions` (the period's new training samples).

        Args:
            user_id (`str`): the user; new users start at period 0.
            interactions (`Sequence[Interaction | dict]`): the user's new samples, all with this `user_id`. An empty
                sequence is a logged no-op (the period counter does not move).
            eval_interactions (`Sequence[Interaction | dict]`, *optional*): held-out samples for the trainer.
            trainer_kwargs: passed to [`SpringTrainer`].

        Returns:
            [`SpringPeriodOutput`]. On any error the user's adapter, buffer and period counter are unchanged.
        """
        user_id = check_user_id(user_id)
        records = coerce_interactions(interactions, user_id, "interactions")
        name = adapter_name_for(user_id, self._template)
        if self.shard is not None and not self.shard.owns(user_id):
            logger.debug(f"user {user_id!r} belongs to another shard than {self.shard}; not trained here.")
            return SpringPeriodOutput(user_id, self.period(user_id), name, skipped=True)
        entry = self._users.get(user_id)
        clash = next((u for u, e in self._users.items() if e.adapter == name and u != user_id), None)
        if clash is not None:
            raise ValueError(
                f"`user_id` {user_id!r} and {clash!r} map to the same adapter name {name!r}; use ids that differ in "
                "[A-Za-z0-9_-] characters."
            )
        if self.community_adapters is not None and name in self.community_adapters:
            raise ValueError(f"`user_id` {user_id!r} maps to the community adapter name {name!r}; use another id.")
        if entry is None and name in adapter_names(self.model) and not self.adapter_pool.owns(name):
            raise ValueError(
                f"the model already has an adapter named {name!r} that this personalizer does not manage; "
                f"new user {user_id!r} would overwrite it."
            )
        period = entry.next_period if entry else 0
        if not records:
            logger.info(f"user {user_id!r}: empty period; nothing to do (next period stays {period}).")
            return SpringPeriodOutput(user_id, period, name, skipped=True)
        args = self._update_args(user_id, records, period)
        if entry is not None:
            self.adapter_pool.make_resident(name)
        if entry is None:
            self._sync_communities()
        community = self._community_for(records) if entry is None else None
        if community is not None:
            self.adapter_pool.make_resident(community)  # before the trainer activates the user's adapter
        callbacks = list(self.callbacks or []) + list(trainer_kwargs.pop("callbacks", None) or [])
        trainer = SpringTrainer(
            model=self.model,
            args=args,
            user_id=user_id,
            period=period,
            train_interactions=records,
            memory=self.memory,
            processing_class=self.tokenizer,
            score_cache=self.score_cache,
            adapter_name=name,
            eval_interactions=eval_interactions,
            callbacks=callbacks or None,
            **trainer_kwargs,
        )
        try:
            if community is not None and trainer.created_adapter:
                copy_adapter_weights(trainer.model, community, name)
                logger.info(f"user {user_id!r}: the new adapter starts from the community adapter {community!r}.")
            output = trainer.run_period()
        except BaseException:
            if entry is None and name in adapter_names(trainer.model):
                self.adapter_pool.mark_failed(name)
            raise
        finally:
            self.model = trainer.model  # wrapped with peft at the first user
            self._drop_search_adapters()  # (peft keeps a model's only adapter: a search's goes once another exists)
        self._users[user_id] = UserState(name, period + 1, (entry.num_observed if entry else 0) + len(records))
        if community is not None and trainer.created_adapter:
            self.community_adapters[community].initialized.append(user_id)
        self.adapter_pool.mark_trained(name)
        return output

    # ------------------------------------------------------------------------------------------------ learning rate
    def _update_args(self, user_id: str, records: Sequence[Interaction], period: int) -> SpringTrainingArguments:
        """The arguments of this update: `args` itself, or for `learning_rate="auto"` a copy holding the chosen
        float, searched first when this is the first period-0 update with enough items (see the class docstring)."""
        if self.args.learning_rate != AUTO_LEARNING_RATE:
            return self.args
        choice = self.learning_rate_choice
        searched = choice is not None and choice["rule"] == "validation"
        if not searched and period == 0 and len(records) >= AUTO_SEARCH_MIN_ITEMS:
            choice = self._search_learning_rate(user_id, records)
            nlls = [math.inf if e["validation_nll"] is None else e["validation_nll"] for e in choice["grid"]]
            tried = ", ".join(
                f"{e['learning_rate']:g}: {nll:.4f}" for e, nll in zip(choice["grid"], nlls, strict=True)
            )
            logger.info(
                f"learning_rate='auto': {choice['learning_rate']:g}, the lowest held-out NLL on the first period-0 "
                f"update with >= {AUTO_SEARCH_MIN_ITEMS} items ({choice['fit_items']} fit, "
                f"{choice['validation_items']} held out; per rate: {tried}); used for every later update."
            )
        elif choice is None:
            num_params = count_model_parameters(self.model)
            choice = {"learning_rate": default_learning_rate(num_params), "rule": "size default", "grid": [],
                      "num_parameters": num_params}  # fmt: skip
            logger.info(
                f"learning_rate='auto': {choice['learning_rate']:g}, the default for a model of "
                f"{num_params / 1e6:.0f}M parameters, until a period-0 update with >= {AUTO_SEARCH_MIN_ITEMS} items "
                "allows a validation search."
            )
        self.learning_rate_choice = choice
        return self.args.with_learning_rate(choice["learning_rate"])

    def _search_learning_rate(self, user_id: str, records: Sequence[Interaction]) -> dict[str, Any]:
        """The validation search of `learning_rate="auto"` on one user's period-0 items (see the class docstring).
        One throwaway adapter, reset to the same initial weights for every candidate, removed at the end."""
        ordered = sorted(records, key=lambda item: item.timestamp)  # stable: items at one time keep their order
        n_val = max(AUTO_SEARCH_MIN_VALIDATION_ITEMS, round(AUTO_SEARCH_VALIDATION_FRACTION * len(ordered)))
        fit, held_out = ordered[:-n_val], ordered[-n_val:]
        num_params = count_model_parameters(self.model)
        grid = list(dict.fromkeys((*AUTO_SEARCH_LEARNING_RATES, default_learning_rate(num_params))))
        formatter = SpringFormatter.from_args(self.tokenizer, self.args)
        samples = formatter.encode_many(held_out)
        taken = set(adapter_names(self.model))
        active = getattr(self.model, "active_adapter", None) if taken else None
        name = next(
            f"{SEARCH_ADAPTER_PREFIX}{n}" for n in range(len(taken) + 1) if f"{SEARCH_ADAPTER_PREFIX}{n}" not in taken
        )
        initial = None
        scores = []
        try:
            for rate in grid:
                if initial is not None:
                    restore_adapter_state(self.model, initial)
                trainer = SpringTrainer(
                    model=self.model, args=self.args.with_learning_rate(rate), user_id=user_id, period=0,
                    train_interactions=fit, processing_class=self.tokenizer, adapter_name=name,
                )  # fmt: skip
                self.model = trainer.model  # wrapped with peft when this is the model's first adapter
                if initial is None:
                    initial = adapter_state(self.model, name)
                trainer.run_period()
                nll = held_out_nll(self.model, samples, self.args, formatter.pad_token_id)
                scores.append(nll if math.isfinite(nll) else math.inf)
        finally:
            self._drop_search_adapters(activate=active)
        best = min(range(len(grid)), key=lambda i: (scores[i], i))
        return {
            "learning_rate": grid[best],
            "rule": "validation",
            "grid": [
                {"learning_rate": rate, "validation_nll": nll if math.isfinite(nll) else None}
                for rate, nll in zip(grid, scores, strict=True)
            ],  # fmt: skip
            "fit_items": len(fit),
            "validation_items": len(held_out),
            "num_parameters": num_params,
        }

    def _drop_search_adapters(self, activate: str | None = None) -> None:
        """Removes the searches' throwaway adapters from the model. peft cannot delete a model's only adapter: that
        one is zeroed and kept until another adapter exists (the next update's). A throwaway that is active hands
        over to `activate` (else another adapter) first: peft would warn about deleting the active adapter."""
        names = adapter_names(self.model)
        throwaways = [name for name in names if name.startswith(SEARCH_ADAPTER_PREFIX)]
        others = [name for name in names if not name.startswith(SEARCH_ADAPTER_PREFIX)]
        if others and getattr(self.model, "active_adapter", None) in throwaways:
            self.model.set_adapter(activate if activate in others else others[-1])
        for name in throwaways:
            if not erase_adapter(self.model, name):
                logger.debug(f"the search adapter {name!r} is the model's only one: zeroed, removed after the next.")

    # ------------------------------------------------------------------------------------------------ communities
    def train_community_adapters(
        self,
        *,
        min_users: int | None = None,
        max_items_per_user: int | None = 64,
        min_similarity: float = 0.0,
        progress: bool = True,
    ) -> CommunityAdapters:
        """Trains one LoRA adapter per community of the memory's global memory (see [`GlobalMemory`]) with at least
        `min_users` members, on their pooled history items: collective knowledge that reaches a new or cold-start
        user without serving anyone's text (the parametric counterpart of LoGo's global memory). Any earlier
        community adapters are replaced.

        - **Who contributes**: the users the global memory holds, so the memory's sharing policy decides: under
          `"private"`, every user who did not opt out; under `"consented"`, only users who opted in.
        - **Training**: a fresh adapter (`__community_<n>`) per community, period 0 of [`SpringTrainer`] on every
          member's latest `max_items_per_user` history items (so no member dominates), at this personalizer's
          learning rate (`"auto"`: its chosen rate, else the model's size default) and epochs.
        - **Use**: a new user's adapter starts from the community adapter nearest their first items
          (`community_init`), and [`SpringForCausalLM`] (see [`~ContinualPersonalizer.to_spring_model`]) decodes a user
          without an adapter with the one nearest their memory items.
        - **Erasure and consent**: [`~ContinualPersonalizer.forget_user`] retrains the adapters a user contributed
          to, or drops them; so does the next `observe`, `save_pretrained` or `to_spring_model` for a member who no
          longer shares (an opt-out, a policy change, a record-level erasure in the memory).
        - **What leaks**: an adapter trained on a user's text can reproduce it. `benchmarks/bench_community_leak.py`
          measures how much of one user's unique text a community adapter reproduces, against the base model.

        Args:
            min_users (`int`, *optional*): the fewest contributing users of a community adapter (default: the
                memory's `min_community_users`, the smallest community allowed to feed retrieval).
            max_items_per_user (`int`, *optional*, defaults to 64): the most (latest) items each member contributes
                (None: all).
            min_similarity (`float`, *optional*, defaults to 0.0): the lowest cosine at which a user is routed to a
                community adapter.
            progress (`bool`, *optional*, defaults to `True`): a tqdm bar over communities.

        Returns:
            [`CommunityAdapters`]: the routing table (also `personalizer.community_adapters`).

        Raises:
            `TypeError`: a memory without a global memory (not a [`LoGoMemory`]).
        """
        from tqdm.auto import tqdm

        if not callable(getattr(self.memory, "communities", None)):
            raise TypeError(f"community adapters need a LoGoMemory, got {type(self.memory).__name__}.")
        if min_users is None:
            min_users = self.memory.min_community_users
        table = CommunityAdapters(min_users, min_similarity, max_items_per_user=max_items_per_user)
        for name in list(self.community_adapters.names if self.community_adapters is not None else []):
            self._drop_community(name)
        self.community_adapters = table
        communities = sorted(self.memory.communities().items())  # members in the memory's first-write order
        chosen = [members for _, members in communities if len(members) >= table.min_users]
        for members in tqdm(chosen, desc="community adapters", disable=not progress or not chosen):
            self._train_community(None, members)
        logger.info(
            f"{len(table)} community adapter(s) trained, from {len(communities)} communities "
            f"({sum(len(m) for m in chosen)} contributing users; a community needs >= {table.min_users} users)."
        )
        return table

    def _train_community(self, name: str | None, members: Sequence[str]) -> str | None:
        """(Re)trains a community adapter from scratch on `members`' pooled items and records it: `name` when it can
        be reused, else a new name (None: a new adapter). Returns the name, or None when the members have no items
        (an old `name` is then dropped)."""
        table, limit = self.community_adapters, self.community_adapters.max_items_per_user
        members = [m for m in members if self._shares(m)]
        kept, vectors = [], []
        for j, user in enumerate(members):
            records, embeddings = self.memory.history_embeddings(user)
            order = sorted(range(len(records)), key=lambda i: records[i].timestamp)
            for i in order[-limit:] if limit is not None else order:
                kept.append((j, records[i]))
                vectors.append(embeddings[i])
        if name is not None:
            self._drop_community(name)  # a retrain starts from scratch: nothing of the old weights survives
        if not kept:
            return None
        if name is None or name in adapter_names(self.model):  # (peft keeps a model's last adapter, zeroed)
            name = table.next_name({entry.adapter for entry in self._users.values()} | set(adapter_names(self.model)))
        # The pooled items become the community's own (ids stay distinct across members).
        pooled = [dataclasses.replace(record, user_id=name, id=f"{j}-{record.id}") for j, record in kept]
        pooled.sort(key=lambda item: item.timestamp)
        trainer = SpringTrainer(
            model=self.model, args=self._community_args(), user_id=name, period=0, train_interactions=pooled,
            processing_class=self.tokenizer, adapter_name=name,
        )  # fmt: skip
        try:
            trainer.run_period()
        finally:
            self.model = trainer.model
        self.adapter_pool.mark_trained(name)
        table.add(CommunityAdapter(name, list(members), np.mean(np.stack(vectors), axis=0), len(pooled)))
        return name

    def _shares(self, user_id: str) -> bool:
        """Whether `user_id`'s items may train a community adapter: the memory holds them and the user shares under
        its sharing policy."""
        is_shared = getattr(self.memory, "is_shared", None)
        return self.memory.has_user(user_id) and (is_shared(user_id) if callable(is_shared) else True)

    def _sync_communities(self) -> None:
        """Retrains, or drops, every community adapter with a member who no longer shares (an opt-out, a policy
        change, an erasure in the memory): no adapter keeps serving what a user withdrew."""
        table = self.community_adapters
        for adapter in list(table) if table is not None else []:
            members = [m for m in adapter.members if self._shares(m)]
            if len(members) == len(adapter.members):
                continue
            retrained = self._train_community(adapter.name, members) if len(members) >= table.min_users else None
            if retrained is None:
                self._drop_community(adapter.name)
            logger.info(
                f"Community adapter {adapter.name!r}: {len(adapter.members) - len(members)} member(s) no longer "
                f"share; {'retrained as ' + repr(retrained) if retrained else 'dropped'}."
            )

    def _drop_community(self, name: str) -> None:
        self.adapter_pool.remove(name)
        if self.community_adapters is not None:
            self.community_adapters.remove(name)

    def _community_args(self) -> SpringTrainingArguments:
        if self.args.learning_rate != AUTO_LEARNING_RATE:
            return self.args
        choice = self.learning_rate_choice
        rate = choice["learning_rate"] if choice else default_learning_rate(count_model_parameters(self.model))
        return self.args.with_learning_rate(rate)

    def _community_for(self, records: Sequence[Interaction]) -> str | None:
        """The community adapter a new user's adapter starts from: the one nearest their first items."""
        table = self.community_adapters
        if (
            not self.community_init
            or table is None
            or not len(table)
            or not callable(getattr(self.memory, "embed", None))
        ):
            return None
        vectors = self.memory.embed([record.text for record in records])
        return table.route(vectors.mean(axis=0) if len(vectors) else None)

    def forget_user(self, user_id: str) -> ForgetReport:
        """Erases a user everywhere the personalizer keeps them: the adapter (in the model, or its offloaded copy),
        the period counters and routing entry, the base log-prob cache entries and the memory (records, buffer,
        global contributions). The next [`~ContinualPersonalizer.save_pretrained`] writes a folder with none of it
        and removes the files earlier saves wrote for them (the adapter folder included).

        Args:
            user_id (`str`): the user.

        Community adapters the user's items trained are retrained on the remaining members (fresh, so nothing of the
        user survives in them), or dropped when fewer than `min_users` members remain.

        Returns:
            [`ForgetReport`]: true when the user was known (to the personalizer, its memory or a community adapter);
            `retrained` and `dropped` name the community adapters.
        """
        user_id = check_user_id(user_id)
        entry = self._users.pop(user_id, None)
        known = entry is not None
        self.adapter_pool.remove(entry.adapter if entry else adapter_name_for(user_id, self._template))
        self.score_cache.drop_user(user_id)
        forget = getattr(self.memory, "forget_user", None)
        if callable(forget):
            known = bool(forget(user_id)) or known
        report = ForgetReport(known)
        for adapter in self.community_adapters or []:
            if user_id in adapter.initialized:
                adapter.initialized.remove(user_id)
        for name in self.community_adapters.contributed(user_id) if self.community_adapters is not None else []:
            report.known = True
            derived = self.community_adapters[name].initialized
            report.derived_users += [u for u in derived if u not in report.derived_users]
            members = [m for m in self.community_adapters[name].members if m != user_id]
            retrained = None
            if len(members) >= self.community_adapters.min_users:
                retrained = self._train_community(name, members)
            if retrained is not None:
                report.retrained.append(retrained)
            else:
                self._drop_community(name)
                report.dropped.append(name)
        if report.retrained or report.dropped:
            logger.info(
                f"Forgetting {user_id!r}: community adapters retrained without them {report.retrained}, dropped "
                f"(fewer than {self.community_adapters.min_users} members left) {report.dropped}; users whose "
                f"adapters started from them: {report.derived_users}."
            )
        return report

    # ------------------------------------------------------------------------------------------------ persistence
    def _state(self) -> ContinualState:
        return ContinualState(
            users=dict(self._users),
            adapter_name_template=self._template,
            base_model_name_or_path=base_name_or_path(self.model),
            max_resident_adapters=self.max_resident_adapters,
            spring_args=self.args.spring_dict(),
            shard=(self.shard.index, self.shard.count) if self.shard is not None else None,
            learning_rate_choice=self.learning_rate_choice,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        save_tokenizer: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs,
    ) -> None:
        """Saves every adapter, the memory, the base log-prob cache, the settings and the per-user period counters.

        Only the files this state's earlier saves wrote (listed in `spring_manifest.json`) are replaced or removed;
        anything else in `save_directory` (logs, checkpoints, notes) is kept, and a file it did not write is never
        overwritten. A crash at any point leaves a folder that the next save or load brings to the newest complete
        version (see [`~persistence.save_folder`]). Under `accelerate launch` only the main process writes.

        Args:
            save_directory (`str` or `os.PathLike`): the target directory.
            save_tokenizer (`bool`, *optional*, defaults to `True`): also save the tokenizer.
            push_to_hub (`bool`, *optional*, defaults to `False`): then also upload the state with
                [`~ContinualPersonalizer.push_to_hub`].
            repo_id (`str`, *optional*): the Hub repo to push to (default: the name of `save_directory`).
            push_kwargs: passed to [`~ContinualPersonalizer.push_to_hub`] (`private`, `token`, ...).
        """
        from accelerate import PartialState

        self._check_push_kwargs(push_to_hub, push_kwargs)  # before anything is written
        state = PartialState()
        if state.is_main_process:
            adopt = lambda d: (d / STATE_FILE).is_file()  # noqa: E731 (a save of an earlier release)
            parts = lambda d: [  # noqa: E731
                *spring_components(d, self.memory),
                {"name": "state", "path": STATE_FILE, "type": "ContinualPersonalizer"},
            ]
            with save_folder(save_directory, "ContinualPersonalizer", adopt=adopt, components=parts) as tmp:
                self._write(tmp, save_tokenizer)
        state.wait_for_everyone()
        if push_to_hub:
            return self._push_saved(save_directory, repo_id, push_kwargs)
        return None

    def _write(self, directory: Path, save_tokenizer: bool) -> None:
        self._sync_communities()
        directory.mkdir(parents=True, exist_ok=True)
        adapters = directory / ADAPTERS_DIR
        adapters.mkdir()
        managed = {entry.adapter for entry in self._users.values()}
        managed |= set(self.community_adapters.names) if self.community_adapters is not None else set()
        resident = [name for name in self.adapter_pool.resident if name in managed]
        if resident:
            self.model.save_pretrained(str(adapters), selected_adapters=resident)
            (adapters / "README.md").unlink(missing_ok=True)  # the top-level card describes the whole state
        for name in sorted(managed - set(resident)):
            copy_tree(self.adapter_pool.path_of(name), adapters / name, what=f"the offloaded adapter {name!r}")
        config, _ = save_spring_files(
            directory, self.spring_config, self.model, self.memory, self.tokenizer if save_tokenizer else None,
            self.community_adapters,
        )  # fmt: skip
        self.score_cache.save(directory / CACHE_FILE)
        write_continual_state(directory, self._state())
        write_training_args(directory, self.args)
        base = config.base_model_name_or_path
        (directory / "README.md").write_text(
            render_card(
                "continual", base_model_line=f"base_model: {base}\n" if base else "", num_users=len(self._users)
            ),
            encoding="utf-8",
        )

    @classmethod
    def from_pretrained(
        cls,
        model: torch.nn.Module,
        pretrained_model_name_or_path: str | os.PathLike,
        tokenizer: Any = None,
        args: SpringTrainingArguments | None = None,
        memory: Any = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        memory_kwargs: dict | None = None,
        **kwargs,
    ) -> ContinualPersonalizer:
        """Resumes from a directory (or Hub repo) written by [`~ContinualPersonalizer.save_pretrained`]; the model
        comes first, as in peft's `PeftModel.from_pretrained(model, model_id)`.

        Adapters are loaded lazily: they are copied to the offload directory and loaded into `model` when their user
        is observed again (or by [`~ContinualPersonalizer.load_user`]).

        Args:
            model (`PreTrainedModel`): the same base model the state was trained on (without the saved adapters).
            pretrained_model_name_or_path (`str` or `os.PathLike`): a saved directory or a Hub repo id.
            tokenizer (*optional*): defaults to the saved tokenizer.
            args ([`SpringTrainingArguments`], *optional*): defaults to the saved ones (training settings included).
            memory (*optional*): defaults to the saved `LoGoMemory`.
            revision (`str`, *optional*): the revision of the Hub repo.
            token (`str` or `bool`, *optional*): the Hub token.
            cache_dir (`str` or `os.PathLike`, *optional*): the Hub cache.
            local_files_only (`bool`, *optional*, defaults to `False`): only read the Hub cache.
            force_download (`bool`, *optional*, defaults to `False`): download again even when cached.
            memory_kwargs (`dict`, *optional*): passed to the memory's load (e.g. `{"encoder": ...}` for a memory
                saved with a custom encoder).
            kwargs: passed to the constructor (`max_resident_adapters`, `offload_dir`, `callbacks`, `spring_config`,
                ...).

        Raises:
            `ValueError`: an invalid state file, or a `spring_config` whose `adapter_name_template` is not the one
            the state's adapters were named with.
        """
        if isinstance(model, (str, os.PathLike)) and isinstance(pretrained_model_name_or_path, torch.nn.Module):
            # The (path, model) order of earlier releases, accepted for one more release.
            logger.warning(
                "ContinualPersonalizer.from_pretrained(path, model) is deprecated and will stop working in the next "
                "release: pass the model first, from_pretrained(model, path), as in peft's PeftModel.from_pretrained."
            )
            model, pretrained_model_name_or_path = pretrained_model_name_or_path, model
        directory = resolve_folder(
            pretrained_model_name_or_path,
            marker=STATE_FILE,
            kind="ContinualPersonalizer",
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        # One version of the folder for the whole read: a save of another process waits (persistence/folder.py).
        with reading(directory):
            state = read_continual_state(directory)  # every name that becomes a path is checked before any copy
            if args is None:
                args = read_training_args(directory, SpringTrainingArguments, work_dir=kwargs.get("offload_dir"))
            else:
                saved = state.spring_args
                changed = {
                    k: (saved[k], getattr(args, k))
                    for k in SPRING_FIELDS
                    if k in saved and saved[k] != getattr(args, k)
                }
                if changed:
                    logger.warning(f"`args` differ from the saved SPRInG settings (saved, given): {changed}.")
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(directory))
            if memory is None:
                memory = load_memory_component(directory, memory_kwargs)
            spring_config = kwargs.pop("spring_config", None)
            if spring_config is None and (directory / SPRING_CONFIG_NAME).is_file():
                spring_config = SpringConfig.from_pretrained(directory)
            if spring_config is None and state.adapter_name_template != DEFAULT_ADAPTER_NAME_TEMPLATE:
                spring_config = SpringConfig(adapter_name_template=state.adapter_name_template)
            given = spring_config.adapter_name_template if spring_config is not None else DEFAULT_ADAPTER_NAME_TEMPLATE
            if given != state.adapter_name_template:
                raise ValueError(
                    f"`spring_config.adapter_name_template` is {given!r}, but the adapters in {directory} are named "
                    f"with {state.adapter_name_template!r}."
                )
            cache = None
            if (directory / CACHE_FILE).is_file():
                cache = BaseLogProbCache.load(directory / CACHE_FILE, model_name=base_name_or_path(model))
            kwargs.setdefault("max_resident_adapters", state.max_resident_adapters or 8)
            if state.shard is not None and "shard" not in kwargs:  # a worker's save resumes as that worker
                try:
                    kwargs["shard"] = UserShard(*state.shard)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{STATE_FILE} in {directory}: field 'shard': {err}") from None
            personalizer = cls(
                model, tokenizer, args, memory, spring_config=spring_config, score_cache=cache, **kwargs
            )
            personalizer.saved_base_model = state.base_model_name_or_path
            if state.learning_rate_choice is not None and personalizer.args.learning_rate == AUTO_LEARNING_RATE:
                # "auto" was resolved before the save: the resumed personalizer goes on with it (no new search).
                personalizer.learning_rate_choice = state.learning_rate_choice
            if state.users:  # a symlinked `adapters/`, adapter folder or file is refused before anything is copied
                adapter_tree(directory / ADAPTERS_DIR, what="the adapters folder")
            for user_id, entry in state.users.items():
                personalizer.add_user(user_id, entry, directory / ADAPTERS_DIR / entry.adapter)
            communities = read_community_adapters(directory, _adapter_folders(directory / ADAPTERS_DIR))
            if communities is not None:
                clash = sorted(set(communities.names) & {entry.adapter for entry in state.users.values()})
                if clash:
                    raise ValueError(f"{directory}: the community adapter(s) {clash} are also users' adapters.")
                for adapter in communities:
                    personalizer.adapter_pool.add_offloaded(
                        adapter.name, directory / ADAPTERS_DIR / adapter.name,
                        allowed_targets=personalizer._expected_targets(),
                    )  # fmt: skip
                personalizer.community_adapters = communities
            return personalizer

    def export_for_serving(
        self,
        directory: str | os.PathLike,
        *,
        users: Sequence[str] | None = None,
        max_lora_rank: int = 16,
        base_model_id: str | None = None,
    ) -> dict[str, Any]:
        """Writes the users' adapters for a multi-LoRA serving engine (vLLM, S-LoRA, LoRAX): one plain peft folder
        per user plus `serving_manifest.json` (user → `lora_name`, `lora_int_id`, `path`, `rank`, weights'
        `sha256`). Every folder is checked against vLLM's LoRA rules before anything is committed (see
        [`~persistence.serving.vllm_lora_problems`]); the save is atomic and keeps files it did not write, like
        [`~ContinualPersonalizer.save_pretrained`]. Memories and buffers are not exported: a server serves λ = 0
        (the adapter alone) or λ = 1 (adapter plus retrieved history in the prompt), see `docs/serving.md`.

        Args:
            directory (`str` or `os.PathLike`): the export folder.
            users (`Sequence[str]`, *optional*): whose adapters to export (default: every user, first observed
                first).
            max_lora_rank (`int`, *optional*, defaults to 16): the server's `--max-lora-rank` (vLLM's default); one of
                vLLM's allowed values.
            base_model_id (`str`, *optional*): the Hub repo id to record as the manifest's `base_model_name_or_path`
                (what a server loads). By default the model's Hub id when one is known (a Hub id, a Hub cache snapshot,
                the converted SmolLM2 folder), else its local path, with a warning.

        Returns:
            `dict`: the manifest written (empty on the other processes of a distributed run: only the main one
            writes).

        Raises:
            `KeyError`: an unknown user. `ValueError`: an adapter vLLM would refuse (the field is named), or a
            `base_model_id` that is not a repo id.

        `lora_int_id`s are vLLM's cache keys, so they are never reused: exporting again into the same folder keeps
        a user's id while their weights are unchanged, and gives new weights (or a new user) a new id; the ids that
        left are listed in `retired_lora_int_ids`. A server never serves an old or forgotten user's cached adapter
        under a reused id.
        """
        max_lora_rank = check_max_lora_rank(max_lora_rank)
        if isinstance(users, str):
            raise TypeError("`users` must be a sequence of user ids, not one string.")
        chosen = list(dict.fromkeys(check_user_id(u) for u in (self.users if users is None else users)))
        names = {user: self.adapter_name(user) for user in chosen}  # KeyError for an unknown user, before writing
        pool = self.adapter_pool
        return export_adapters_for_serving(
            directory,
            self.model,
            names,
            lambda name: None if pool.is_resident(name) else pool.path_of(name),
            max_lora_rank=max_lora_rank,
            base_model_id=base_model_id,
        )

    @classmethod
    def merge_shards(
        cls,
        shard_directories: Sequence[str | os.PathLike],
        save_directory: str | os.PathLike,
        model: torch.nn.Module,
        *,
        memory_kwargs: dict | None = None,
        **kwargs,
    ) -> ContinualPersonalizer:
        """Combines the states that sharded workers saved (each with `shard=`, see [`claim_user_shard`]) into one
        state in `save_directory`, and returns it: every user's adapter (a bit-exact copy), period counters, memory
        records and buffer ([`LoGoMemory.merge`]) and base log-probs. The result is the state a single process that
        trained every user would have saved. See [`~training.sharding.merge_shards`].

        Args:
            shard_directories (`Sequence[str | os.PathLike]`): the workers' saved folders.
            save_directory (`str` or `os.PathLike`): where the merged state is saved.
            model (`PreTrainedModel`): the base model (without adapters).
            memory_kwargs (`dict`, *optional*): passed to each shard's memory load (e.g. `{"encoder": ...}`).
            kwargs: passed to the merged personalizer's constructor (`max_resident_adapters`, `offload_dir`, ...).

        Returns:
            [`ContinualPersonalizer`]: the merged state (also saved). Its adapters, period counters, base log-probs,
            histories and buffers equal those of one process that trained every user; users are listed shard by
            shard (so a later `export_for_serving` numbers them in that order).

        Raises:
            `ValueError`: a user in two shards; a missing shard (each worker's save records its shard `index` of
            `count`); shards trained with other SPRInG settings, another adapter-name template or on another base
            model; some shards with a memory and some without. Nothing is written then.
        """
        return merge_shards(cls, shard_directories, save_directory, model, memory_kwargs=memory_kwargs, **kwargs)

    # ------------------------------------------------------------------------------------------------ inference
    def to_spring_model(self, spring_config: SpringConfig | None = None, users: Sequence[str] | None = None):
        """A [`SpringForCausalLM`] over the shared model and memory, for `generate(..., personalization=user)`.

        Args:
            spring_config ([`SpringConfig`], *optional*): decoding settings (default: the personalizer's, else the
                paper's with the personalizer's `adapter_name_template`). Its `adapter_name_template` must be the
                personalizer's: with another one no user would reach their adapter.
            users (`Sequence[str]`, *optional*): users whose adapters must be loaded (default: every user when they
                fit in the resident slots the community adapters leave, else none). Users whose adapter is not
                loaded decode with the community adapter nearest their memory items, else with the base model.

        Community adapters are loaded first (at most `max_resident_adapters`, the largest first; a warning names
        those left out), and the wrapper shares the personalizer's routing table, so a later erasure reaches it.

        Raises:
            `ValueError`: a `spring_config` with another `adapter_name_template`, or more `users` than the resident
            slots left.

        Note: rows without `personalization` use the model's active adapter (the last one trained or loaded), as
        `PeftModel.generate` does; wrap calls in `model.disable_adapter()` for the plain base model.
        """
        from ..generation import SpringForCausalLM

        config = spring_config or self.spring_config or SpringConfig(adapter_name_template=self._template)
        if config.adapter_name_template != self._template:
            raise ValueError(
                f"`spring_config.adapter_name_template` is {config.adapter_name_template!r}, but this personalizer "
                f"names its adapters with {self._template!r}; pass a SpringConfig with "
                f"adapter_name_template={self._template!r}."
            )
        self._sync_communities()
        table = self.community_adapters
        communities = sorted(table, key=lambda a: -a.num_items) if table is not None else []
        loaded = [a.name for a in communities[: self.max_resident_adapters]]
        if len(loaded) < len(communities):
            logger.warning(
                f"{len(communities)} community adapters but {self.max_resident_adapters} resident slots: "
                f"{[a.name for a in communities[len(loaded) :]]} are not loaded (their users decode with the base model)."
            )
        slots = self.max_resident_adapters - len(loaded)
        if users is None:
            users = self.users if len(self._users) <= slots else []
            if len(self._users) > slots:
                logger.warning(
                    f"{len(self._users)} users but only {slots} resident slots left; pass `users=` to choose whose "
                    "adapters to load (the others decode with their community's adapter or the base model)."
                )
        users = list(users)
        if len(users) > slots:
            raise ValueError(
                f"`users` has {len(users)} users; with {len(loaded)} community adapters loaded, at most {slots} of "
                f"the `max_resident_adapters` = {self.max_resident_adapters} slots are left."
            )
        for name in loaded:
            self.adapter_pool.make_resident(name)
        for user in users:
            self.load_user(user)
        self.model.eval()
        return SpringForCausalLM(
            self.model, memory=self.memory, config=config, tokenizer=self.tokenizer, community_adapters=table
        )
