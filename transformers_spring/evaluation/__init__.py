"""Evaluation: ROUGE metrics and the continual-personalization benchmark (`spring bench` / `spring demo`)."""

from .benchmark import (
    ContinualBenchmark,
    bootstrap_table,
    decoding_budget,
    floor_prediction,
    load_interactions,
    run_benchmark,
    save_results,
    summarize,
)
from .benchmark_config import BenchmarkArguments
from .methods import DEMO_METHODS, FLOORS, METHODS, MethodSpec, resolve_methods
from .metrics import mean_rouge, paired_bootstrap, rouge_scores
from .report import lamp_golds, lamp_predictions, markdown_table, plot_rouge_l

__all__ = [
    "DEMO_METHODS",
    "FLOORS",
    "METHODS",
    "BenchmarkArguments",
    "ContinualBenchmark",
    "MethodSpec",
    "bootstrap_table",
    "decoding_budget",
    "floor_prediction",
    "lamp_golds",
    "lamp_predictions",
    "load_interactions",
    "markdown_table",
    "mean_rouge",
    "paired_bootstrap",
    "plot_rouge_l",
    "resolve_methods",
    "rouge_scores",
    "run_benchmark",
    "save_results",
    "summarize",
]
