"""How the benchmarks decode and score: every model-based row is a [`Personalization`] handed to the same
`SpringForCausalLM.generate` / `score` a user calls (no side path), plus the decoding settings every method shares
(the token budget, the line-end stop, the first line of a generation)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..generation import Personalization
from ..generation.personalization import RowPersonalization
from ..records import Interaction


@dataclass
class BenchmarkRow:
    """One test item under one method.

    Args:
        method (`str`): the method's name.
        item (`Interaction`): the test item.
        personalization ([`Personalization`], *optional*): what the row decodes with, exactly as a user would pass
            it to `SpringForCausalLM.generate(personalization=...)`. None for a floor.
        prediction (`str`, *optional*): a floor's prediction (it needs no model).
        gate_threshold (`float`, *optional*): σ of the row's gate, for the records.
    """

    method: str
    item: Interaction
    personalization: Personalization | None = None
    prediction: str | None = None
    gate_threshold: float | None = None
    plan: RowPersonalization | None = None  # what the pipeline decided (set by RowDecoder.plan)

    def _planned(self) -> RowPersonalization:
        if self.plan is None:
            raise ValueError(f"the {self.method!r} row of item {self.item.id!r} is not planned yet (RowDecoder.plan).")
        return self.plan

    @property
    def adapter(self) -> str | None:
        """The adapter the row decodes with (a planned model row; None for a floor)."""
        return None if self.personalization is None else self._planned().adapter

    @property
    def history(self) -> list:
        """The row's history items, after the gate and the history budget (a planned model row)."""
        return [] if self.personalization is None else list(self._planned().items)

    @property
    def weight(self) -> float:
        """λ of the row (a planned model row; 0 for a floor)."""
        return 0.0 if self.personalization is None else self._planned().weight

    @property
    def history_items(self) -> int:
        """How many items the row's history holds, after the gate and the history budget."""
        return len(self.history)


class RowDecoder:
    """Decodes and scores [`BenchmarkRow`]s through `SpringForCausalLM`, batched, with the settings every method
    shares (greedy, one repetition penalty, one token budget, the line-end stop). Rows that the pipeline plans
    identically (the same prompt, adapter, history and λ: e.g. OPPU accum and All-100 %, or SPRInG with and without
    a gate that drops nothing) share one generation and one likelihood.

    Args:
        spring_model ([`SpringForCausalLM`]): the wrapper users call.
        tokenizer: its tokenizer (left padding).
        formatter ([`SpringFormatter`]): renders prompts and gold responses as training does.
        max_new_tokens (`int`): the token budget.
        repetition_penalty (`float`): for every method.
        batch_size (`int`): rows per `generate` call.
        line_end_tokens (*optional*): what [`line_end_tokens`] returns, to stop at the first line's end.
    """

    def __init__(
        self, spring_model, tokenizer, formatter, *, max_new_tokens: int, repetition_penalty: float, batch_size: int,
        line_end_tokens: tuple | None = None,
    ):  # fmt: skip
        self.spring_model = spring_model
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        self.batch_size = batch_size
        self.line_end_tokens = line_end_tokens

    def _inputs(self, rows: Sequence[BenchmarkRow]):
        prompts = [self.formatter.prompt_text(row.item) for row in rows]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return inputs.to(self.spring_model.device)

    def plan(self, rows: Sequence[BenchmarkRow]) -> None:
        """Sets each model row's `plan` with [`SpringForCausalLM.plan`], one row at a time (no padding)."""
        for row in rows:
            if row.personalization is not None and row.plan is None:
                inputs = self._inputs([row])
                row.plan = self.spring_model.plan(
                    inputs["input_ids"], inputs["attention_mask"], personalization=row.personalization
                )[0]

    def _unique(self, rows: Sequence[BenchmarkRow]) -> tuple[list[int], list[int]]:
        """`(order, source)`: the distinct model rows to compute, sorted by history length (less padding per batch),
        and for every row the index whose result it takes."""
        self.plan(rows)
        first_of: dict[tuple, int] = {}
        source = [i if row.personalization is None else first_of.setdefault(_decoding_key(row), i)
                  for i, row in enumerate(rows)]  # fmt: skip
        order = sorted(first_of.values(), key=lambda i: rows[i].history_items)
        return order, source

    def _batches(self, rows: Sequence[BenchmarkRow], order: list[int]) -> Iterator[tuple[list[int], Any, list]]:
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            yield chunk, self._inputs([rows[i] for i in chunk]), [rows[i].personalization for i in chunk]

    def generate(self, rows: Sequence[BenchmarkRow]) -> list[str]:
        """Each row's prediction: a floor's own, or the first line of `SpringForCausalLM.generate`'s output."""
        order, source = self._unique(rows)
        outputs: dict[int, str] = {i: row.prediction for i, row in enumerate(rows) if row.personalization is None}
        for chunk, inputs, personalization in self._batches(rows, order):
            stop = StoppingCriteriaList([LineEndCriteria(self.line_end_tokens)]) if self.line_end_tokens else None
            with torch.no_grad():
                out = self.spring_model.generate(
                    **inputs, personalization=personalization, max_new_tokens=self.max_new_tokens, do_sample=False,
                    repetition_penalty=self.repetition_penalty, pad_token_id=self.formatter.pad_token_id,
                    stopping_criteria=stop, temperature=None, top_p=None, top_k=None,
                )  # fmt: skip
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                outputs[i] = first_line(text)
        return [outputs[i] for i in source]

    def logprobs(self, rows: Sequence[BenchmarkRow], dedup: bool = True) -> list[torch.Tensor | None]:
        """Per row, the gold response's per-token log-probabilities (the training target: the text and its
        end-of-turn marker) under exactly what the row decodes with: [`SpringForCausalLM.score`]. None for floors."""
        order, source = self._unique(rows) if dedup else (list(range(len(rows))), list(range(len(rows))))
        values: dict[int, torch.Tensor | None] = {i: None for i, row in enumerate(rows) if row.personalization is None}
        for chunk, inputs, personalization in self._batches(rows, order):
            targets = []
            for i in chunk:
                sample = self.formatter.encode(rows[i].item)
                targets.append(list(sample.input_ids[sample.prompt_length :]))
            scored = self.spring_model.score(
                inputs["input_ids"], targets, inputs["attention_mask"], personalization=personalization
            )
            values.update(zip(chunk, scored, strict=True))
        return [values[i] for i in source]

    def nll(self, rows: Sequence[BenchmarkRow]) -> list[float | None]:
        """Per row, the gold response's mean per-token NLL (see [`logprobs`]); None for floors."""
        return [None if lp is None else float(-lp.mean()) for lp in self.logprobs(rows)]


def _decoding_key(row: BenchmarkRow) -> tuple:
    """What a row's generation depends on: the prompt, the adapter, the history (in order) and λ."""
    plan = row.plan
    return row.item.id, row.item.prompt, plan.adapter, tuple(map(history_key, plan.items)), plan.weight


def history_key(item: Any) -> tuple:
    """`(user, id, source)` of a history item (a `RetrievedItem`, an `Interaction` or a plain string)."""
    interaction = getattr(item, "interaction", item)
    return (
        getattr(interaction, "user_id", None),
        getattr(interaction, "id", interaction),
        getattr(item, "source", None),
    )


def first_line(text: str) -> str:
    """The first non-empty line of a generation (a headline is one line), without surrounding quotes."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


def line_end_tokens(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every token id: whether its text holds a line break, whether it has visible text before that break,
    and whether it has visible text at all (the inputs of [`LineEndCriteria`]). Decodes the vocabulary once."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ends = torch.tensor(["\n" in text for text in texts])
    visible_before = torch.tensor([bool(text.split("\n", 1)[0].strip()) for text in texts])
    visible = torch.tensor([bool(text.strip()) for text in texts])
    return ends, visible_before, visible


class LineEndCriteria(StoppingCriteria):
    """Stops a row at the line break that ends the first line with visible text (leading blank lines do not count,
    so a model that starts with a newline still gets its line). Needs nothing of the tokenizer but `batch_decode`
    (see [`line_end_tokens`]), so it works with any vocabulary, word-level ones included. Build one per `generate`
    call: it remembers, per row, whether visible text came already.

    Args:
        tokens (`tuple` of three `torch.BoolTensor`): what [`line_end_tokens`] returns for the tokenizer.
    """

    def __init__(self, tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        self.ends, self.visible_before, self.visible = tokens
        self.seen: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].cpu()
        seen = self.seen if self.seen is not None else torch.zeros(len(last), dtype=torch.bool)
        stop = self.ends[last] & (seen | self.visible_before[last])
        self.seen = seen | self.visible[last]
        return stop.to(input_ids.device)


def decoding_budget(tokenizer: Any, train_items: Sequence[Interaction], quantile: float = 0.95) -> int:
    """The token budget of generation: the `quantile` of the training responses' lengths in tokens, plus one for
    the line end or end-of-turn token. Only training items may set it, never test items."""
    if not train_items:
        raise ValueError("the decoding budget needs training items; got none.")
    lengths = [len(tokenizer(item.response, add_special_tokens=False)["input_ids"]) + 1 for item in train_items]
    return max(1, math.ceil(float(np.quantile(np.asarray(lengths), quantile))))
