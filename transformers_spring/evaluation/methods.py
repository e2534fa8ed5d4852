"""The methods the continual-personalization benchmark compares (SPRInG paper §5 and Table 2-3 ablations)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..memory.bm25 import BM25Index
from ..records import Interaction, RetrievedItem
from ..utils.ranking import top_k_indices


@dataclass(frozen=True)
class MethodSpec:
    """How one benchmark method adapts and decodes.

    Args:
        name (`str`): the method id used on the command line and in `results.json`.
        label (`str`): the name shown in tables and plots.
        adapter (`str` or `None`): which per-user LoRA chain it decodes with: `"spring"` (drift top-30 % updates),
            `"all100"` (continual updates on every sample), `"random30"` (continual updates on a random 30 %),
            `"oppu_each"` (a fresh LoRA per period), `"tuned"` (SPRInG's updates with the learning rate, epochs and
            selection `spring tune` chose on validation data, its own residual buffer) or `None` (the base model).
        retrieval (`str` or `None`): where the history path's items come from: `"bm25"` / `"dense"` (the user's raw
            history, top `rag_k`), `"buffer"` (SPRInG's residual buffer, BM25 top `spring_k`), `"buffer+global"`
            (the buffer plus LoGo's global memory through the mediator), `"tuned"` (the region, k, gate, λ and copy
            weight `spring tune` chose, decoded through a wrapper configured with them) or `None` (no retrieval).
        scope (`str` or `None`): for raw-history retrieval, `"each"` (the current period's training items) or
            `"accum"` (every training item up to the current period).
        weight (`float` or `None`): λ of the probability mixture (1.0 = the history in the prompt, as RAG does);
            `None` = the wrapper's `SpringConfig.interpolation_weight`, which the benchmark sets to its
            `interpolation_weight` (SPRInG's λ, 0.5 by default).
        gate (`bool`): whether SPRInG's relevance gate (σ = a quantile of training-query retrieval scores) filters
            the retrieved buffer items.
        description (`str`): one line for `--help` and the docs.
        floor (`str` or `None`): a trivial prediction that needs no model: `"copy_input"` (the test item's input),
            `"last_response"` (the user's most recent earlier response) or `"bm25_nearest"` (the response of the
            user's earlier item whose input is BM25-nearest to the test input). Floors have no likelihood.
    """

    name: str
    label: str
    adapter: str | None = None
    retrieval: str | None = None
    scope: str | None = None
    weight: float | None = 0.0
    gate: bool = False
    description: str = ""
    floor: str | None = None

    @property
    def is_floor(self) -> bool:
        return self.floor is not None


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "copy-input", "Floor: copy input", floor="copy_input",
            description="no model: the test item's input copied as the prediction",
        ),
        MethodSpec(
            "last-response", "Floor: last response", floor="last_response",
            description="no model: the user's most recent earlier response",
        ),
        MethodSpec(
            "bm25-nearest", "Floor: BM25-nearest response", floor="bm25_nearest",
            description="no model: the response of the user's earlier item whose input is BM25-nearest",
        ),
        MethodSpec("base", "Base", description="zero-shot base model, no personalization"),
        MethodSpec(
            "rag-bm25-each", "RAG BM25 each", None, "bm25", "each", 1.0,
            description="BM25 top-k of the current period's history in the prompt",
        ),
        MethodSpec(
            "rag-bm25-accum", "RAG BM25 accum", None, "bm25", "accum", 1.0,
            description="BM25 top-k of all history so far in the prompt",
        ),
        MethodSpec(
            "rag-dense-each", "RAG dense each", None, "dense", "each", 1.0,
            description="dense (sentence-embedding) top-k of the current period's history in the prompt",
        ),
        MethodSpec(
            "rag-dense-accum", "RAG dense accum", None, "dense", "accum", 1.0,
            description="dense top-k of all history so far in the prompt",
        ),
        MethodSpec(
            "oppu-each", "OPPU each", "oppu_each", description="a LoRA trained from the base on the current period only"
        ),
        MethodSpec(
            "oppu-accum", "OPPU accum", "all100",
            description="one LoRA trained sequentially on the cumulative stream (the same run as All-100 %: paper "
            "Table 2 reports identical numbers for both)",
        ),
        MethodSpec("all-100", "All-100 %", "all100", description="continual LoRA updated on every new sample"),
        MethodSpec(
            "spring", "SPRInG", "spring", "buffer", None, None, True,
            description="drift top-30 % LoRA updates + gated residual-buffer retrieval, λ = `interpolation_weight` (0.5)",
        ),
        MethodSpec(
            "spring-lambda0", "SPRInG λ=0", "spring", description="SPRInG's adapter alone (parametric path only)"
        ),
        MethodSpec(
            "spring-random30", "Random-30 % (λ=0)", "random30",
            description="continual LoRA on a random 30 % of each period, parametric path only (paper Table 2)",
        ),
        MethodSpec(
            "spring-nogate", "SPRInG no gate", "spring", "buffer", None, None, False,
            description="SPRInG without the relevance gate",
        ),
        MethodSpec(
            "spring-logo", "SPRInG + LoGo", "spring", "buffer+global", None, None, True,
            description="SPRInG with LoGo's global memory on (other users' earlier items through the mediator)",
        ),
        MethodSpec(
            "spring-tuned", "SPRInG tuned", "tuned", "tuned", None, None,
            description="SPRInG with every setting chosen by `spring tune` on the training split's validation part",
        ),
    )
}  # fmt: skip

FLOORS = ("copy-input", "last-response", "bm25-nearest")
DEMO_METHODS = (*FLOORS, "base", "rag-bm25-each", "rag-bm25-accum", "spring", "spring-tuned")


def resolve_methods(names: str | list[str] | tuple[str, ...] | None) -> list[MethodSpec]:
    """The [`MethodSpec`]s for `names` ("all", a comma-separated string or a list); unknown names raise a
    `ValueError` listing the known ones."""
    if names is None or names == "all" or names == ["all"]:
        return list(METHODS.values())
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    flat = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    unknown = [n for n in flat if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in `methods`; known: {', '.join(METHODS)} (or 'all').")
    if not flat:
        raise ValueError("`methods` is empty.")
    return [METHODS[n] for n in dict.fromkeys(flat)]


# ---------------------------------------------------------------------------------------------------- scorers
# What the methods that need no adapter compute: a floor's prediction and a RAG baseline's retrieved items.


def earlier_training_items(periods: Sequence, period: int, item: Interaction) -> list[Interaction]:
    """The user's training items of periods `0..period` that are not later than `item`: what a floor may read
    (never a test item).

    Args:
        periods (`Sequence[PeriodSplit]`): the user's periods, as [`temporal_split`] returns them.
        period (`int`): the test item's period.
        item (`Interaction`): the test item.
    """
    return [it for split in periods[: period + 1] for it in split.train if it.timestamp <= item.timestamp]


def floor_prediction(kind: str, history: Sequence[Interaction], item: Interaction) -> str:
    """A trivial prediction that needs no model (see [`MethodSpec.floor`]).

    Args:
        kind (`str`): `"copy_input"`, `"last_response"` or `"bm25_nearest"`.
        history (`Sequence[Interaction]`): the user's earlier items, oldest first.
        item (`Interaction`): the test item.
    """
    if kind == "copy_input":
        return item.prompt
    if not history:
        return ""
    if kind == "last_response":
        return max(enumerate(history), key=lambda pair: (pair[1].timestamp, pair[0]))[1].response
    if kind == "bm25_nearest":
        scores = BM25Index([it.prompt for it in history]).scores(item.prompt)
        best = max(range(len(history)), key=lambda i: (scores[i], history[i].timestamp, i))  # ties: the latest
        return history[best].response
    raise ValueError(f"unknown floor {kind!r}; expected 'copy_input', 'last_response' or 'bm25_nearest'.")


def rag_items(
    method: MethodSpec,
    candidates: Sequence[Interaction],
    query: str,
    k: int,
    *,
    vectors: np.ndarray | None = None,
    query_vector: np.ndarray | None = None,
) -> list[RetrievedItem]:
    """A RAG baseline's history: the top `k` of `candidates`, highest score first; ties go to the more recent item
    (the paper's open question #15).

    Args:
        method ([`MethodSpec`]): a RAG method: `retrieval` `"bm25"` (BM25 over the candidates' text) or `"dense"`
            (cosine).
        candidates (`Sequence[Interaction]`): the user's allowed training items, oldest first.
        query (`str`): the test item's input.
        k (`int`): how many items to return.
        vectors (`np.ndarray`, *optional*): for `"dense"`, the candidates' normalised embeddings, one row each.
        query_vector (`np.ndarray`, *optional*): for `"dense"`, the query's normalised embedding.

    Returns:
        `list[RetrievedItem]`: at most `k` items with their scores, source `"local"`.
    """
    if method.retrieval == "bm25":
        scores = BM25Index([c.text for c in candidates]).scores(query) if candidates else np.zeros(0)
    elif method.retrieval == "dense":
        if vectors is None or query_vector is None:
            raise ValueError("dense retrieval needs the candidates' `vectors` and the `query_vector`.")
        scores = vectors @ query_vector
    else:
        raise ValueError(f"method {method.name!r} retrieves no raw history (retrieval={method.retrieval!r}).")
    return [RetrievedItem(candidates[i], float(scores[i]), "local") for i in top_k_indices(scores, k, ties="last")]
