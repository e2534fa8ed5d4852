"""SPRInG's drift score (paper Eq. 1) and top-p selection (Eq. 2), batched, with a cache of base log-probs.

`S(q, a) = −log(p_adap / p_base) + α · log p_base`, where `log p` is the sum or the per-token mean of the response
tokens' log-probabilities under the base model (adapter disabled) and under the user's current adapter. One model
serves both: the base pass runs inside `model.disable_adapter()`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from ..utils.compat import (
    cache_kwarg_name,
    has_unstackable_layers,
    is_stackable_cache,
    output_cache,
    repeat_cache_rows,
    response_logits,
    supports_logits_to_keep,
    supports_logits_to_keep_mask,
)
from ..utils.ranking import top_k_indices
from ..utils.validation import check_int
from .data import EncodedSample, SpringDataCollator, SpringDataset, label_targets

logger = logging.get_logger(__name__)

BASE_CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LogProb:
    """Response log-probability of one sample: the sum over its response tokens and how many tokens that is."""

    total: float
    num_tokens: int

    def reduce(self, reduction: str) -> float:
        """`"sum"`: the total; `"mean"`: per token."""
        if reduction == "sum":
            return self.total
        if reduction == "mean":
            return self.total / max(self.num_tokens, 1)
        raise ValueError(f"`score_reduction` must be 'mean' or 'sum', got {reduction!r}.")


class BaseLogProbCache:
    """Base-model (adapter disabled) response log-probs per sample. The base never changes, so a sample's value is
    computed once and reused by every later scoring of it (the buffer is re-scored every period).

    Keys are [`EncodedSample.cache_key`] (user, sample id and a hash of the exact tokens), so a changed text,
    template or tokenizer is a cache miss rather than a stale hit. Saved as JSON (no pickle).

    Args:
        model_name (`str`, *optional*): the base model's name or path, recorded so that a cache saved for another
            base model is not reused.
    """

    def __init__(self, model_name: str | None = None):
        self.model_name = model_name
        self._values: dict[str, LogProb] = {}

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get(self, key: str) -> LogProb | None:
        return self._values.get(key)

    def put(self, key: str, value: LogProb) -> None:
        self._values[key] = value

    def keys(self) -> list[str]:
        return list(self._values)

    def prune(self, user_id: str, keep: Iterable[str]) -> int:
        """Drops `user_id`'s entries whose keys are not in `keep` (what is no longer in the user's buffer can never
        be scored again); returns how many were dropped."""
        keep = set(keep)
        prefix = f"{user_id}\x1f"
        gone = [k for k in self._values if k.startswith(prefix) and k not in keep]
        for key in gone:
            del self._values[key]
        return len(gone)

    def drop_user(self, user_id: str) -> None:
        self.prune(user_id, ())

    def to_dict(self) -> dict:
        return {
            "format_version": BASE_CACHE_FORMAT_VERSION,
            "model_name": self.model_name,
            "entries": {k: [v.total, v.num_tokens] for k, v in self._values.items()},
        }

    @classmethod
    def from_dict(cls, data: dict, model_name: str | None = None) -> BaseLogProbCache:
        if not isinstance(data, dict) or data.get("format_version") != BASE_CACHE_FORMAT_VERSION:
            raise ValueError(f"base log-prob cache: unsupported format {data.get('format_version')!r}.")
        cache = cls(model_name if model_name is not None else data.get("model_name"))
        if model_name is not None and data.get("model_name") not in (None, model_name):
            logger.warning(
                f"The base log-prob cache was computed with {data.get('model_name')!r}, not {model_name!r}; "
                "it is discarded and recomputed on demand."
            )
            return cache
        for key, (total, count) in data.get("entries", {}).items():
            cache.put(key, LogProb(float(total), int(count)))
        return cache

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike, model_name: str | None = None) -> BaseLogProbCache:
        """Reads a saved cache, refusing a file above [`~persistence.json_files.MAX_BASE_LOGPROBS_BYTES`] before
        parsing it (a saved state may come from someone else)."""
        from ..persistence.json_files import MAX_BASE_LOGPROBS_BYTES, read_json_capped

        return cls.from_dict(read_json_capped(path, MAX_BASE_LOGPROBS_BYTES), model_name=model_name)


def shared_prefix_length(samples: Sequence[EncodedSample]) -> int:
    """How many leading tokens all `samples` have in common, stopping before the last prompt token of the shortest
    prompt: that position predicts the first response token, so it must be computed per sample."""
    if not samples:
        return 0
    common = os.path.commonprefix([sample.input_ids for sample in samples])
    return max(0, min(len(common), min(sample.prompt_length for sample in samples) - 1))


class _SharedPrefix:
    """The KV cache of the token prefix that every scored sample starts with (with a chat template: the system turn
    and the start of the user turn), computed once per scoring call and expanded for each batch, so only the
    per-sample suffix goes through the model. Scores equal a full forward's up to float rounding.

    Used only for plain full-attention caches (`is_stackable_cache`); sliding-window, linear-attention or legacy
    tuple caches fall back to full forwards (`build` returns None)."""

    def __init__(self, length: int, cache, cache_name: str):
        self.length = length
        self.cache = cache
        self.cache_name = cache_name  # the forward's keyword for it (`cache` or `past_key_values`)

    @staticmethod
    def _no_reuse() -> None:
        logger.warning_once(
            "drift scoring cannot reuse a shared-prefix KV cache for this model (sliding-window, hybrid or static "
            "layers); it scores with full forwards (same scores)."
        )

    @classmethod
    def build(cls, model: torch.nn.Module, samples: Sequence[EncodedSample], device, min_length: int):
        length = shared_prefix_length(samples)
        if length < max(min_length, 1):
            return None
        if has_unstackable_layers(model):  # known from the config: spare the prefix forward
            cls._no_reuse()
            return None
        prefix = torch.tensor([samples[0].input_ids[:length]], dtype=torch.long, device=device)
        kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}  # the prefix's logits are unused
        try:
            out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **kwargs)
        except TypeError:  # a forward without `use_cache`
            return None
        cache = output_cache(out)
        if not is_stackable_cache(cache):
            cls._no_reuse()
            return None
        return cls(length, cache, cache_kwarg_name(model))

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """The model inputs for a right-padded batch of whole samples: their suffixes, the prefix cache repeated per
        row, and an attention mask over prefix + suffix."""
        rows = input_ids.shape[0]
        cache = repeat_cache_rows(self.cache, rows)  # a copy: the forward appends to the cache it is given
        prefix_mask = torch.ones(rows, self.length, dtype=attention_mask.dtype, device=attention_mask.device)
        return {
            "input_ids": input_ids[:, self.length :],
            "attention_mask": torch.cat([prefix_mask, attention_mask[:, self.length :]], dim=1),
            self.cache_name: cache,
            "use_cache": True,
        }


def _batch(samples: Sequence[EncodedSample], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """`input_ids`, `attention_mask`, the positions predicting a response token and those tokens: the training batch
    layout (`SpringDataCollator` over response-only labels), with positions and targets read from the labels exactly
    as `SpringTrainer.compute_loss` reads them."""
    features = SpringDataset(samples, response_only_loss=True)
    batch = SpringDataCollator(pad_token_id)([features[i] for i in range(len(features))])
    keep, targets = label_targets(batch["labels"])
    return batch["input_ids"], batch["attention_mask"], keep, targets


def _fixed_batches(samples: Sequence[EncodedSample], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding). The grouping depends only on the samples and
    `batch_size`, never on the number of processes, so every sample is computed in the same batch (hence with the
    same numerics) whether one process or several score."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module,
    samples: Sequence[EncodedSample],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    distributed: bool = True,
    shared_prefix: bool = True,
    min_shared_prefix: int = 4,
    dtype: torch.dtype | str | None = None,
) -> list[LogProb]:
    """Response log-probs of `samples` under `model` as it is (adapter state untouched), batched.

    Under `accelerate launch` (several processes), each process computes a share of the fixed batches and the
    results are summed across processes (`accelerate.utils.reduce`), so every process returns the same values, equal
    to a single-process run. Every process must call this with the same samples.

    Args:
        model (`nn.Module`): the causal LM (a `PeftModel` uses its active adapter).
        samples (`Sequence[EncodedSample]`): tokenized samples (see [`SpringFormatter`]).
        batch_size (`int`, *optional*, defaults to 8): samples per forward.
        pad_token_id (`int`, *optional*, defaults to 0): right-padding id (masked out).
        distributed (`bool`, *optional*, defaults to `True`): split the work across processes when launched with
            several; `False` computes everything locally.
        shared_prefix (`bool`, *optional*, defaults to `True`): run the tokens that all samples start with (the chat
            template's system turn, the instruction) once and reuse their KV cache for every batch. The result equals
            full forwards up to float rounding; models whose cache is not plain full attention always use full
            forwards.
        min_shared_prefix (`int`, *optional*, defaults to 4): shorter common prefixes are not worth a cache.
        dtype (`torch.dtype` or `str`, *optional*): run the forwards under `torch.autocast` in this precision
            (`"bfloat16"`, `"float16"`); log-softmax stays in float32. `None` (default) keeps the model's own
            precision.

    Returns:
        `list[LogProb]`, one per sample, in order.
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    n = len(samples)
    totals = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    world, rank = 1, 0
    if distributed:
        from accelerate import PartialState

        state = PartialState()
        world, rank = state.num_processes, state.process_index
    if n == 0:
        return []
    device = next(model.parameters()).device
    use_keep = supports_logits_to_keep_mask(model)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with autocast:
            # The prefix is that of ALL samples (not of this process's share): every batch runs alike on any world size.
            prefix = _SharedPrefix.build(model, samples, device, min_shared_prefix) if shared_prefix else None
            for batch in _fixed_batches(samples, batch_size)[rank::world]:
                input_ids, attention_mask, keep, targets = _batch([samples[i] for i in batch], pad_token_id)
                inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
                if prefix is not None:
                    inputs = prefix.inputs(**inputs)
                    keep = keep[:, prefix.length :]  # no target lies in the prefix (see shared_prefix_length)
                logits = response_logits(model, keep=keep.to(device), use_logits_to_keep=use_keep, **inputs).float()
                token_logp = logits.log_softmax(-1).gather(-1, targets.to(device)[:, None]).squeeze(-1)
                token_logp = token_logp.double().cpu()
                lengths = keep.sum(dim=1)  # response tokens per row
                row_of_token = torch.repeat_interleave(torch.arange(len(batch)), lengths)
                sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, row_of_token, token_logp)
                index = torch.as_tensor(batch)
                totals[index] = sums
                counts[index] = lengths.double()
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import reduce

        # Each sample was computed by exactly one process (zeros elsewhere), so a sum gathers it exactly.
        stacked = reduce(torch.stack([totals, counts]).to(device), reduction="sum").cpu()
        totals, counts = stacked[0], stacked[1]
    return [LogProb(float(t), int(c)) for t, c in zip(totals.tolist(), counts.tolist(), strict=True)]


def base_logprobs(
    model: torch.nn.Module,
    samples: Sequence[EncodedSample],
    cache: BaseLogProbCache | None = None,
    **kwargs,
) -> list[LogProb]:
    """Response log-probs under the base model: `compute_logprobs` inside `model.disable_adapter()` for the samples
    `cache` does not hold yet (they are added to it)."""
    cache = cache if cache is not None else BaseLogProbCache()
    missing = [s for s in samples if s.cache_key not in cache]
    if missing:
        unique = list({s.cache_key: s for s in missing}.values())
        disable = getattr(model, "disable_adapter", None)
        if disable is None:
            raise TypeError(
                f"the base pass needs a peft model (with `disable_adapter()`), got {type(model).__name__}."
            )
        with disable():
            values = compute_logprobs(model, unique, **kwargs)
        for sample, value in zip(unique, values, strict=True):
            cache.put(sample.cache_key, value)
    return [cache.get(s.cache_key) for s in samples]


def drift_score(base: LogProb, adapted: LogProb, alpha: float = 1.0, reduction: str = "mean") -> float:
    """Eq. 1: `S = −(log p_adap − log p_base) + α · log p_base = (1 + α) · log p_base − log p_adap`."""
    log_base, log_adapted = base.reduce(reduction), adapted.reduce(reduction)
    return -(log_adapted - log_base) + alpha * log_base


@dataclass
class DriftScores:
    """Drift scores of a list of samples, with the log-probs they came from.

    Args:
        scores (`list[float]`): Eq. 1 per sample (higher = more novel and well-formed).
        base (`list[LogProb]`): response log-probs with the adapter disabled.
        adapted (`list[LogProb]`): response log-probs with the user's adapter.
    """

    scores: list[float]
    base: list[LogProb]
    adapted: list[LogProb]


def drift_scores(
    model: torch.nn.Module,
    samples: Sequence[EncodedSample],
    *,
    alpha: float = 1.0,
    reduction: str = "mean",
    cache: BaseLogProbCache | None = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
    distributed: bool = True,
    **logprob_kwargs,
) -> DriftScores:
    """Eq. 1 for every sample: one adapter pass (the model's active adapter) and one base pass (adapter disabled,
    skipped for cached samples), both batched.

    Args:
        model (`PeftModel`): the model with the user's adapter active.
        samples (`Sequence[EncodedSample]`): tokenized samples.
        alpha (`float`, *optional*, defaults to 1.0): α, the weight of the quality term.
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` per token or `"sum"`.
        cache ([`BaseLogProbCache`], *optional*): base log-probs already known; new ones are added.
        batch_size, pad_token_id, distributed, logprob_kwargs: see [`compute_logprobs`] (e.g. `shared_prefix`,
            `dtype`).
    """
    kwargs = {"batch_size": batch_size, "pad_token_id": pad_token_id, "distributed": distributed, **logprob_kwargs}
    adapted = compute_logprobs(model, samples, **kwargs)
    base = base_logprobs(model, samples, cache, **kwargs)
    scores = [drift_score(b, a, alpha, reduction) for b, a in zip(base, adapted, strict=True)]
    return DriftScores(scores, base, adapted)


def num_selected(n: int, ratio: float) -> int:
    """`ceil(ratio · n)`, robust to float error (0.3 · 10 is 3.0000000000000004 in floating point: 3, not 4)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(ratio * n, 9))))


def select_top(scores: Sequence[float], ratio: float) -> list[int]:
    """Eq. 2: the indices of the `ceil(ratio · n)` highest scores (ties: the earlier sample first), in input order."""
    return sorted(top_n(scores, num_selected(len(scores), ratio)))


def top_n(scores: Sequence[float], n: int) -> list[int]:
    """The indices of the `n` highest scores (ties: the earlier first), best first."""
    return [int(i) for i in top_k_indices(scores, n)]


def score_stats(scores: Sequence[float]) -> dict[str, float]:
    """Mean, std, min and max of a list of scores (empty dict for no scores)."""
    if not scores:
        return {}
    values = torch.as_tensor(list(scores), dtype=torch.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(unbiased=False)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def response_nll(logprobs: Sequence[LogProb]) -> float:
    """Token-weighted mean negative log-likelihood of responses (the held-out loss of a set of samples)."""
    tokens = sum(lp.num_tokens for lp in logprobs)
    if tokens == 0:
        return float("nan")
    return -sum(lp.total for lp in logprobs) / tokens


__all__ = [
    "BaseLogProbCache",
    "DriftScores",
    "LogProb",
    "base_logprobs",
    "compute_logprobs",
    "drift_score",
    "drift_scores",
    "num_selected",
    "response_logits",
    "response_nll",
    "score_stats",
    "select_top",
    "shared_prefix_length",
    "top_n",
]
