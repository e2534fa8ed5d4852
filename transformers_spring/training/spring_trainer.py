"""`SpringTrainer`: one user's SPRInG update for one period (score → select → train → rebuild the buffer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging

from ..records import BufferStore, Interaction, check_user_id, coerce_interactions
from ..utils.compat import supports_logits_to_keep_mask
from ..utils.validation import check_int
from .data import (
    EncodedSample,
    SpringDataCollator,
    SpringDataset,
    SpringFormatter,
    label_targets,
)
from .drift import (
    BaseLogProbCache,
    drift_scores,
    response_logits,
    score_stats,
    select_top,
    top_n,
)
from .lora import (
    activate_adapter,
    adapter_name_for,
    adapter_names,
    adapter_state,
    build_lora_config,
    create_adapter,
    restore_adapter_state,
)
from .spring_config import (
    AUTO_LEARNING_RATE,
    SpringTrainingArguments,
    count_model_parameters,
    default_learning_rate,
)

logger = logging.get_logger(__name__)


@dataclass
class SpringPeriodOutput:
    """What one SPRInG period did for one user.

    Args:
        user_id (`str`): the user.
        period (`int`): the period index (0 initialises the adapter on all samples).
        adapter_name (`str`): the user's adapter in the peft model.
        num_new (`int`): how many new training samples the period brought.
        selected_ids (`list[str]`): ids of the samples the adapter was trained on (input order).
        scores (`dict[str, float]`): the pre-update drift score of each new sample (empty when no scoring ran:
            period 0, `selection_ratio=1`, or an empty period).
        buffer_ids (`list[str]`): the user's residual buffer after the period, best first.
        buffer_scores (`dict[str, float]`): the score stored with each buffer item.
        evicted_ids (`list[str]`): old buffer items dropped this period.
        train_output (`TrainOutput`, *optional*): the Trainer's output (None when nothing was trained).
        metrics (`dict[str, float]`): counts, score statistics, buffer turnover and timings (also logged).
        skipped (`bool`): True for an empty period (a no-op).
    """

    user_id: str
    period: int
    adapter_name: str
    num_new: int = 0
    selected_ids: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    buffer_ids: list[str] = field(default_factory=list)
    buffer_scores: dict[str, float] = field(default_factory=dict)
    evicted_ids: list[str] = field(default_factory=list)
    train_output: TrainOutput | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


class SpringTrainer(Trainer):
    r"""
    A [`~transformers.Trainer`] for one user and one period of SPRInG (paper Algorithm 1):

    1. **score** the period's new samples with Eq. 1, `S = −log(p_adap / p_base) + α · log p_base`, under the user's
       current adapter and the base model (the same model inside `disable_adapter()`; base log-probs are cached);
    2. **select** the top `ceil(selection_ratio · n)` (Eq. 2). Period 0 trains on all samples, unscored, and so does
       `selection_ratio=1.0` (the default `"measured"` preset; the paper's top 30 % is `selection_ratio=0.3`);
    3. **train** the user's LoRA adapter from its previous state on the selected samples with the normal Trainer
       loop (callbacks, logging, gradient accumulation and `accelerate launch` all work; the old buffer is never
       trained on);
    4. **rebuild the residual buffer** (Eq. 3–4): re-score `selected ∪ old buffer` with the updated adapter and keep
       the top `buffer_size` in the user's pinned buffer of `memory` (`LoGoMemory.set_buffer`, with scores). With
       `selection_ratio=1.0` the new samples have no pre-update score, so the pool is always scored here: the same
       Eq. 3–4 buffer, from one scoring pass per period instead of two.

    `train()` runs all four steps and returns the Trainer's `TrainOutput` (its metrics include the SPRInG ones);
    [`~SpringTrainer.run_period`] does the same and returns the full [`SpringPeriodOutput`]. A trainer runs its period
    once; create a new one for the next period or user ([`ContinualPersonalizer`] does this for many users).

    The update is all-or-nothing: if anything fails after training started, the adapter's weights are restored and
    the buffer is left as it was. Validation (user id, period, every interaction's fields) happens in `__init__`,
    before the model or the memory is touched.

    The loss is the token-level cross-entropy on response tokens, summed and divided by `num_items_in_batch` (the
    response-token count of the whole accumulated batch, across processes), so it is already scaled for gradient
    accumulation: `loss_is_scaled_for_ga = True`. Logits are only computed at the response positions when the model
    supports `logits_to_keep`.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The base causal LM, or a `PeftModel` holding users' adapters. A base model is wrapped with peft at the
            first adapter; the wrapped model is `trainer.model` afterwards.
        args ([`SpringTrainingArguments`], *optional*):
            Training and SPRInG settings; defaults to `SpringTrainingArguments()` (the `"measured"` preset). A
            `learning_rate` of `"auto"` becomes [`default_learning_rate`] for the model's size before the optimizer
            exists (`trainer.args` is then a copy holding that float; logged once at info).
        user_id (`str`):
            The user whose adapter is updated. Every interaction must belong to this user.
        period (`int`, *optional*, defaults to 0):
            The period index. 0 creates the adapter if needed and trains on all samples; from 1 on the user's adapter
            must exist in `model`.
        train_interactions (`Sequence[Interaction | dict]`, *optional*):
            The period's new training samples (an empty sequence is a logged no-op).
        memory (`LoGoMemory`, *optional*):
            Where the residual buffer lives (the user's pinned region). Without a memory no buffer is kept.
        processing_class (`PreTrainedTokenizerBase`):
            The tokenizer (required).
        score_cache ([`BaseLogProbCache`], *optional*):
            Base log-probs from earlier periods (the buffer's items are re-scored every period). A fresh cache is used
            when not given; after the period it holds the user's buffer items.
        adapter_name (`str`, *optional*):
            The adapter to train; defaults to the user's routing name (`SpringForCausalLM` finds it for
            `personalization=user_id`).
        eval_interactions (`Sequence[Interaction | dict]`, *optional*):
            Held-out samples for `trainer.evaluate()` (response-token loss).
        data_collator, callbacks, optimizers, ...:
            As in [`~transformers.Trainer`].

    Example:

    ```python
    >>> args = SpringTrainingArguments(output_dir="out", selection_ratio=0.3, buffer_size=50)
    >>> trainer = SpringTrainer(
    ...     model=model, args=args, user_id="alice", period=1, train_interactions=new_items,
    ...     memory=memory, processing_class=tokenizer,
    ... )
    >>> out = trainer.run_period()
    >>> out.selected_ids, out.buffer_ids
    >>> model = trainer.model  # a PeftModel with the "alice" adapter
    ```
    """

    _tag_names = ["transformers_spring", "spring", "lora", "personalization"]
    _name = "SPRInG"
    _paper = {"title": "SPRInG: continual LLM personalization", "id": "2601.09974"}
    # compute_loss divides the summed token loss by `num_items_in_batch` (the whole accumulated batch).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: torch.nn.Module,
        args: SpringTrainingArguments | None = None,
        *,
        user_id: str,
        period: int = 0,
        train_interactions: Sequence[Interaction | dict] = (),
        memory: Any = None,
        processing_class: Any = None,
        score_cache: BaseLogProbCache | None = None,
        adapter_name: str | None = None,
        eval_interactions: Sequence[Interaction | dict] | None = None,
        data_collator: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        **kwargs,
    ):
        if args is None:
            args = SpringTrainingArguments(output_dir="spring_trainer_output")
        if not isinstance(args, SpringTrainingArguments):
            raise TypeError(f"`args` must be a SpringTrainingArguments, got {type(args).__name__}.")
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a causal LM (nn.Module), got {type(model).__name__}.")
        if args.learning_rate == AUTO_LEARNING_RATE:
            # Resolved here, before the Trainer exists: AdamW, the scheduler and any integration only see a float.
            num_params = count_model_parameters(model)
            learning_rate = default_learning_rate(num_params)
            logger.info_once(
                f"learning_rate='auto': {learning_rate:g}, the default for a model of {num_params / 1e6:.0f}M "
                "parameters (see `default_learning_rate`)."
            )
            args = args.with_learning_rate(learning_rate)
        self.user_id = check_user_id(user_id)
        self.period = check_int(period, "period", minimum=0)
        self.records = coerce_interactions(train_interactions, self.user_id, "train_interactions")
        eval_records = (
            coerce_interactions(eval_interactions, self.user_id, "eval_interactions") if eval_interactions else []
        )
        if memory is not None:
            if not isinstance(memory, BufferStore):
                raise TypeError(
                    "`memory` must be a BufferStore (`buffer`, `buffer_scores` and `set_buffer` methods, e.g. a "
                    f"LoGoMemory), got {type(memory).__name__}."
                )
            limit = getattr(memory, "buffer_size", None)
            if limit is not None and args.buffer_size > limit:
                raise ValueError(
                    f"`buffer_size` is {args.buffer_size} but the memory's buffer holds at most {limit} items; lower "
                    "`buffer_size` or create the memory with a larger `buffer_size`."
                )
        self.memory = memory
        self.formatter = SpringFormatter.from_args(processing_class, args)
        self.samples: list[EncodedSample] = self.formatter.encode_many(self.records)
        self.adapter_name = adapter_name if adapter_name is not None else adapter_name_for(self.user_id)
        self.score_cache = score_cache if score_cache is not None else BaseLogProbCache()

        existing = adapter_names(model)
        self._previous_active = getattr(model, "active_adapter", None) if existing else None
        self.created_adapter = False
        if self.adapter_name not in existing:
            if period > 0:
                raise ValueError(
                    f"unknown user {self.user_id!r}: the model has no adapter {self.adapter_name!r} (it has "
                    f"{existing}). Period {period} continues an existing adapter; run period 0 first or load it."
                )
            if self.records:
                model = create_adapter(model, self.adapter_name, build_lora_config(args, model), args.seed)
                self.created_adapter = True
        if self.adapter_name in adapter_names(model):
            activate_adapter(model, self.adapter_name)
        if memory is None and self.records and period > 0 and args.buffer_size > 0:
            logger.info("SpringTrainer has no `memory`: the residual buffer is not kept.")

        if data_collator is None:
            data_collator = SpringDataCollator(self.formatter.pad_token_id)
        eval_dataset = (
            SpringDataset(self.formatter.encode_many(eval_records), args.response_only_loss) if eval_records else None
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=None,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        if args.disable_tqdm and args.logging_strategy == "no":
            # Asked for neither a progress bar nor logs: then the Trainer's PrinterCallback would still print every
            # period's summary dicts to stdout. The metrics stay in `SpringPeriodOutput.metrics` and the log history.
            from transformers import PrinterCallback

            self.remove_callback(PrinterCallback)
        # compute_loss normalises by `num_items_in_batch` itself; the Trainer only counts it for models that take loss
        # kwargs, so ask for the count whatever the model's forward signature.
        self.model_accepts_loss_kwargs = True
        self._use_logits_to_keep = supports_logits_to_keep_mask(self.model)
        self.period_output: SpringPeriodOutput | None = None
        if hasattr(self.model, "add_model_tags"):
            try:
                self.model.add_model_tags(self._tag_names)
            except (AttributeError, TypeError):  # tags are cosmetic
                pass

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Cross-entropy summed over the target tokens (response tokens with `response_only_loss`), divided by
        `num_items_in_batch`: the token count of the whole gradient-accumulation batch over all processes, so the
        result is already scaled for accumulation. DDP averages gradients over processes, hence the
        `num_processes` factor when token counts are averaged across devices (as `Trainer.compute_loss` does)."""
        keep, targets = label_targets(inputs["labels"])
        logits = response_logits(model, inputs["input_ids"], inputs["attention_mask"], keep, self._use_logits_to_keep)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is None:
            loss = loss_sum / max(int(targets.numel()), 1)
            if model.training:  # a per-batch mean: scale it for accumulation here, since loss_is_scaled_for_ga=True
                loss = loss / self.current_gradient_accumulation_steps
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        return (loss, {"logits": logits}) if return_outputs else loss

    # ------------------------------------------------------------------------------------------------ period
    def train(self, *args, **kwargs) -> TrainOutput:
        """Runs the whole period (score → select → train → rebuild the buffer, see [`~SpringTrainer.run_period`]) and
        returns the Trainer's `TrainOutput`, whose metrics include the SPRInG ones (`spring/...`). Arguments go to
        `Trainer.train`."""
        output = self.run_period(*args, **kwargs)
        if output.train_output is None:
            return TrainOutput(global_step=0, training_loss=0.0, metrics=dict(output.metrics))
        metrics = {**output.train_output.metrics, **output.metrics}
        return TrainOutput(output.train_output.global_step, output.train_output.training_loss, metrics)

    def run_period(self, *args, **kwargs) -> SpringPeriodOutput:
        """Score → select → train → rebuild the buffer for this trainer's user and period.

        Arguments go to `Trainer.train` (e.g. `resume_from_checkpoint`).

        Returns:
            [`SpringPeriodOutput`] (also stored as `trainer.period_output`).
        """
        if self.period_output is not None:
            raise RuntimeError("This SpringTrainer already ran its period; create a new trainer for the next one.")
        args_ = self.args
        output = SpringPeriodOutput(self.user_id, self.period, self.adapter_name, num_new=len(self.samples))
        if not self.samples:
            logger.info(f"user {self.user_id!r}, period {self.period}: no new interactions; nothing to do.")
            output.skipped = True
            output.metrics = {"spring/num_new": 0.0, "spring/selected": 0.0}
            self.period_output = output
            return output

        old_buffer, old_samples, old_scores = self._old_buffer()
        snapshot = adapter_state(self.model, self.adapter_name)
        start = time.perf_counter()
        try:
            # 1–2. score and select (Eq. 1–2)
            if self.period == 0 or args_.selection_ratio >= 1.0:
                chosen, scores = list(range(len(self.samples))), None
            else:
                scored = drift_scores(self.model, self.samples, **self._scoring_kwargs())
                scores = scored.scores
                chosen = select_top(scores, args_.selection_ratio)
            scoring_seconds = time.perf_counter() - start
            output.selected_ids = [self.samples[i].id for i in chosen]
            if scores is not None:
                output.scores = {s.id: float(v) for s, v in zip(self.samples, scores, strict=True)}

            # 3. train from the adapter's previous state on the selected samples only
            train_start = time.perf_counter()
            self.train_dataset = SpringDataset([self.samples[i] for i in chosen], args_.response_only_loss)
            output.train_output = super().train(*args, **kwargs)
            train_seconds = time.perf_counter() - train_start

            # 4. residual buffer (Eq. 3–4), written only once everything else succeeded
            buffer_start = time.perf_counter()
            kept, kept_scores, kept_keys = self._rebuild_buffer(chosen, scores, old_buffer, old_samples, old_scores)
            if kept is not None and self.memory is not None:
                self.memory.set_buffer(self.user_id, kept, scores=kept_scores)
            buffer_seconds = time.perf_counter() - buffer_start
        except BaseException:
            restore_adapter_state(self.model, snapshot)
            if self.created_adapter and len(adapter_names(self.model)) > 1:
                if self._previous_active in adapter_names(self.model):
                    self.model.set_adapter(self._previous_active)
                self.model.delete_adapter(self.adapter_name)
            logger.warning(
                f"user {self.user_id!r}, period {self.period}: the update failed; the adapter and buffer are unchanged."
            )
            raise
        finally:
            self._release_wrapped_model()

        old_ids = [item.id for item in old_buffer]
        if kept is not None:
            output.buffer_ids = [item.id for item in kept]
            output.buffer_scores = dict(zip(output.buffer_ids, map(float, kept_scores), strict=True))
            kept_ids = set(output.buffer_ids)
            output.evicted_ids = [i for i in old_ids if i not in kept_ids]
        else:
            output.buffer_ids = old_ids
            output.buffer_scores = dict(old_scores)
        # Only buffer items are ever scored again: the cache keeps just those of this user (bounded memory).
        self.score_cache.prune(self.user_id, kept_keys if kept is not None else [s.cache_key for s in old_samples])
        output.metrics = self._period_metrics(output, scores, old_ids, scoring_seconds, train_seconds, buffer_seconds)
        self.log(dict(output.metrics))
        logger.info(
            f"user {self.user_id!r}, period {self.period}: trained on {len(chosen)}/{len(self.samples)} sample(s); "
            f"buffer {len(output.buffer_ids)} item(s) (+{int(output.metrics['spring/buffer_added'])}, "
            f"-{len(output.evicted_ids)}); {output.metrics['spring/period_seconds']:.1f} s."
        )
        self.period_output = output
        return output

    # ------------------------------------------------------------------------------------------------ helpers
    def _scoring_kwargs(self) -> dict[str, Any]:
        return {
            "alpha": self.args.drift_alpha,
            "reduction": self.args.score_reduction,
            "cache": self.score_cache,
            "batch_size": self.args.effective_scoring_batch_size,
            "pad_token_id": self.formatter.pad_token_id,
            "shared_prefix": self.args.scoring_shared_prefix,
            "dtype": self.args.scoring_dtype,
        }

    def _old_buffer(self) -> tuple[list[Interaction], list[EncodedSample], dict[str, float]]:
        if self.memory is None or self.period == 0:
            return [], [], {}
        old = list(self.memory.buffer(self.user_id))
        return old, self.formatter.encode_many(old), dict(self.memory.buffer_scores(self.user_id))

    def _rebuild_buffer(
        self,
        chosen: list[int],
        scores: list[float] | None,
        old_buffer: list[Interaction],
        old_samples: list[EncodedSample],
        old_scores: dict[str, float],
    ) -> tuple[list[Interaction] | None, list[float] | None, list[str] | None]:
        """Eq. 3–4. Returns the new buffer, its scores and cache keys, or Nones when no buffer is kept this period."""
        capacity = self.args.buffer_size
        if self.memory is None or self.period == 0 or capacity == 0:
            return None, None, None  # B⁽⁰⁾ = ∅ (paper): period 0 builds no buffer
        new_ids = {self.samples[i].id for i in chosen}
        pool = [self.records[i] for i in chosen]
        pool_samples = [self.samples[i] for i in chosen]
        known = [scores[i] if scores is not None else None for i in chosen]
        for record, sample in zip(old_buffer, old_samples, strict=True):
            if record.id not in new_ids:  # a re-submitted sample counts once, as new
                pool.append(record)
                pool_samples.append(sample)
                known.append(old_scores.get(record.id))
        if len(pool) > capacity or self.args.rescore_buffer == "always" or any(s is None for s in known):
            # S' with the UPDATED adapter; base log-probs come from the cache
            pool_scores = drift_scores(self.model, pool_samples, **self._scoring_kwargs()).scores
        else:
            pool_scores = known  # |C| ≤ N_max: Eq. 4 keeps everything, no ranking needed
        keep = top_n(pool_scores, capacity)
        return (
            [pool[i] for i in keep],
            [float(pool_scores[i]) for i in keep],
            [pool_samples[i].cache_key for i in keep],
        )

    def _period_metrics(
        self,
        output: SpringPeriodOutput,
        scores: list[float] | None,
        old_ids: list[str],
        scoring_seconds: float,
        train_seconds: float,
        buffer_seconds: float,
    ) -> dict[str, float]:
        n = len(self.samples)
        metrics = {
            "spring/period": float(self.period),
            "spring/num_new": float(n),
            "spring/selected": float(len(output.selected_ids)),
            "spring/selected_fraction": len(output.selected_ids) / n,
        }
        for key, value in score_stats(scores or []).items():
            metrics[f"spring/score_{key}"] = value
        if scores is not None:  # the lowest selected score
            metrics["spring/threshold"] = min(output.scores[i] for i in output.selected_ids)
        kept = set(output.buffer_ids)
        metrics.update(
            {
                "spring/buffer_size": float(len(output.buffer_ids)),
                "spring/buffer_kept": float(len(kept & set(old_ids))),
                "spring/buffer_added": float(len(kept - set(old_ids))),
                "spring/buffer_evicted": float(len(output.evicted_ids)),
                "spring/scoring_seconds": scoring_seconds,
                "spring/train_seconds": train_seconds,
                "spring/buffer_seconds": buffer_seconds,
                "spring/period_seconds": scoring_seconds + train_seconds + buffer_seconds,
            }
        )
        return metrics

    def _release_wrapped_model(self) -> None:
        """Drops the distributed wrapper (DDP) and the accelerator's references after the period, so that the next
        trainer on the same model wraps it afresh instead of stacking gradient hooks. Only a wrapper needs the garbage
        collection (and device-cache flush) of `free_memory()`; otherwise the accelerator's references go with this
        trainer."""
        if self.model_wrapped is not self.model:
            self.model_wrapped = self.model
            self.accelerator.free_memory()
        self.optimizer, self.lr_scheduler = None, None


__all__ = ["SpringPeriodOutput", "SpringTrainer"]
