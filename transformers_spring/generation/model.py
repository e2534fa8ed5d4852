"""`SpringForCausalLM`: a PeftModel-style wrapper whose `generate()` accepts `personalization=`."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig, LogitsProcessorList
from transformers.utils import logging

from ..persistence.cards import render_card
from ..persistence.community_files import read_community_adapters
from ..persistence.folder import reading, save_folder
from ..persistence.hub import HubMixin, resolve_folder
from ..persistence.spring_folder import (  # the names training/continual.py imports from here too
    ADAPTERS_DIR,
    MEMORY_DIR,
    load_memory_component,
    load_saved_adapters,
    load_tokenizer,
    save_spring_files,
    spring_components,
)
from ..records import RetrievalMemory
from ..utils.compat import merged_generation_config, needs_synced_gpus
from ..utils.modeling import is_peft_model, pad_token_id
from .adapters import AdapterRouter, activate_adapters
from .community import CommunityAdapters
from .config import SPRING_CONFIG_NAME, SpringConfig
from .copying import CopyMixtureLogitsProcessor, build_copy_indexes
from .fused import FusedDualPathDecoder
from .logits_process import RetrievalInterpolationLogitsProcessor
from .personalization import RowPersonalization, normalize_personalization
from .planning import PersonalizationPlan, PersonalizationPlanner
from .scoring import score_plan

logger = logging.get_logger(__name__)

_UNSUPPORTED_WITH_PERSONALIZATION = ("assistant_model", "prompt_lookup_num_tokens", "inputs_embeds")


def _load_base_model(name: str, where: str, hub: dict, hf_kwargs: dict, *, hint: bool) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(name)`; a name that is no local folder and no loadable Hub model is a
    `FileNotFoundError` that says so first (transformers' own message is about connecting to the Hub)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, **hub, **hf_kwargs)
    except OSError as err:
        if os.path.exists(name):
            raise
        fix = " Pass `base_model_name_or_path=` (a local folder or Hub id of that model)." if hint else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{where} is no local folder ({os.path.abspath(name)}), and loading it as a Hub model id failed too: "
            f"{reason}{fix}"
        ) from err


class SpringForCausalLM(HubMixin, nn.Module):
    r"""
    Wraps any causal LM (a transformers model or a `PeftModel` with per-user LoRA adapters) so that
    `generate(..., personalization=...)` runs SPRInG's gated dual-path decoding. Attribute access falls through to the
    wrapped model, like `PeftModel`; without `personalization`, `generate` *is* the wrapped model's `generate`.

    For each personalized row, `generate` (and `score`, and the benchmark) runs one pipeline,
    [`PersonalizationPlanner`] (see [`plan`] to inspect it):
      1. retrieves from `memory.retrieve_context(user, query, k)` (the memory applies its relevance gate and its
         local/global mediator; a float `SpringConfig.gate` keeps only local items scored above it);
      2. inserts the retrieved history into the row's prompt (chat-template aware, see [`HistoryPromptBuilder`]);
      3. routes the user's LoRA adapter (`adapter_name_for(user)`) to that row, both paths; users without one decode
         with the community adapter nearest their memory items when the model has `community_adapters`, else with
         the base model (users the memory does not know either are refused with `SpringConfig(unknown_user="error")`);
      4. decodes with `p = λ · p(· | history, prompt) + (1 − λ) · p(· | prompt)` — rows whose gate stays closed decode
         with the parametric path only and cost no second forward;
      5. with `SpringConfig.copy_weight` μ > 0, mixes in the copy path: `(1 − μ) · p + μ · p_copy`, where `p_copy`
         continues spans of the row's prompt and of the user's retrieved responses (see `generation/copying.py`).

    Args:
        model (`nn.Module`):
            The causal LM to wrap (anything with `generate`).
        memory (*optional*):
            Any object with `retrieve_context(user_id, query, k=..., use_global=...) -> MediatedContext`, e.g.
            `transformers_spring.memory.LoGoMemory`.
        config ([`SpringConfig`], *optional*):
            Decoding settings; defaults to `SpringConfig()`, the measured preset (λ = 0.25, k = 2, every region;
            `SpringConfig(spring_preset="paper")` for the paper's).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed to render history and to decode retrieval queries.
        community_adapters ([`CommunityAdapters`], *optional*):
            The routing table of the model's community adapters (trained by
            [`~ContinualPersonalizer.train_community_adapters`]), saved as `community_adapters.json`.

    Example:

    ```python
    >>> spring = SpringForCausalLM(model, memory=memory, tokenizer=tokenizer)
    >>> out = spring.generate(**inputs, personalization="alice", max_new_tokens=32, repetition_penalty=1.2)
    ```
    """

    hub_commit_message = "Upload SpringForCausalLM"
    hub_delete_patterns = (f"{ADAPTERS_DIR}/**", f"{MEMORY_DIR}/**")

    def __init__(
        self,
        model: nn.Module,
        memory: Any = None,
        config: SpringConfig | None = None,
        tokenizer: Any = None,
        community_adapters: CommunityAdapters | None = None,
    ):
        super().__init__()
        if not hasattr(model, "generate"):
            raise TypeError(
                f"`model` must be a generative model with a `generate` method, got {type(model).__name__}."
            )
        if config is not None and not isinstance(config, SpringConfig):
            raise TypeError(f"`config` must be a SpringConfig, got {type(config).__name__}.")
        if memory is not None and not isinstance(memory, RetrievalMemory):
            raise TypeError(
                f"`memory` must be a RetrievalMemory (have a `retrieve_context` method), got {type(memory).__name__}."
            )
        self.base_model = model
        self.memory = memory
        self.spring_config = config if config is not None else SpringConfig()
        self.tokenizer = tokenizer
        if community_adapters is not None and not isinstance(community_adapters, CommunityAdapters):
            raise TypeError(
                f"`community_adapters` must be CommunityAdapters, got {type(community_adapters).__name__}."
            )
        self.community_adapters = community_adapters
        self.last_personalization: list[RowPersonalization | None] = []
        self.last_generation_stats: dict[str, Any] = {}
        self._users_without_adapter: set[str] = set()  # logged once each
        self._warned_right_padding = False  # the re-padding warning, once per wrapper
        self._erased_adapters: set[str] = set()  # forgotten users' zeroed adapters (peft keeps a model's last one)

    @property
    def planner(self) -> PersonalizationPlanner:
        """The personalization pipeline over the wrapper's current model, memory, config and tokenizer (the one
        path from `personalization=` to decoding inputs, see [`PersonalizationPlanner`])."""
        return PersonalizationPlanner(
            self.base_model, self.memory, self.spring_config, self.tokenizer, logged=self._users_without_adapter,
            communities=self.community_adapters,
        )  # fmt: skip

    def plan(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None = None, personalization=None):
        r"""
        What `generate` and `score` would do for each row, without decoding: the retrieved and gated items, λ, the
        history block and the adapter ([`RowPersonalization`] per row, None for rows without personalization).
        Retrieval runs as it does for `generate`, so a memory with an online (`"auto"`) gate observes the query.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): left-padded prompts.
            attention_mask (`torch.LongTensor` of shape `(batch, seq)`, *optional*): their mask.
            personalization: as for [`generate`].

        Returns:
            `list[RowPersonalization | None]`.
        """
        _check_input_ids(input_ids)
        rows = normalize_personalization(personalization, input_ids.shape[0])
        return self.planner.plan(input_ids, _prompt_mask(input_ids, attention_mask), rows).rows

    # ---------------------------------------------------------------------------------------------- delegation
    def __getattr__(self, name: str):
        """Forward missing attributes to the wrapped model."""
        try:
            return super().__getattr__(name)  # nn.Module's lookup of parameters, buffers and submodules
        except AttributeError:
            if name == "base_model":  # not yet set: avoid infinite recursion
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    # ---------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, *args, personalization: Any = None, **kwargs):
        r"""
        `generate()` of the wrapped model, personalised per row.

        Args:
            personalization (`str`, [`Personalization`], `dict` or list of those, *optional*):
                A user id (or [`Personalization`]) for every row, or a list with one entry per row (`None` = that row
                is not personalised). `None` (the default) delegates to the wrapped model's `generate` unchanged.
            args, kwargs:
                As for `transformers.GenerationMixin.generate`. Pass `attention_mask` for left-padded batches.
                `repetition_penalty` is applied per path before the mixture (`SpringConfig.penalty_mode`).

        Returns:
            What the wrapped model's `generate` returns (token ids of the prompt + the continuation by default).

        A right-padded batch (a row of `attention_mask` with a 0 after a 1, e.g. SmolLM2's tokenizer pads on the right
        by default) is re-padded on the left before planning and decoding, with a warning (once per wrapper): the
        returned sequences then hold the left-padded prompts, of the same width. Set `tokenizer.padding_side = "left"`
        to avoid the copy. Without `personalization` the batch goes to the wrapped model's `generate` untouched.

        Raises:
            `ValueError` / `TypeError` naming the argument for unsupported settings (`num_beams` > 1, assisted
            decoding, `inputs_embeds`), a `personalization` list whose length is not the batch size, an unknown
            `personalization` type, or a λ outside `[0, 1]`.
        """
        if personalization is None:
            return self.base_model.generate(*args, **kwargs)

        started = time.perf_counter()
        input_ids, kwargs = self._pop_input_ids(args, kwargs)
        batch = input_ids.shape[0]
        rows = normalize_personalization(personalization, batch)
        attention_mask = _prompt_mask(input_ids, kwargs.get("attention_mask"))
        generation_config = merged_generation_config(self.base_model, kwargs)
        self._check_generation_settings(generation_config, kwargs)
        if is_right_padded(attention_mask):
            # Decoding appends after the last position: a right-padded row would continue after its padding.
            input_ids, attention_mask = left_pad_batch(input_ids, attention_mask, self._pad_id(generation_config))
            kwargs["attention_mask"] = attention_mask
            self._warn_right_padding("generate")

        plan = self.planner.plan(input_ids, attention_mask, rows)
        infos, router = plan.rows, plan.router
        self.last_personalization = infos
        expand = max(1, generation_config.num_return_sequences or 1)
        names = _repeat(plan.names, expand)  # generate() repeats each row `num_return_sequences` times
        open_rows = plan.open_rows
        copier = self._build_copy_processor(plan, attention_mask, expand)  # None unless some row copies (μ > 0)
        if not open_rows:
            # Time spent on retrieval and prompt building before decoding (the whole overhead of a closed gate).
            self.last_generation_stats = {"mode": "plain", "open_rows": [], "prepare_s": time.perf_counter() - started}
            if copier is not None:  # p_spring is the plain (adapter) model's; generate's own processors run first
                kwargs = dict(kwargs)
                kwargs["logits_processor"] = LogitsProcessorList([copier, *(kwargs.get("logits_processor") or [])])
            # Every gate is closed: this *is* plain generation (plus the users' adapters, if any).
            with activate_adapters(router, names):
                output = self.base_model.generate(input_ids, **kwargs)
            if copier is not None:
                self.last_generation_stats["copy_row_steps"] = copier.copy_row_steps
            return output

        processor = self._build_processor(plan, attention_mask, generation_config, expand)
        kwargs = dict(kwargs)
        if processor.repetition_penalty is not None:
            kwargs["repetition_penalty"] = 1.0  # applied inside the processor instead (per path or on the mixture)
        user_processors = kwargs.pop("logits_processor", None) or []
        # First among the user processors: anything the caller adds sees the mixture. The copy path comes right after
        # SPRInG's processor, so that repetition penalty (applied inside it) acts on p_spring only.
        copiers = [copier] if copier is not None else []
        kwargs["logits_processor"] = LogitsProcessorList([processor, *copiers, *user_processors])
        decoder = None
        if self.spring_config.mode == "fused":
            # generate() does not hand `streamer` to a custom_generate callable: the decoder gets it directly.
            decoder = FusedDualPathDecoder(
                processor, kwargs.pop("streamer", None), skinny_cpu_linear=self.spring_config.skinny_cpu_linear
            )
            kwargs["custom_generate"] = decoder
        prepare_s = time.perf_counter() - started
        with activate_adapters(router, names):
            output = self.base_model.generate(input_ids, **kwargs)
        self.last_generation_stats = {
            "mode": self.spring_config.mode,
            "open_rows": open_rows,
            "steps": processor.steps,
            "history_row_steps": processor.history_row_steps,
            "history_forward_calls": processor.history_forward_calls,
            "fused_forward_calls": decoder.forward_calls if decoder is not None else 0,
            "fallback_reason": decoder.fallback_reason if decoder is not None else None,
            "early_exit_steps": dict(processor.exit_steps),
            "prepare_s": prepare_s,
        }
        if copier is not None:
            self.last_generation_stats["copy_row_steps"] = copier.copy_row_steps
        return output

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.LongTensor,
        continuations: Sequence[Sequence[int]],
        attention_mask: torch.LongTensor | None = None,
        personalization: Any = None,
    ) -> list[torch.Tensor]:
        r"""
        Per-token log-probabilities of given continuations under exactly what `generate(personalization=...)` would
        decode with: each row's adapter, its retrieved (and gated) history and its λ, mixed token by token as
        `log(λ · p(· | history, prompt) + (1 − λ) · p(· | prompt))`. A closed gate (λ = 0 or no history) scores the
        parametric path alone; λ = 1 the history path alone. This is the likelihood of a user's real text that the
        benchmark reports as NLL. No repetition penalty or other logits processor is applied: it is the model's own
        probability, not a decoding heuristic's. The copy path (`copy_weight` > 0) is part of that model, and mixed in
        token by token as generate does, with the context `prompt + continuation[:t]`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): the prompts, as for `generate`; each row's tokens
                are taken where `attention_mask` is 1, so left and right padding score alike.
            continuations (sequence of sequences of `int`): per row, the token ids to score after the prompt.
            attention_mask (`torch.LongTensor` of shape `(batch, seq)`, *optional*): the prompts' mask.
            personalization: as for [`generate`]; `None` scores every row with the wrapped model alone.

        Returns:
            `list[torch.Tensor]`: per row, a float32 tensor of `len(continuations[row])` log-probabilities.
        """
        _check_input_ids(input_ids)
        batch = input_ids.shape[0]
        if isinstance(continuations, (str, bytes)) or len(continuations) != batch:
            raise ValueError(f"`continuations` must give one list of token ids per row ({batch} rows).")
        continuations = [[int(t) for t in row] for row in continuations]
        if any(not row for row in continuations):
            raise ValueError("every row of `continuations` needs at least one token.")
        attention_mask = _prompt_mask(input_ids, attention_mask)
        rows = normalize_personalization(personalization, batch) if personalization is not None else [None] * batch
        plan = self.planner.plan(input_ids, attention_mask, rows)
        self.last_personalization = plan.rows
        return score_plan(
            self.base_model, plan, input_ids, attention_mask, continuations, self.spring_config.copy_max_ngram
        )

    # ---------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _pop_input_ids(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
        kwargs = dict(kwargs)
        if len(args) > 1:
            raise TypeError(
                "SpringForCausalLM.generate takes the inputs as its only positional argument; pass the others by "
                "keyword."
            )
        for name in _UNSUPPORTED_WITH_PERSONALIZATION:
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` is not supported together with `personalization`.")
        given = [name for name in ("inputs", "input_ids") if kwargs.get(name) is not None]
        if args and given or len(given) > 1:
            raise ValueError("pass the prompt once: positionally, as `inputs=` or as `input_ids=`.")
        input_ids = args[0] if args else kwargs.pop(given[0], None) if given else None
        for name in ("inputs", "input_ids"):
            kwargs.pop(name, None)
        _check_input_ids(input_ids)
        return input_ids, kwargs

    def _check_generation_settings(self, config: GenerationConfig, kwargs: dict) -> None:
        if (config.num_beams or 1) > 1:
            raise ValueError(
                f"`num_beams`={config.num_beams} is not supported with `personalization`: the history path's cache "
                "cannot follow beam reordering. Use greedy decoding or sampling."
            )
        if self.spring_config.mode == "fused" and kwargs.get("custom_generate") is not None:
            raise ValueError("`custom_generate` cannot be combined with `personalization` in fused mode.")
        if self.spring_config.mode == "fused" and needs_synced_gpus(self.base_model, kwargs.get("synced_gpus")):
            # Checked here: generate() does not pass `synced_gpus` on to a custom_generate callable.
            raise ValueError(
                "fused dual-path decoding does not support synced GPUs (`synced_gpus=True`, or DeepSpeed ZeRO-3 / FSDP "
                "across processes); use `SpringConfig(mode='processor')`."
            )
        if config.use_cache is False:
            logger.warning_once("`use_cache=False` is ignored by the history path, which always keeps a KV cache.")

    @torch.no_grad()
    def logits_processor(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        personalization: Any = None,
        **generation_kwargs,
    ) -> RetrievalInterpolationLogitsProcessor:
        r"""
        The [`RetrievalInterpolationLogitsProcessor`] that `generate(personalization=...)` would use in
        `mode="processor"`, for a plain `model.generate(input_ids, logits_processor=[processor], ...)` call: the same
        pipeline ([`plan`]) builds each row's history and λ. Build one per `generate` call (it is single-use).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): the left-padded prompts you will pass to `generate`.
            attention_mask (`torch.LongTensor` of shape `(batch, seq)`, *optional*): their mask.
            personalization: as for [`generate`].
            generation_kwargs: the settings you will pass to `generate` (`repetition_penalty` goes to the processor,
                per path: pass `repetition_penalty=1.0` to `generate` itself).

        Raises:
            `ValueError`: when rows need different LoRA adapters (plain `generate` decodes the main path with the
            model's active adapter only), use [`generate`] with `personalization=` for that; or when
            `attention_mask` is right-padded (the batch goes to your own `generate`, which would continue after the
            padding): tokenize with `tokenizer.padding_side = "left"`.
        """
        _check_input_ids(input_ids)
        attention_mask = _prompt_mask(input_ids, attention_mask)
        if is_right_padded(attention_mask):
            # Unlike `generate`, re-padding here cannot help: the caller decodes their own (right-padded) batch.
            raise ValueError(
                "`attention_mask` is right-padded (a row has padding after its tokens), but `generate` continues "
                'each row after its last position: set `tokenizer.padding_side = "left"` and tokenize the batch '
                "again, or call SpringForCausalLM.generate(..., personalization=...), which re-pads it."
            )
        rows = normalize_personalization(personalization, input_ids.shape[0])
        plan = self.planner.plan(input_ids, attention_mask, rows)
        self.last_personalization = plan.rows
        if plan.router is not None:
            raise ValueError(
                "these rows decode with different LoRA adapters, which plain `generate` cannot route; call "
                "SpringForCausalLM.generate(..., personalization=...) instead."
            )
        if any(info is not None and info.copies for info in plan.rows):
            logger.warning_once(
                "`copy_weight` > 0: the copy path is not part of the processor `logits_processor()` returns; "
                "SpringForCausalLM.generate(..., personalization=...) mixes it in."
            )
        generation_config = merged_generation_config(self.base_model, dict(generation_kwargs))
        return self._build_processor(plan, attention_mask, generation_config, 1)

    def _build_copy_processor(
        self, plan: PersonalizationPlan, attention_mask: torch.Tensor, expand: int
    ) -> CopyMixtureLogitsProcessor | None:
        """The copy path's processor for the planned rows (repeated `expand` times each), None when no row copies:
        μ = 0 adds nothing to decoding."""
        indexes = build_copy_indexes(plan.rows, self.spring_config.copy_max_ngram)
        if all(index is None for index in indexes):
            return None
        weights = [
            info.copy_weight if index is not None else 0.0 for info, index in zip(plan.rows, indexes, strict=True)
        ]
        lengths = attention_mask.ne(0).sum(-1).tolist()
        return CopyMixtureLogitsProcessor(
            [i for i in indexes for _ in range(expand)],
            [w for w in weights for _ in range(expand)],
            [n for n in lengths for _ in range(expand)],
        )

    def _build_processor(
        self, plan: PersonalizationPlan, attention_mask: torch.Tensor, generation_config: GenerationConfig, expand: int
    ) -> RetrievalInterpolationLogitsProcessor:
        infos = plan.rows
        names = _repeat(plan.names, expand)
        cfg = self.spring_config
        rows_ids = [info.history_ids if info is not None else None for info in infos]
        weights = [info.weight if info is not None and info.gate_open else 0.0 for info in infos]
        betas = [info.adaptive_weight if info is not None else 0.0 for info in infos]
        width = max((len(ids) for ids in rows_ids if ids is not None), default=1)
        pad = self._pad_id(generation_config)
        history = torch.full((len(infos), width), pad, dtype=torch.long)
        history_mask = torch.zeros((len(infos), width), dtype=torch.long)
        for index, ids in enumerate(rows_ids):
            if ids is not None:
                history[index, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                history_mask[index, width - len(ids) :] = 1
        device = attention_mask.device
        history, history_mask = history.to(device), history_mask.to(device)
        if expand > 1:  # num_return_sequences: generate() repeats each row
            history = history.repeat_interleave(expand, 0)
            history_mask = history_mask.repeat_interleave(expand, 0)
            attention_mask = attention_mask.repeat_interleave(expand, 0)
            weights = [w for w in weights for _ in range(expand)]
            betas = [b for b in betas for _ in range(expand)]
        return RetrievalInterpolationLogitsProcessor(
            self.base_model,
            history,
            history_mask,
            weights,
            repetition_penalty=generation_config.repetition_penalty,  # None / 1.0 = off
            penalty_mode=cfg.penalty_mode,
            prompt_attention_mask=attention_mask,
            early_exit_epsilon=cfg.early_exit_epsilon,
            early_exit_patience=cfg.early_exit_patience,
            eos_token_id=generation_config.eos_token_id,
            adapter_router=plan.router,
            adapter_names=names,
            adaptive_weight=betas,
        )

    def _pad_id(self, generation_config: GenerationConfig) -> int:
        """The id padding is filled with: the generation config's pad id, the tokenizer's (it outranks the EOS
        fallback), then EOS; 0 when none is set (pad positions are masked out)."""
        tokenizer_pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad_token_id(generation_config.pad_token_id, tokenizer_pad, generation_config.eos_token_id, default=0)

    def _warn_right_padding(self, method: str) -> None:
        if self._warned_right_padding:
            return
        self._warned_right_padding = True
        logger.warning(
            f"SpringForCausalLM.{method} got a right-padded batch (an `attention_mask` row has padding after its "
            "tokens); its rows were re-padded on the left before decoding, so the returned sequences hold "
            'left-padded prompts. Set `tokenizer.padding_side = "left"` to avoid this (warned once per wrapper).'
        )

    def forget_user(self, user_id: str) -> bool:
        """Erases a user from the wrapper: their LoRA adapter (the one `personalization=user_id` routes to) and
        their memory (records, buffer, global contributions). The community adapters their items trained are dropped
        (the wrapper cannot retrain them; [`~ContinualPersonalizer.forget_user`] retrains them on the remaining
        members), and their id leaves the routing table. The next `save_pretrained` writes none of it and removes
        the files earlier saves wrote for them.

        Args:
            user_id (`str`): the user.

        Returns:
            `bool`: whether the user had an adapter, memory records or a community adapter.
        """
        from ..records import check_user_id
        from ..utils.compat import erase_adapter

        user_id = check_user_id(user_id)
        known = False
        forget = getattr(self.memory, "forget_user", None)
        if callable(forget):
            known = bool(forget(user_id))
        names = []
        if is_peft_model(self.base_model):
            name = AdapterRouter(self.base_model).resolve(user_id, self.spring_config.adapter_name_template)
            communal = self.community_adapters is not None and name in self.community_adapters
            names = [name] if name in self.base_model.peft_config and not communal else []  # (no user owns those)
            known = known or bool(names)
        if self.community_adapters is not None:
            for adapter in self.community_adapters:
                if user_id in adapter.initialized:  # (their id must not outlive them in community_adapters.json)
                    adapter.initialized.remove(user_id)
            # The wrapper cannot retrain a community adapter without the user: it drops the ones they trained
            # (ContinualPersonalizer.forget_user retrains them on the remaining members instead).
            contributed = self.community_adapters.contributed(user_id)
            for name in contributed:
                self.community_adapters.remove(name)
            if contributed:
                logger.info(f"Forgetting {user_id!r} dropped the community adapter(s) they trained: {contributed}.")
            names += [n for n in contributed if is_peft_model(self.base_model) and n in self.base_model.peft_config]
            known = known or bool(contributed)
        for name in names:
            if not erase_adapter(self.base_model, name):  # the model's last adapter: zeroed, never saved again
                self._erased_adapters.add(name)
        return known

    # ---------------------------------------------------------------------------------------------- persistence
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool = True,
        save_memory: bool = True,
        save_tokenizer: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs,
    ) -> Any:
        """
        Saves the Spring config, and when present the LoRA adapters (`adapters/`, peft layout), the memory
        (`memory/`, through its own `save_pretrained`) and the tokenizer. The base model's weights are not saved: the
        config records `base_model_name_or_path`. Only files earlier saves of this wrapper wrote are replaced or
        removed; anything else in `save_directory` is kept (see [`~persistence.save_folder`]).

        Args:
            save_directory (`str` or `os.PathLike`): target directory (created if needed).
            safe_serialization (`bool`, *optional*, defaults to `True`): adapters as safetensors.
            save_memory (`bool`, *optional*, defaults to `True`): also save the memory.
            save_tokenizer (`bool`, *optional*, defaults to `True`): also save the tokenizer.
            push_to_hub (`bool`, *optional*, defaults to `False`): then push the same save to the Hub (see
                [`push_to_hub`]).
            repo_id (`str`, *optional*): the repo to push to; defaults to the name of `save_directory`.
            push_kwargs: the other arguments of [`push_to_hub`] (`private`, `token`, `commit_message`, ...).

        Returns:
            The `CommitInfo` of the upload when `push_to_hub`, else None.

        Raises:
            `TypeError`: `push_kwargs` holds a name [`push_to_hub`] does not take (checked before anything is written).
        """
        import functools

        self._check_push_kwargs(push_to_hub, push_kwargs)  # before anything is written
        adopt = lambda d: (d / SPRING_CONFIG_NAME).is_file()  # noqa: E731 (a save of an earlier release)
        parts = lambda d: spring_components(d, self.memory)  # noqa: E731
        with save_folder(save_directory, "SpringForCausalLM", adopt=adopt, components=parts) as staging:
            self._write(staging, safe_serialization, save_memory, save_tokenizer)
        if not push_to_hub:
            return None
        save = functools.partial(
            self.save_pretrained,
            safe_serialization=safe_serialization,
            save_memory=save_memory,
            save_tokenizer=save_tokenizer,
        )  # the upload is this same save, written again into a folder of its own
        return self._push_saved(save_directory, repo_id, push_kwargs, save)

    def _write(
        self, save_directory: os.PathLike, safe_serialization: bool, save_memory: bool, save_tokenizer: bool
    ) -> None:
        erased = self._erased_adapters
        kept = [name for name in getattr(self.base_model, "peft_config", {}) if name not in erased]
        communities = None
        if self.community_adapters is not None and is_peft_model(self.base_model):
            # Only the community adapters whose weights this save writes (one evicted from a personalizer's pool, or
            # dropped, is not in the model): a folder's table never names an adapter the folder lacks.
            saved = [a for a in self.community_adapters if a.name in kept]
            communities = CommunityAdapters(
                self.community_adapters.min_users, self.community_adapters.min_similarity, saved,
                max_items_per_user=self.community_adapters.max_items_per_user,
            )  # fmt: skip
        config, memory_saved = save_spring_files(
            save_directory,
            self.spring_config,
            self.base_model,
            self.memory if save_memory else None,
            self.tokenizer if save_tokenizer else None,
            communities,
        )
        extras = ["the memory (`memory/`)"] if memory_saved else []
        if is_peft_model(self.base_model) and kept:  # a forgotten user's zeroed (undeletable) adapter is not saved
            self.base_model.save_pretrained(
                os.path.join(save_directory, ADAPTERS_DIR), safe_serialization=safe_serialization,
                selected_adapters=kept,
            )  # fmt: skip
            extras.append("the LoRA adapters (`adapters/`, peft layout)")
        elif AdapterRouter(self.base_model).has_adapters:
            logger.warning("The model has adapters but is not a PeftModel; wrap it with peft to save them.")
        base = config.base_model_name_or_path or "unknown"
        base_line = f"base_model: {base}\n" if config.base_model_name_or_path else ""
        with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(
                render_card(
                    "spring", base=base, base_model_line=base_line, extras=("; " + ", ".join(extras)) if extras else ""
                )
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        memory: Any = None,
        spring_config: SpringConfig | None = None,
        tokenizer: Any = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        load_adapters: bool = True,
        load_memory: bool = True,
        memory_kwargs: dict | None = None,
        is_trainable: bool = False,
        **hf_kwargs,
    ) -> SpringForCausalLM:
        r"""
        Loads a wrapper from a directory / Hub repo written by [`save_pretrained`] (config, adapters, memory,
        tokenizer; the base model comes from `base_model_name_or_path`), or wraps a plain transformers model id/path.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a Spring directory or repo, or any causal LM id or
                path.
            memory (*optional*): a memory to use instead of the saved one.
            spring_config ([`SpringConfig`], *optional*): overrides the saved config.
            tokenizer (*optional*): a tokenizer to use instead of loading one.
            revision (`str`, *optional*): the revision of `pretrained_model_name_or_path` on the Hub (not of the base
                model a Spring repo names).
            token (`str` or `bool`, *optional*): the Hub token, for the Spring repo and the base model.
            cache_dir (`str` or `os.PathLike`, *optional*): the Hub cache, for the Spring repo and the base model.
            local_files_only (`bool`, *optional*, defaults to `False`): only read the Hub cache.
            force_download (`bool`, *optional*, defaults to `False`): download again even when cached.
            load_adapters (`bool`, *optional*, defaults to `True`): load saved LoRA adapters.
            load_memory (`bool`, *optional*, defaults to `True`): load a saved memory (needs
                `transformers_spring.memory.LoGoMemory`).
            memory_kwargs (`dict`, *optional*): passed to `LoGoMemory.from_pretrained` (e.g. `encoder=` for a memory
                saved with a custom encoder).
            is_trainable (`bool`, *optional*, defaults to `False`): load adapters trainable.
            hf_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`); `base_model_name_or_path`
                overrides the saved one.
        """
        base_override = hf_kwargs.pop("base_model_name_or_path", None)
        hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download)
        # A plain model id or path gives None: it is wrapped below.
        found = resolve_folder(
            pretrained_model_name_or_path, marker=SPRING_CONFIG_NAME, kind="SpringForCausalLM", probe=True,
            revision=revision, **hub,
        )  # fmt: skip
        if found is not None:
            with reading(found):  # one version of the folder per read: a save of another process waits
                config = SpringConfig.from_pretrained(found)
            base_id = base_override or config.base_model_name_or_path
            if not base_id:
                raise ValueError(
                    f"{SPRING_CONFIG_NAME} in {pretrained_model_name_or_path!r} names no base model; pass "
                    "`base_model_name_or_path=`."
                )
            # Outside the folder's lock: a base model download may take minutes, and saves would wait for it.
            where = f"the base model {base_id!r} that {SPRING_CONFIG_NAME} in {str(found)!r} names"
            model = _load_base_model(base_id, where, hub, hf_kwargs, hint=base_override is None)
            with reading(found):
                # `lexists`: a symlinked `adapters` (even a dangling one) is refused by the load, not silently skipped.
                communities = None
                if load_adapters and os.path.lexists(found / ADAPTERS_DIR):
                    model = load_saved_adapters(model, found / ADAPTERS_DIR, is_trainable)
                    communities = read_community_adapters(found, set(getattr(model, "peft_config", {}) or {}))
                if memory is None and load_memory:
                    memory = load_memory_component(found, memory_kwargs)
                if tokenizer is None:
                    tokenizer = load_tokenizer([str(found), base_id], **hub)
        else:
            communities = None
            base_id = base_override or str(pretrained_model_name_or_path)
            hub["revision"] = revision  # the model and its tokenizer come from the repo named
            where = f"{base_id!r}, a SpringForCausalLM folder or a causal LM"
            model = _load_base_model(base_id, where, hub, hf_kwargs, hint=False)
            config = SpringConfig()
            if tokenizer is None:
                tokenizer = load_tokenizer([base_id], **hub)
        if spring_config is not None:
            config = copy.deepcopy(spring_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base_id
        return cls(model, memory=memory, config=config, tokenizer=tokenizer, community_adapters=communities)


# -------------------------------------------------------------------------------------------------- module helpers
def _check_input_ids(input_ids: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("`input_ids` must be a 2-D LongTensor (batch, seq_len) to personalise or score.")


def _prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The prompts' attention mask (all ones when omitted), checked against `input_ids`."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}."
        )
    return attention_mask


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether some row of `attention_mask` has a masked position after an attended one (right padding).

    Args:
        attention_mask (`torch.Tensor` of shape `(batch, seq)`): 1 for tokens, 0 for padding.
    """
    mask = attention_mask.bool()
    return bool((mask[:, :-1] & ~mask[:, 1:]).any())


def left_pad_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch re-padded on the left: each row's attended tokens, in order, moved to the end of the row, and the
    positions before them filled with `pad_id` (masked out). Left-padded rows come back unchanged; the width is kept.

    Args:
        input_ids (`torch.Tensor` of shape `(batch, seq)`): the token ids.
        attention_mask (`torch.Tensor` of shape `(batch, seq)`): 1 for tokens, 0 for padding.
        pad_id (`int`): the id the padding is filled with.

    Returns:
        `(input_ids, attention_mask)`, new tensors of the same shape, dtype and device.
    """
    # A stable sort on the mask puts the padding first and keeps the tokens' order.
    order = torch.argsort(attention_mask.ne(0).long(), dim=1, stable=True)
    mask = attention_mask.gather(1, order)
    return input_ids.gather(1, order).masked_fill(mask == 0, pad_id), mask


def _repeat(names: Sequence[str] | None, expand: int) -> list[str] | None:
    if names is None:
        return None
    return [name for name in names for _ in range(expand)]
