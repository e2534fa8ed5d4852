"""Fused dual-path decoding: the parametric and the history-conditioned paths in one batched forward per step."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.utils import logging

from ..utils.compat import (
    cache_kwargs,
    has_unstackable_layers,
    is_stackable_cache,
    left_padded_positions,
    none_if_full,
    output_cache,
    pad_token_tensor,
    pop_cache,
    sample_loop,
    select_cache_rows,
    stack_cache_rows,
    supports_logits_to_keep,
)
from .adapters import override_adapters
from .cpu_linear import skinny_cpu_linear
from .logits_process import RetrievalInterpolationLogitsProcessor

logger = logging.get_logger(__name__)

# Model kwargs that generate() prepares and that this loop rebuilds itself (the cache, under either name, is taken
# out first). Any other non-None kwarg sends the request to processor mode, so a kwarg added by a future
# generate() changes the speed, never the result.
_HANDLED_MODEL_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep"}


class FusedDualPathDecoder:
    r"""
    A `custom_generate` callable for `model.generate(custom_generate=...)` that runs SPRInG's two decoding paths in
    **one forward per step**: the `B` main rows and the `R ≤ B` history rows (rows with an open gate) are stacked into
    one batch of `B + R` rows with a shared KV cache. Decoding at small batch is bound by reading the weights, so
    one forward on `B + R` rows is cheaper than the processor mode's serial second forward (measured on a 2-core CPU
    with SmolLM2-135M, 64 new tokens: 0.99x plain `generate` at batch 1 with the skinny CPU kernel, 1.71x without,
    against 2.10x for the serial processor).

    The mixture itself is still computed by the [`RetrievalInterpolationLogitsProcessor`] in the logits-processor
    list (switched to *external* mode: it receives the history logits instead of computing them), so both modes
    share the same arithmetic, processor order, early exit and gate logic, and produce the same tokens.

    Rows leave the history half of the batch (their cache rows are dropped) when they finish or when the processor's
    early exit fires, so the fused batch shrinks back to `B` rows.

    The decoder steps aside instead of failing: when `generate()` hands it a model kwarg it does not handle, or the
    model's KV cache cannot be stacked along the batch (sliding-window or hybrid layers, e.g. Gemma 3), it logs once
    and decodes the request with `generate()`'s own loop and the processor running its own history forward
    (processor mode), which gives the same tokens. `fallback_reason` then says why (`"kwarg:<name>"` or
    `"cache"`); it is None when the fused loop ran.

    Args:
        processor ([`RetrievalInterpolationLogitsProcessor`]):
            The processor that is also passed in `logits_processor`; it holds the history inputs and the weights.
        streamer (`BaseStreamer`, *optional*):
            Receives the new tokens; `generate()` does not pass its `streamer` to a `custom_generate` callable.
        skinny_cpu_linear (`bool`, *optional*, defaults to `True`):
            On CPU, compute the linear layers of the decoding steps (2–8 rows) with [`skinny_cpu_linear`], which
            makes a step on `B + R` rows cost about what a step on one row costs. Tokens may differ from the default
            kernel's only where two candidates tie up to rounding.
    """

    def __init__(
        self,
        processor: RetrievalInterpolationLogitsProcessor,
        streamer=None,
        skinny_cpu_linear: bool = True,
    ):
        self.processor = processor
        self.streamer = streamer
        self.skinny_cpu_linear = skinny_cpu_linear
        self.forward_calls = 0
        self.fallback_reason: str | None = None

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        **model_kwargs,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        # generate() hands a custom_generate callable neither `synced_gpus` nor `streamer` (only the keys of its own
        # signature that `_sample` lacks): SpringForCausalLM refuses synced GPUs before delegating, and the streamer
        # comes in through the constructor.
        processor, streamer = self.processor, self.streamer
        if processor not in logits_processor:
            raise ValueError("the fused decoder's processor must be in `logits_processor`.")
        if streamer is not None:
            streamer.put(input_ids.cpu())  # the prompt, as generate() sends it
        fused_kwargs = dict(model_kwargs)
        prepared_cache = pop_cache(fused_kwargs)  # generate()'s empty cache; the fused loop builds its own
        self.fallback_reason = self._fallback_reason(model, fused_kwargs, prepared_cache)
        output = None
        if self.fallback_reason is None:
            with skinny_cpu_linear(model) if self.skinny_cpu_linear else nullcontext():
                output = self._decode(
                    model, input_ids, logits_processor, stopping_criteria, generation_config, fused_kwargs
                )
        if output is None:  # processor mode, outside the skinny kernel so that tokens equal processor mode's
            processor.external = False
            output = sample_loop(
                model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, **model_kwargs
            )
        return output

    def _fallback_reason(self, model: nn.Module, model_kwargs: dict, prepared_cache) -> str | None:
        """Why this request cannot run fused (logged once per reason), or None."""
        unknown = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _HANDLED_MODEL_KWARGS)
        if unknown:
            logger.warning_once(
                f"fused dual-path decoding does not handle the model kwarg(s) {unknown}; these requests decode in "
                "processor mode (same tokens, one more forward per step)."
            )
            return f"kwarg:{unknown[0]}"
        # Known before any forward: from the config, or from the empty cache generate() prepared when its layers are
        # already typed. Otherwise the prefill finds out (and the request falls back then).
        layers = getattr(prepared_cache, "layers", None)
        if callable(getattr(prepared_cache, "get_seq_length", None)) and prepared_cache.get_seq_length() > 0:
            logger.warning_once(
                "fused dual-path decoding starts from an empty cache; a filled one decodes in processor mode."
            )
            return "cache"
        if has_unstackable_layers(model) or (layers and not is_stackable_cache(prepared_cache)):
            self._log_cache_fallback()
            return "cache"
        return None

    @staticmethod
    def _log_cache_fallback() -> None:
        logger.warning_once(
            "fused dual-path decoding cannot stack this model's KV cache (sliding-window, hybrid or static layers); "
            "it decodes in processor mode (same tokens, one more forward per step)."
        )

    def _decode(self, model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
        """The fused loop; returns None (before any token is chosen) when the cache turns out not to be stackable."""
        processor, streamer = self.processor, self.streamer
        if generation_config.output_attentions or generation_config.output_hidden_states:
            logger.warning_once("fused decoding returns no attentions / hidden states; they are ignored.")

        batch = input_ids.shape[0]
        device = input_ids.device
        pad_token_id = pad_token_tensor(generation_config, device)
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        return_dict = generation_config.return_dict_in_generate
        scores_out = () if (return_dict and generation_config.output_scores) else None
        logits_out = () if (return_dict and generation_config.output_logits) else None

        main_mask = model_kwargs.get("attention_mask")
        if main_mask is None:
            main_mask = torch.ones_like(input_ids)
        main_mask = main_mask.to(device)

        forward_kwargs = {"use_cache": True}
        if supports_logits_to_keep(model):
            forward_kwargs["logits_to_keep"] = 1
        router, row_names = processor.adapter_router, processor.adapter_names
        hist_rows = processor.active_rows
        hist_ids, hist_mask = processor.history_prefill_inputs()
        prefilled = self._prefill(
            model,
            input_ids,
            main_mask,
            hist_ids.to(device),
            hist_mask.to(device),
            hist_rows,
            row_names,
            forward_kwargs,
        )
        if prefilled is None:
            self.fallback_reason = "cache"
            self._log_cache_fallback()
            return None
        processor.external = True
        cache, logits, attention_mask, positions = prefilled
        hist_index, names = self._fused_rows(hist_rows, row_names, device)
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        while True:
            main_logits = logits[:batch]
            if hist_rows:
                processor.provide_history_logits(logits[batch:])
            next_token_scores = logits_processor(input_ids, main_logits)
            if return_dict:
                if scores_out is not None:
                    scores_out += (next_token_scores,)
                if logits_out is not None:
                    logits_out += (main_logits,)

            if generation_config.do_sample:
                probs = nn.functional.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores_out)
            finished = [row for row, flag in enumerate(unfinished.tolist()) if not flag]  # one device sync per step
            if len(finished) == batch:
                break

            # Finished rows need no history path any more; the processor may also have dropped rows (early exit).
            processor.deactivate(finished)
            new_rows = processor.active_rows
            if new_rows != hist_rows:
                keep = list(range(batch)) + [batch + hist_rows.index(r) for r in new_rows]
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                select_cache_rows(cache, keep_t)
                positions = positions[keep_t]
                if attention_mask is not None:
                    attention_mask = attention_mask[keep_t]
                hist_rows = new_rows
                hist_index, names = self._fused_rows(hist_rows, row_names, device)

            step_ids = torch.cat([next_tokens, next_tokens[hist_index]], dim=0)[:, None]
            positions = positions[:, -1:] + 1
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(step_ids), 1)], dim=-1)
            outputs = self._forward(model, router, names, step_ids, attention_mask, positions, cache, forward_kwargs)
            cache = output_cache(outputs)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
            del outputs

        if streamer is not None:
            streamer.end()
        if return_dict:
            return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores_out, logits=logits_out)
        return input_ids

    @staticmethod
    def _fused_rows(hist_rows: list[int], row_names: list[str] | None, device) -> tuple[torch.Tensor, list | None]:
        """Index of the history rows among the main rows, and the adapter names of the fused batch."""
        names = None if row_names is None else list(row_names) + [row_names[r] for r in hist_rows]
        return torch.tensor(hist_rows, dtype=torch.long, device=device), names

    def _forward(self, model, router, names, input_ids, attention_mask, position_ids, cache, forward_kwargs):
        with override_adapters(router, names):
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **cache_kwargs(model, cache),
                **forward_kwargs,
            )
        self.forward_calls += 1
        return outputs

    def _prefill(self, model, input_ids, main_mask, hist_ids, hist_mask, hist_rows, row_names, forward_kwargs):
        """
        Prefills both paths and returns `(cache, last-position logits, attention mask, position ids)` of the fused
        batch `[main rows ; history rows]`, or None when the two caches cannot be stacked.

        The two halves have different lengths. Padding the main rows to the history length and running one forward
        would spend compute on padding (prefill is compute-bound), so each half is prefilled on its own and the
        two KV caches are stacked, the shorter one left-padded with masked zeros.
        """
        device = input_ids.device
        router = self.processor.adapter_router
        main_names = None if row_names is None else list(row_names)
        main_positions = left_padded_positions(main_mask)
        main_out = self._forward(
            model, router, main_names, input_ids, none_if_full(main_mask), main_positions, None, forward_kwargs
        )
        if not hist_rows:
            logits = main_out.logits[:, -1].to(dtype=torch.float32, device=device)
            return output_cache(main_out), logits, none_if_full(main_mask), main_positions
        if not is_stackable_cache(output_cache(main_out)):  # known now: skip the history forward, fall back
            return None
        width = max(input_ids.shape[1], hist_ids.shape[1])
        hist_names = None if row_names is None else [row_names[r] for r in hist_rows]
        hist_out = self._forward(
            model, router, hist_names, hist_ids, none_if_full(hist_mask), left_padded_positions(hist_mask), None,
            forward_kwargs,
        )  # fmt: skip
        cache = stack_cache_rows(output_cache(main_out), output_cache(hist_out), width)
        if cache is None:
            return None
        mask = torch.cat([_left_pad(main_mask, width), _left_pad(hist_mask, width)], dim=0)
        logits = torch.cat([main_out.logits[:, -1], hist_out.logits[:, -1]], dim=0)
        return cache, logits.to(dtype=torch.float32, device=device), none_if_full(mask), left_padded_positions(mask)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, length) -> (batch, width) with zeros on the left (masked positions / pad ids)."""
    return F.pad(tensor, (width - tensor.shape[1], 0)) if tensor.shape[1] < width else tensor
