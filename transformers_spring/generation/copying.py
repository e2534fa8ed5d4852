"""The copy path: a third mixture component that continues spans of the row's own copy sources (its input and the
user's earlier responses), in the manner of cache language models and kNN-LM.

    p_final = (1 − μ) · p_spring + μ · p_copy

`p_spring` is what the row decodes with otherwise (SPRInG's λ-mixture, or the adapter alone). `p_copy` is defined by
[`CopyIndex.distribution`]: at each step, with `s` the row's tokens so far (prompt + generated), for `n` from
`max_ngram` down to 1, every position `j` of a source with `source[j - n : j] == s[-n:]` votes for `source[j]`; the
longest `n` with at least one vote wins (back-off), and `p_copy(w)` is `w`'s share of its votes. There is no `n = 0`
(a unigram over the sources): it would pull every step towards the sources' frequent tokens whatever the context,
which is what the model does better. Where no `n ≥ 1` matches (or the row has no source), `p_copy` is undefined and
the row keeps `p_spring` unchanged for that step (μ = 0).

[`CopyIndex`] is the one implementation of `p_copy`, and [`copy_mixture`] the one of the mixture: decoding
([`CopyMixtureLogitsProcessor`]) and scoring (`SpringForCausalLM.score`) both use them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from ..records import Interaction, RetrievedItem
from ..utils.validation import check_float, check_int

COPY_SOURCES = ("input", "history")


def parse_copy_sources(value: Any, name: str = "copy_sources") -> tuple[str, ...]:
    """Validates a comma-separated list of copy sources (`"input"`, `"history"`), e.g. `"input,history"`.

    Args:
        value (`str`): the list.
        name (`str`, *optional*, defaults to `"copy_sources"`): the field's name, for the messages.

    Returns:
        `tuple[str, ...]`: the sources, in the given order.

    Raises:
        `TypeError`: not a str. `ValueError`: empty, an unknown source, or one given twice.
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a comma-separated str of {list(COPY_SOURCES)}, got {type(value).__name__}.")
    parts = tuple(part.strip() for part in value.split(","))
    unknown = [part for part in parts if part not in COPY_SOURCES]
    if unknown:
        raise ValueError(f"`{name}` {value!r} names {unknown}; allowed: comma-separated {list(COPY_SOURCES)}.")
    if len(set(parts)) != len(parts):
        raise ValueError(f"`{name}` {value!r} names a source twice.")
    return parts


def check_copy_weight(value: Any, name: str) -> float:
    """Validates μ, the copy path's weight: a finite float in `[0, 1)` (1 would decode with the copy path alone)."""
    return check_float(value, name, minimum=0.0, maximum=1.0, max_inclusive=False, hint="0 turns the copy path off")


def response_text(item: RetrievedItem | Interaction | str) -> str:
    """The user's own text in a history item: an interaction's response; a plain string item as it is."""
    if isinstance(item, RetrievedItem):
        item = item.interaction
    if isinstance(item, Interaction):
        return item.response
    if isinstance(item, str):
        return item
    raise TypeError(f"a history item must be a RetrievedItem, an Interaction or a str, got {type(item).__name__}.")


class CopyIndex:
    r"""
    The n-gram index of one row's copy sources: for each `n` in `1..max_ngram`, a dict from every n-gram of the
    sources to a `Counter` of the tokens that follow it. Built once per row and decoding call (O(`max_ngram` · total
    source length)); each step is at most `max_ngram` dict lookups.

    Args:
        sources (sequence of sequences of `int`): the token ids of each source (spans never cross two sources).
        max_ngram (`int`, *optional*, defaults to 4): the longest context matched.
    """

    def __init__(self, sources: Sequence[Sequence[int]], max_ngram: int = 4):
        self.max_ngram = check_int(max_ngram, "max_ngram", minimum=1)
        self.sources = [[int(t) for t in source] for source in sources]
        self.tables: list[dict[tuple[int, ...], Counter]] = [{} for _ in range(self.max_ngram + 1)]
        for source in self.sources:
            for n in range(1, self.max_ngram + 1):
                table = self.tables[n]
                for j in range(n, len(source)):
                    table.setdefault(tuple(source[j - n : j]), Counter())[source[j]] += 1

    def __bool__(self) -> bool:
        return any(len(source) > 1 for source in self.sources)  # a 1-token source continues nothing

    def distribution(self, context: Sequence[int]) -> tuple[list[int], list[float]] | None:
        """`p_copy` after `context` (the row's tokens so far): the tokens with a non-zero probability (ascending ids)
        and their probabilities, or None where no `n ≥ 1` matches (`p_copy` undefined).

        Args:
            context (sequence of `int`): the row's tokens so far, prompt (without padding) + generated.
        """
        context = list(context[-self.max_ngram :]) if len(context) > self.max_ngram else list(context)
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            votes = self.tables[n].get(tuple(context[-n:]))
            if votes:
                total = sum(votes.values())
                ids = sorted(votes)
                return ids, [votes[t] / total for t in ids]
        return None


def copy_mixture(log_spring: torch.Tensor, log_copy: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """`log((1 − μ) · p_spring + μ · p_copy)` elementwise, from log-probabilities (`log_copy` is −inf where `p_copy`
    is 0): the one place decoding and scoring mix the copy path in.

    Args:
        log_spring (`torch.Tensor`): log p_spring.
        log_copy (`torch.Tensor`): log p_copy, same shape.
        weight (`float` or `torch.Tensor`): μ in `[0, 1)`, or one per row (shape `(rows, 1)`).
    """
    weight = torch.as_tensor(weight, dtype=log_spring.dtype, device=log_spring.device)
    return torch.logaddexp(log_spring + torch.log1p(-weight), log_copy + torch.log(weight))


class CopyMixtureLogitsProcessor(LogitsProcessor):
    r"""
    Mixes the copy path into the scores: per row with a copy index and μ > 0, and a defined `p_copy` at this step,
    `log((1 − μ) · softmax(scores) + μ · p_copy)` ([`copy_mixture`]); other rows' scores pass unchanged. The scores
    are log-softmaxed first, so raw logits (a row whose gate is closed and no SPRInG processor ran) and the SPRInG
    processor's log-probabilities (not normalised after `penalty_mode="mixture"`'s penalty) are both handled. Tokens
    banned upstream (−inf) stay banned, as in [`RetrievalInterpolationLogitsProcessor`].

    Place it right after the SPRInG processor (`SpringForCausalLM.generate` does): repetition penalty, applied
    inside or before that processor, then acts on `p_spring` only.

    Args:
        indexes (sequence of [`CopyIndex`] or `None`): one per row (None: no copy path).
        weights (sequence of `float`): μ per row, in `[0, 1)`.
        prompt_lengths (sequence of `int`): each row's number of prompt tokens (its left padding excluded).
    """

    supports_continuous_batching = False

    def __init__(
        self,
        indexes: Sequence[CopyIndex | None],
        weights: Sequence[float],
        prompt_lengths: Sequence[int],
    ):
        if not len(indexes) == len(weights) == len(prompt_lengths):
            raise ValueError("`indexes`, `weights` and `prompt_lengths` need one entry per row.")
        self.indexes = list(indexes)
        self.weights = [check_copy_weight(w, "copy_weight") for w in weights]
        self.prompt_lengths = [int(n) for n in prompt_lengths]
        self._start: int | None = None  # input_ids' width at the first call: the padded prompt
        self.copy_row_steps = 0  # rows × steps where p_copy was defined and mixed in

    @property
    def active(self) -> bool:
        return any(index and w > 0 for index, w in zip(self.indexes, self.weights, strict=True))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.dim() != 2 or input_ids.shape[0] != len(self.indexes):
            raise ValueError(
                f"{type(self).__name__} was built for {len(self.indexes)} row(s) with 2-D scores; got scores of "
                f"shape {tuple(scores.shape)} (beam search and continuous batching are not supported)."
            )
        if self._start is None:
            self._start = input_ids.shape[1]
        generated = input_ids.shape[1] - self._start
        rows, dists = [], []
        for row, (index, weight) in enumerate(zip(self.indexes, self.weights, strict=True)):
            if not index or weight <= 0:
                continue
            length = min(index.max_ngram, self.prompt_lengths[row] + generated)  # never reads left padding
            context = input_ids[row, input_ids.shape[1] - length :].tolist() if length else []
            dist = index.distribution(context)
            if dist is not None:
                rows.append(row)
                dists.append(dist)
        if not rows:
            return scores
        self.copy_row_steps += len(rows)
        index_t = torch.tensor(rows, dtype=torch.long, device=scores.device)
        picked = scores[index_t]
        log_spring = torch.log_softmax(picked.float(), dim=-1)
        weights = torch.tensor([self.weights[r] for r in rows], dtype=torch.float32, device=scores.device)[:, None]
        # p_copy is sparse: elsewhere the mixture is log p_spring + log(1 − μ), exactly what `copy_mixture` gives
        # against log p_copy = −inf (logaddexp(x, −inf) == x), so only the copied tokens need the full formula.
        mixed = log_spring + torch.log1p(-weights)
        row_of = torch.tensor([i for i, (ids, _) in enumerate(dists) for _ in ids], device=scores.device)
        token_of = torch.tensor([t for ids, _ in dists for t in ids], device=scores.device)
        log_copy = torch.tensor([p for _, probs in dists for p in probs], dtype=torch.float32).log()
        mixed[row_of, token_of] = copy_mixture(
            log_spring[row_of, token_of], log_copy.to(scores.device), weights[row_of, 0]
        )
        # Tokens banned upstream (min length, bad words, forced tokens...) must stay banned after the mix.
        mixed = mixed.masked_fill(torch.isneginf(picked), -math.inf)
        return scores.index_copy(0, index_t, mixed.to(scores.dtype))


def build_copy_indexes(rows: Sequence[Any], max_ngram: int) -> list[CopyIndex | None]:
    """One [`CopyIndex`] per planned row with μ > 0 and copy sources (None elsewhere).

    Args:
        rows (sequence of [`RowPersonalization`] or `None`): the plan's rows.
        max_ngram (`int`): `SpringConfig.copy_max_ngram`.
    """
    indexes: list[CopyIndex | None] = []
    for info in rows:
        sources = getattr(info, "copy_sources", None) if info is not None else None
        if not sources or info.copy_weight <= 0:
            indexes.append(None)
            continue
        index = CopyIndex(sources, max_ngram)
        indexes.append(index if index else None)
    return indexes


def copy_logprobs(
    log_spring: torch.Tensor, index: CopyIndex, weight: float, prompt: Sequence[int], continuation: Sequence[int]
) -> torch.Tensor:
    """Teacher-forced copy mixture of one row: for each token `c[t]` of the continuation, `log((1 − μ) ·
    p_spring(c[t]) + μ · p_copy(c[t] | prompt + c[:t]))`, or `log p_spring(c[t])` where `p_copy` is undefined.

    Args:
        log_spring (`torch.Tensor` of shape `(len(continuation),)`): log p_spring of each continuation token.
        index ([`CopyIndex`]): the row's copy index.
        weight (`float`): μ.
        prompt (sequence of `int`): the row's prompt tokens (no padding).
        continuation (sequence of `int`): the scored tokens.
    """
    context = list(prompt)
    log_copy = torch.full_like(log_spring, -math.inf)
    mixed = torch.zeros(len(continuation), dtype=torch.bool)
    for t, token in enumerate(continuation):
        dist = index.distribution(context)
        if dist is not None:
            mixed[t] = True
            ids, probs = dist
            if token in ids:
                log_copy[t] = torch.tensor(probs[ids.index(token)], dtype=torch.float32).log()
        context.append(int(token))
    return torch.where(mixed, copy_mixture(log_spring, log_copy, weight), log_spring)
