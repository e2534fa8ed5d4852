"""Metrics of the benchmark: ROUGE as LaMP's official evaluation computes it (F-measure, no stemming), stemmed ROUGE-L
as an extra column, and a paired bootstrap for differences between methods."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence

import numpy as np

from ..utils.validation import check_float, check_int

# The main columns: unstemmed ROUGE-1 / ROUGE-L F, as LaMP's `eval_task.py` (HF `evaluate` rouge over `rouge_score`
# with `use_stemmer=False`), so numbers sit beside published ones. `rougeL_stemmed` is the SPRInG paper's variant.
ROUGE_TYPES = ("rouge1", "rougeL", "rougeL_stemmed")


@functools.cache
def _scorer(stemmed: bool):
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # an extra, not a core dependency
        raise ImportError(
            "ROUGE needs the `rouge-score` package: pip install rouge-score (or transformers-spring[demo])."
        ) from err
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stemmed)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1 and ROUGE-L F-measures of each prediction against its reference, unstemmed (LaMP's official
    setting), plus stemmed ROUGE-L.

    Args:
        predictions (`Sequence[str]`): generated texts.
        references (`Sequence[str]`): the gold texts, one per prediction.

    Returns:
        `list[dict]`: one `{"rouge1": f, "rougeL": f, "rougeL_stemmed": f}` per pair (the `rouge-score` package).
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("`predictions` and `references` must be sequences of strings, not a single string.")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references.")
    plain, stemmed = _scorer(False), _scorer(True)
    out = []
    for prediction, reference in zip(predictions, references, strict=True):
        scores = plain.score(reference, prediction)  # rouge-score's order: (target, prediction)
        out.append(
            {
                "rouge1": float(scores["rouge1"].fmeasure),
                "rougeL": float(scores["rougeL"].fmeasure),
                "rougeL_stemmed": float(stemmed.score(reference, prediction)["rougeL"].fmeasure),
            }
        )
    return out


def mean_rouge(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The per-sample mean of each ROUGE type (NaN for no samples)."""
    return {name: statistics.fmean(s[name] for s in scores) if scores else float("nan") for name in ROUGE_TYPES}


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """The mean of `a - b` over paired items and its percentile bootstrap interval (items resampled with
    replacement, `samples` times).

    Args:
        a, b (`Sequence[float]`): per-item values of two methods on the same items, in the same order.
        samples (`int`, *optional*, defaults to 10000): bootstrap resamples.
        confidence (`float`, *optional*, defaults to 0.95): the interval's coverage.
        seed (`int`, *optional*, defaults to 0): the resampling seed.

    Returns:
        `dict`: `mean`, `low`, `high` (NaN when there are no items) and `n`.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}.")
    check_int(samples, "samples", minimum=1)
    check_float(confidence, "confidence", minimum=0.0, maximum=1.0, min_inclusive=False, max_inclusive=False)
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // diff.size)  # resamples per batch: a few MB of indices at any item count
    means = np.concatenate(
        [diff[rng.integers(0, diff.size, size=(min(chunk, samples - start), diff.size))].mean(axis=1)
         for start in range(0, samples, chunk)]
    )  # fmt: skip
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "n": int(diff.size)}
