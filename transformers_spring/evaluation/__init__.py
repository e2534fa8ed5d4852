"""Evaluation: ROUGE metrics and the continual-personalization benchmark (`spring bench` / `spring demo`)."""

from .benchmark import (
    BenchmarkArguments,
    ContinualBenchmark,
    load_interactions,
    run_benchmark,
    save_results,
    summarize,
)
from .methods import DEMO_METHODS, METHODS, MethodSpec, resolve_methods
from .metrics import mean_rouge, rouge_scores
from .report import markdown_table, plot_rouge_l

__all__ = [
    "DEMO_METHODS",
    "METHODS",
    "BenchmarkArguments",
    "ContinualBenchmark",
    "MethodSpec",
    "load_interactions",
    "markdown_table",
    "mean_rouge",
    "plot_rouge_l",
    "resolve_methods",
    "rouge_scores",
    "run_benchmark",
    "save_results",
    "summarize",
]
