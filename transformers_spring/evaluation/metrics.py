"""ROUGE as the paper reports it: ROUGE-1 and ROUGE-L F-measures with Porter stemming, averaged per test sample."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rougeL")


@functools.cache
def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # an extra, not a core dependency
        raise ImportError(
            "ROUGE needs the `rouge-score` package: pip install rouge-score (or transformers-spring[demo])."
        ) from err
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1 and ROUGE-L F-measures of each prediction against its reference.

    Args:
        predictions (`Sequence[str]`): generated texts.
        references (`Sequence[str]`): the gold texts, one per prediction.

    Returns:
        `list[dict]`: one `{"rouge1": f, "rougeL": f}` per pair (F-measure, stemmed, the `rouge-score` package).
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("`predictions` and `references` must be sequences of strings, not a single string.")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references.")
    scorer = _scorer()
    out = []
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score's order: (target, prediction)
        out.append({name: float(scores[name].fmeasure) for name in ROUGE_TYPES})
    return out


def mean_rouge(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The per-sample mean of each ROUGE type (NaN for no samples)."""
    return {name: statistics.fmean(s[name] for s in scores) if scores else float("nan") for name in ROUGE_TYPES}
