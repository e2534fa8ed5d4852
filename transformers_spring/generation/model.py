"""`SpringForCausalLM`: a PeftModel-style wrapper whose `generate()` accepts `personalization=`."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig, LogitsProcessorList
from transformers.utils import PushToHubMixin, logging

from ..memory import LoGoMemory
from ..memory.logo import MEMORY_TYPES
from ..persistence.cards import render_card
from ..persistence.folder import component, read_manifest, save_folder
from ..persistence.hub import resolve_folder
from ..persistence.registry import qualified_name
from ..records import RetrievalMemory
from ..utils.compat import active_adapter_of, merged_generation_config, needs_synced_gpus, response_logits
from ..utils.modeling import base_name_or_path, is_peft_model
from .adapters import BASE_ADAPTER, AdapterRouter, activate_adapters, sanitize_adapter_name
from .config import SPRING_CONFIG_NAME, SpringConfig
from .fused import FusedDualPathDecoder
from .logits_process import RetrievalInterpolationLogitsProcessor, log_mixture
from .personalization import Personalization, RowPersonalization, normalize_personalization
from .prompting import HistoryPromptBuilder

logger = logging.get_logger(__name__)

ADAPTERS_DIR = "adapters"
MEMORY_DIR = "memory"
_UNSUPPORTED_WITH_PERSONALIZATION = ("assistant_model", "prompt_lookup_num_tokens", "inputs_embeds")


class SpringForCausalLM(PushToHubMixin, nn.Module):
    r"""
    Wraps any causal LM (a transformers model or a `PeftModel` with per-user LoRA adapters) so that
    `generate(..., personalization=...)` runs SPRInG's gated dual-path decoding. Attribute access falls through to the
    wrapped model, like `PeftModel`; without `personalization`, `generate` *is* the wrapped model's `generate`.

    For each personalized row, `generate`:
      1. retrieves from `memory.retrieve_context(user, query, k)` (the memory applies its relevance gate and its
         local/global mediator; a float `SpringConfig.gate` filters on top);
      2. inserts the retrieved history into the row's prompt (chat-template aware, see [`HistoryPromptBuilder`]);
      3. routes the user's LoRA adapter to that row (both paths) when the model has one (unknown users: the base);
      4. decodes with `p = λ · p(· | history, prompt) + (1 − λ) · p(· | prompt)` — rows whose gate stays closed decode
         with the parametric path only and cost no second forward.

    Args:
        model (`nn.Module`):
            The causal LM to wrap (anything with `generate`).
        memory (*optional*):
            Any object with `retrieve_context(user_id, query, k=..., use_global=...) -> MediatedContext`, e.g.
            `transformers_spring.memory.LoGoMemory`.
        config ([`SpringConfig`], *optional*):
            Decoding settings; defaults to the paper's (λ = 0.5, k = 2).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed to render history and to decode retrieval queries.

    Example:

    ```python
    >>> spring = SpringForCausalLM(model, memory=memory, tokenizer=tokenizer)
    >>> out = spring.generate(**inputs, personalization="alice", max_new_tokens=32, repetition_penalty=1.2)
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        memory: Any = None,
        config: SpringConfig | None = None,
        tokenizer: Any = None,
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
        self.last_personalization: list[RowPersonalization | None] = []
        self.last_generation_stats: dict[str, Any] = {}

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

        infos = self._retrieve(input_ids, attention_mask, rows)
        self.last_personalization = infos
        router, names = self._adapter_names(infos) or (None, None)
        expand = max(1, generation_config.num_return_sequences or 1)
        names = _repeat(names, expand)  # generate() repeats each row `num_return_sequences` times
        open_rows = [i for i, info in enumerate(infos) if info is not None and info.gate_open]
        if not open_rows:
            # Time spent on retrieval and prompt building before decoding (the whole overhead of a closed gate).
            self.last_generation_stats = {"mode": "plain", "open_rows": [], "prepare_s": time.perf_counter() - started}
            # Every gate is closed: this *is* plain generation (plus the users' adapters, if any).
            with activate_adapters(router, names):
                return self.base_model.generate(input_ids, **kwargs)

        processor = self._build_processor(infos, attention_mask, generation_config, expand, router, names)
        kwargs = dict(kwargs)
        if processor.repetition_penalty is not None:
            kwargs["repetition_penalty"] = 1.0  # applied inside the processor instead (per path or on the mixture)
        user_processors = kwargs.pop("logits_processor", None) or []
        # First among the user processors: anything the caller adds sees the mixture.
        kwargs["logits_processor"] = LogitsProcessorList([processor, *user_processors])
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
        probability, not a decoding heuristic's.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): left-padded prompts, as for `generate`.
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
        infos = self._retrieve(input_ids, attention_mask, rows)
        self.last_personalization = infos
        router, names = self._adapter_names(infos) or (None, None)
        device = getattr(self.base_model, "device", input_ids.device)
        # Two kinds of teacher-forced sequences: prompt + continuation (the parametric path) and history prompt +
        # continuation (the history path), each row on its own adapter, batched by length (see _path_logprobs).
        main_jobs, hist_jobs = [], []
        for index, info in enumerate(infos):
            name = names[index] if names is not None else None
            open_gate = info is not None and info.gate_open and info.weight > 0
            if not (open_gate and info.weight >= 1):  # λ = 1: the mixture is the history path alone
                prompt = input_ids[index][attention_mask[index].bool()].tolist()
                main_jobs.append((index, prompt, name))
            if open_gate:
                hist_jobs.append((index, list(info.history_ids), name))
        log_main = self._path_logprobs(main_jobs, continuations, router, device)
        log_hist = self._path_logprobs(hist_jobs, continuations, router, device)
        out = []
        for index, info in enumerate(infos):
            if index not in log_hist:
                out.append(log_main[index])
            elif index not in log_main:
                out.append(log_hist[index])
            else:
                weight = torch.tensor(float(info.weight))
                out.append(log_mixture(log_hist[index], log_main[index], torch.log(weight), torch.log1p(-weight)))
        return out

    def _path_logprobs(self, jobs, continuations, router, device, max_tokens: int = 4096) -> dict[int, torch.Tensor]:
        """log p(continuation | prefix) token by token for `jobs` (`(row, prefix ids, adapter name)`), from
        teacher-forced forwards of right-padded batches of similar length (at most `max_tokens` padded tokens each),
        every row routed to its adapter. Only the positions that predict a continuation token go through the LM
        head where the model allows it (`compat.response_logits`)."""
        out: dict[int, torch.Tensor] = {}
        order = sorted(jobs, key=lambda job: len(job[1]) + len(continuations[job[0]]))
        start = 0
        while start < len(order):
            width = len(order[start][1]) + len(continuations[order[start][0]])
            stop = start + 1
            while stop < len(order):  # sorted by length: the last row of a chunk is its widest
                longest = len(order[stop][1]) + len(continuations[order[stop][0]])
                if longest * (stop - start + 1) > max_tokens:
                    break
                width, stop = longest, stop + 1
            chunk, start = order[start:stop], stop
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            keep = torch.zeros((len(chunk), width), dtype=torch.bool)
            targets = []
            for r, (index, prefix, _) in enumerate(chunk):
                sequence = prefix + continuations[index]
                ids[r, : len(sequence)] = torch.tensor(sequence)
                mask[r, : len(sequence)] = 1
                keep[r, len(prefix) - 1 : len(sequence) - 1] = True
                targets += continuations[index]
            names = [name for _, _, name in chunk] if chunk[0][2] is not None else None
            with activate_adapters(router, names):
                logits = response_logits(self.base_model, ids.to(device), mask.to(device), keep.to(device)).float()
            target = torch.tensor(targets, dtype=torch.long, device=logits.device)
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0].cpu()
            for (index, _, _), piece in zip(chunk, logprobs.split([len(continuations[i]) for i, _, _ in chunk]),
                                            strict=True):  # fmt: skip
                out[index] = piece
        return out

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

    def _retrieve(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[Personalization | None]
    ) -> list[RowPersonalization | None]:
        cfg = self.spring_config
        builder = None
        infos: list[RowPersonalization | None] = []
        for index, row in enumerate(rows):
            if row is None:
                infos.append(None)
                continue
            if self.tokenizer is None:
                raise ValueError(
                    "SpringForCausalLM needs a tokenizer to render retrieved history: pass `tokenizer=` to "
                    "SpringForCausalLM(...) or from_pretrained(...)."
                )
            builder = builder or HistoryPromptBuilder(self.tokenizer, cfg)
            ids = input_ids[index][attention_mask[index].bool()].tolist()
            info = RowPersonalization(user=row.user)
            context = None
            if row.history is not None:
                items = list(row.history)
            else:
                if self.memory is None:
                    raise ValueError(
                        f"`personalization` for user {row.user!r} needs a memory: pass `memory=` to SpringForCausalLM "
                        "or give the history explicitly with Personalization(history=...)."
                    )
                info.query = row.query if row.query is not None else builder.query_text(ids)
                if info.query.strip():
                    context = self.memory.retrieve_context(
                        row.user,
                        info.query,
                        k=row.top_k or cfg.top_k,
                        use_global=cfg.use_global if row.use_global is None else row.use_global,
                        **(row.retrieval_kwargs or {}),
                    )
                    items = list(context.items)
                else:
                    logger.warning(f"Row {index} has an empty retrieval query; it is not personalised.")
                    items = []
            gate = row.gate if row.gate is not None else cfg.gate
            if not isinstance(gate, str):
                # Eq. 5: keep items strictly above the threshold (explicit strings/interactions carry no score).
                items = [it for it in items if getattr(it, "score", None) is None or it.score > gate]
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
            infos.append(info)
        return infos

    def _adapter_names(self, infos: list[RowPersonalization | None]) -> tuple[AdapterRouter, list[str]] | None:
        """Per-row adapter names, or None when nothing needs routing (no adapters, or nobody has one)."""
        router = AdapterRouter(self.base_model)
        if not router.has_adapters:
            return None
        default = active_adapter_of(router.layers, router.adapters, BASE_ADAPTER)
        names = []
        for info in infos:
            if info is None or info.user is None:  # not personalised, or explicit history without a user
                names.append(default)
            else:
                info.adapter = router.resolve(info.user, self.spring_config.adapter_name_template)
                names.append(info.adapter)
        if all(name == default for name in names) and default is not None:
            return None  # the model as it is already does the right thing
        if any(name is None for name in names):
            raise ValueError(
                "the model has several adapters active at once; rows without personalization cannot be routed. "
                "Activate a single adapter (set_adapter) or personalise every row."
            )
        return router, names

    def _build_processor(
        self,
        infos: list[RowPersonalization | None],
        attention_mask: torch.Tensor,
        generation_config: GenerationConfig,
        expand: int,
        router: AdapterRouter | None,
        names: list[str] | None,
    ) -> RetrievalInterpolationLogitsProcessor:
        cfg = self.spring_config
        rows_ids = [info.history_ids if info is not None else None for info in infos]
        weights = [info.weight if info is not None and info.gate_open else 0.0 for info in infos]
        width = max(len(ids) for ids in rows_ids if ids is not None)
        pad = _pad_id(generation_config, self.tokenizer)
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
            adapter_router=router,
            adapter_names=names,
        )

    def forget_user(self, user_id: str) -> bool:
        """Erases a user from the wrapper: their LoRA adapter (the one `personalization=user_id` routes to) and
        their memory (records, buffer, global contributions). The next `save_pretrained` writes none of it and
        removes the files earlier saves wrote for them.

        Args:
            user_id (`str`): the user.

        Returns:
            `bool`: whether the user had an adapter or memory.
        """
        from ..records import check_user_id
        from ..utils.compat import erase_adapter

        user_id = check_user_id(user_id)
        known = False
        forget = getattr(self.memory, "forget_user", None)
        if callable(forget):
            known = bool(forget(user_id))
        if is_peft_model(self.base_model):
            name = AdapterRouter(self.base_model).resolve(user_id, self.spring_config.adapter_name_template)
            if name in self.base_model.peft_config:
                known = True
                if not erase_adapter(self.base_model, name):  # the model's last adapter: zeroed, never saved again
                    self._erased_adapters = getattr(self, "_erased_adapters", set()) | {name}
        return known

    # ---------------------------------------------------------------------------------------------- persistence
    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """transformers' `PushToHubMixin.push_to_hub` (same arguments), except that the memory's machine-local ANN
        cache is never written into the upload (see `docs/memory.md#the-ann-cache`)."""
        from ..persistence.memory_files import no_ann_cache

        with no_ann_cache():
            return super().push_to_hub(repo_id, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        save_memory: bool = True,
        save_tokenizer: bool = True,
        **kwargs,
    ) -> None:
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
        """
        adopt = lambda d: (d / SPRING_CONFIG_NAME).is_file()  # noqa: E731 (a save of an earlier release)
        parts = lambda d: spring_components(d, self.memory)  # noqa: E731
        with save_folder(save_directory, "SpringForCausalLM", adopt=adopt, components=parts) as staging:
            self._write(staging, safe_serialization, save_memory, save_tokenizer)

    def _write(
        self, save_directory: os.PathLike, safe_serialization: bool, save_memory: bool, save_tokenizer: bool
    ) -> None:
        config, memory_saved = save_spring_files(
            save_directory,
            self.spring_config,
            self.base_model,
            self.memory if save_memory else None,
            self.tokenizer if save_tokenizer else None,
        )
        extras = ["the memory (`memory/`)"] if memory_saved else []
        erased = getattr(self, "_erased_adapters", set())
        kept = [name for name in getattr(self.base_model, "peft_config", {}) if name not in erased]
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
        model_id_or_path: str | os.PathLike,
        memory: Any = None,
        spring_config: SpringConfig | None = None,
        tokenizer: Any = None,
        *,
        load_adapters: bool = True,
        load_memory: bool = True,
        memory_kwargs: dict | None = None,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **hf_kwargs,
    ) -> SpringForCausalLM:
        r"""
        Loads a wrapper from a directory / Hub repo written by [`save_pretrained`] (config, adapters, memory,
        tokenizer; the base model comes from `base_model_name_or_path`), or wraps a plain transformers model id/path.

        Args:
            model_id_or_path (`str` or `os.PathLike`): a Spring directory or repo, or any causal LM id or path.
            memory (*optional*): a memory to use instead of the saved one.
            spring_config ([`SpringConfig`], *optional*): overrides the saved config.
            tokenizer (*optional*): a tokenizer to use instead of loading one.
            load_adapters (`bool`, *optional*, defaults to `True`): load saved LoRA adapters.
            load_memory (`bool`, *optional*, defaults to `True`): load a saved memory (needs
                `transformers_spring.memory.LoGoMemory`).
            memory_kwargs (`dict`, *optional*): passed to `LoGoMemory.from_pretrained` (e.g. `encoder=` for a memory
                saved with a custom encoder).
            is_trainable (`bool`, *optional*, defaults to `False`): load adapters trainable.
            revision, token: Hub options.
            hf_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`); `base_model_name_or_path`
                overrides the saved one.
        """
        from transformers import AutoModelForCausalLM

        base_override = hf_kwargs.pop("base_model_name_or_path", None)
        found = resolve_folder(
            model_id_or_path,
            marker=SPRING_CONFIG_NAME,
            kind="SpringForCausalLM",
            probe=True,
            revision=revision,
            token=token,
        )  # a plain model id or path gives None: wrapped below
        spring_dir = str(found) if found is not None else None
        if spring_dir is not None:
            config = SpringConfig.from_pretrained(spring_dir)
            base_id = base_override or config.base_model_name_or_path
            if not base_id:
                raise ValueError(
                    f"{SPRING_CONFIG_NAME} in {model_id_or_path!r} names no base model; pass `base_model_name_or_path=`."
                )
            model = AutoModelForCausalLM.from_pretrained(base_id, token=token, **hf_kwargs)
            adapters_dir = os.path.join(spring_dir, ADAPTERS_DIR)
            if load_adapters and os.path.isdir(adapters_dir):
                model = _load_adapters(model, adapters_dir, is_trainable)
            if memory is None and load_memory:
                memory = load_memory_component(Path(spring_dir), memory_kwargs)
            tokenizer_sources = [spring_dir, base_id]
        else:
            base_id = base_override or str(model_id_or_path)
            model = AutoModelForCausalLM.from_pretrained(base_id, revision=revision, token=token, **hf_kwargs)
            config = SpringConfig()
            tokenizer_sources = [base_id]
        if spring_config is not None:
            config = copy.deepcopy(spring_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base_id
        if tokenizer is None:
            tokenizer = _load_tokenizer(tokenizer_sources)
        return cls(model, memory=memory, config=config, tokenizer=tokenizer)


# -------------------------------------------------------------------------------------------------- module helpers
def spring_components(directory: Path, memory: Any) -> list[dict]:
    """The parts of a SPRInG folder, for its manifest (sentence-transformers' `modules.json` style): the config, and
    when present the adapters, the memory (with its class, which the loader dispatches on) and the tokenizer."""
    parts = [{"name": "config", "path": SPRING_CONFIG_NAME, "type": "SpringConfig"}]
    if (directory / ADAPTERS_DIR).is_dir():
        parts.append({"name": "adapters", "path": ADAPTERS_DIR, "type": "peft.LoraConfig"})
    if (directory / MEMORY_DIR).is_dir():
        parts.append({"name": "memory", "path": MEMORY_DIR, "type": qualified_name(type(memory))})
    if (directory / "tokenizer_config.json").is_file():
        parts.append({"name": "tokenizer", "path": ".", "type": "transformers.AutoTokenizer"})
    return parts


def load_memory_component(directory: Path, memory_kwargs: dict | None) -> Any:
    """The memory of a SPRInG folder, loaded with the class its manifest names (a `LoGoMemory` subclass survives the
    round trip; a folder without a manifest holds a `LoGoMemory`), or None when the folder has no memory."""
    if not (directory / MEMORY_DIR).is_dir():
        return None
    entry = component(read_manifest(directory), "memory")
    cls = MEMORY_TYPES.resolve(entry["type"]) if entry is not None else LoGoMemory
    return cls.from_pretrained(directory / (entry["path"] if entry else MEMORY_DIR), **(memory_kwargs or {}))


def save_spring_files(
    directory: str | os.PathLike, spring_config: SpringConfig | None, model: nn.Module, memory: Any, tokenizer: Any
) -> tuple[SpringConfig, bool]:
    """
    Writes what every SPRInG directory holds besides its adapters: `spring_config.json` (with the base model's id
    filled in), the memory under `memory/` and the tokenizer (each when not None).

    Returns:
        `(SpringConfig, bool)`: the config as written, and whether the memory was saved.
    """
    config = copy.deepcopy(spring_config) if spring_config is not None else SpringConfig()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_name_or_path(model)
    config.save_pretrained(directory)
    memory_saved = False
    if memory is not None:
        if callable(getattr(memory, "save_pretrained", None)):
            memory.save_pretrained(os.path.join(directory, MEMORY_DIR))
            memory_saved = True
        else:
            logger.warning(f"{type(memory).__name__} has no save_pretrained; the memory is not saved.")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    return config, memory_saved


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


def _repeat(names: Sequence[str] | None, expand: int) -> list[str] | None:
    if names is None:
        return None
    return [name for name in names for _ in range(expand)]


def _pad_id(generation_config: GenerationConfig, tokenizer: Any) -> int:
    for value in (generation_config.pad_token_id, getattr(tokenizer, "pad_token_id", None)):
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    eos = generation_config.eos_token_id
    if eos is not None:
        return int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    return 0  # masked out anyway


def _load_adapters(model: nn.Module, adapters_dir: str, is_trainable: bool) -> nn.Module:
    from peft import PeftModel

    found = []
    if os.path.isfile(os.path.join(adapters_dir, "adapter_config.json")):
        found.append(("default", adapters_dir))
    for name in sorted(os.listdir(adapters_dir)):
        sub = os.path.join(adapters_dir, name)
        if not os.path.isfile(os.path.join(sub, "adapter_config.json")):
            continue
        # A folder name becomes an adapter (module) name: only names the library writes, and no symlinked folder,
        # which could pull in another model's weights.
        if os.path.islink(sub) or name != sanitize_adapter_name(name):
            raise ValueError(f"{adapters_dir}: the adapter folder {name!r} is a symlink or not a valid adapter name.")
        found.append((name, sub))
    if not found:
        return model
    (first_name, first_path), rest = found[0], found[1:]
    model = PeftModel.from_pretrained(model, first_path, adapter_name=first_name, is_trainable=is_trainable)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    return model


def _load_tokenizer(sources: list[str]):
    from transformers import AutoTokenizer

    for source in sources:
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            continue
    logger.warning("No tokenizer could be loaded; pass `tokenizer=` to personalise generation.")
    return None
