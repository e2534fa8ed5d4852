"""Evaluation: ROUGE metrics and the continual-personalization benchmark (`spring bench` / `spring demo`)."""

from .benchmark import ContinualBenchmark, run_benchmark
from .benchmark_config import PRESETS, BenchmarkArguments, TaskPreset
from .data import benchmark_splits, load_interactions
from .decoding import BenchmarkRow, RowDecoder, decoding_budget
from .logo_benchmark import LoGoBenchmark, run_logo_benchmark
from .logo_benchmark_config import LoGoBenchmarkArguments
from .methods import DEMO_METHODS, FLOORS, METHODS, MethodSpec, floor_prediction, rag_items, resolve_methods
from .metrics import mean_rouge, paired_bootstrap, rouge_scores
from .report import (
    bootstrap_table,
    drift_bootstrap,
    lamp_golds,
    lamp_predictions,
    logo_markdown,
    markdown_table,
    plot_logo_gain,
    plot_rouge_l,
    save_logo_results,
    save_results,
    summarize,
    summarize_logo,
)

__all__ = [
    "DEMO_METHODS",
    "FLOORS",
    "METHODS",
    "PRESETS",
    "BenchmarkArguments",
    "ContinualBenchmark",
    "LoGoBenchmark",
    "LoGoBenchmarkArguments",
    "MethodSpec",
    "TaskPreset",
    "bootstrap_table",
    "decoding_budget",
    "benchmark_splits",
    "BenchmarkRow",
    "RowDecoder",
    "drift_bootstrap",
    "floor_prediction",
    "lamp_golds",
    "lamp_predictions",
    "load_interactions",
    "logo_markdown",
    "markdown_table",
    "mean_rouge",
    "paired_bootstrap",
    "plot_logo_gain",
    "plot_rouge_l",
    "rag_items",
    "resolve_methods",
    "rouge_scores",
    "run_benchmark",
    "run_logo_benchmark",
    "save_logo_results",
    "save_results",
    "summarize",
    "summarize_logo",
]
