"""transformers-spring: continual personalization for Hugging Face causal LMs (SPRInG + LoGo memory).

The public names below are imported lazily, on first use (as `transformers` does): `import transformers_spring.data`
reads files without loading the memory's ANN index (hnswlib) or a trainer, and `import transformers_spring` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    "data": (
        "PeriodSplit", "convert_news_category", "read_interactions_jsonl", "read_lamp", "read_news_jsonl",
        "select_users", "temporal_split", "write_interactions_jsonl",
    ),
    "evaluation": ("BenchmarkArguments", "ContinualBenchmark", "rouge_scores", "run_benchmark"),
    "generation": (
        "AdapterRouter", "FusedDualPathDecoder", "HistoryPromptBuilder", "Personalization",
        "RetrievalInterpolationLogitsProcessor", "SpringConfig", "SpringForCausalLM", "skinny_cpu_linear",
    ),
    "memory": (
        "BM25Index", "BackendError", "CalibratedMediator", "ContributorSupport", "HashingEncoder", "LoGoMemory",
        "Mediator", "MediatorExample", "MilvusBackend", "RelevanceGate", "VectorBackend", "resolve_encoder",
    ),
    "records": ("BufferStore", "Interaction", "MediatedContext", "RetrievalMemory", "RetrievedItem"),
    "training": (
        "BaseLogProbCache", "ContinualPersonalizer", "SpringPeriodOutput", "SpringTrainer", "SpringTrainingArguments",
        "UserShard", "claim_user_shard", "drift_scores", "find_lora_target_modules",
    ),
    "utils": ("load_smollm2",),
}  # fmt: skip
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "AdapterRouter",
    "BM25Index",
    "BackendError",
    "BaseLogProbCache",
    "BenchmarkArguments",
    "BufferStore",
    "CalibratedMediator",
    "ContinualBenchmark",
    "ContinualPersonalizer",
    "ContributorSupport",
    "FusedDualPathDecoder",
    "HashingEncoder",
    "HistoryPromptBuilder",
    "Interaction",
    "LoGoMemory",
    "MediatedContext",
    "Mediator",
    "MediatorExample",
    "MilvusBackend",
    "PeriodSplit",
    "Personalization",
    "RelevanceGate",
    "RetrievalMemory",
    "RetrievalInterpolationLogitsProcessor",
    "RetrievedItem",
    "SpringConfig",
    "SpringForCausalLM",
    "SpringPeriodOutput",
    "SpringTrainer",
    "SpringTrainingArguments",
    "UserShard",
    "VectorBackend",
    "__version__",
    "claim_user_shard",
    "convert_news_category",
    "drift_scores",
    "find_lora_target_modules",
    "load_smollm2",
    "read_interactions_jsonl",
    "read_lamp",
    "read_news_jsonl",
    "resolve_encoder",
    "rouge_scores",
    "run_benchmark",
    "select_users",
    "skinny_cpu_linear",
    "temporal_split",
    "write_interactions_jsonl",
]


_SUBMODULES = ("cli", "data", "evaluation", "generation", "memory", "persistence", "records", "training", "utils")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `transformers_spring.memory` without importing it first, as before
        return importlib.import_module(f".{name}", __name__)
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .data import (
        PeriodSplit,
        convert_news_category,
        read_interactions_jsonl,
        read_lamp,
        read_news_jsonl,
        select_users,
        temporal_split,
        write_interactions_jsonl,
    )
    from .evaluation import BenchmarkArguments, ContinualBenchmark, rouge_scores, run_benchmark
    from .generation import (
        AdapterRouter,
        FusedDualPathDecoder,
        HistoryPromptBuilder,
        Personalization,
        RetrievalInterpolationLogitsProcessor,
        SpringConfig,
        SpringForCausalLM,
        skinny_cpu_linear,
    )
    from .memory import (
        BackendError,
        BM25Index,
        CalibratedMediator,
        ContributorSupport,
        HashingEncoder,
        LoGoMemory,
        Mediator,
        MediatorExample,
        MilvusBackend,
        RelevanceGate,
        VectorBackend,
        resolve_encoder,
    )
    from .records import BufferStore, Interaction, MediatedContext, RetrievalMemory, RetrievedItem
    from .training import (
        BaseLogProbCache,
        ContinualPersonalizer,
        SpringPeriodOutput,
        SpringTrainer,
        SpringTrainingArguments,
        UserShard,
        claim_user_shard,
        drift_scores,
        find_lora_target_modules,
    )
    from .utils import load_smollm2
