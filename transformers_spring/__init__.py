"""transformers-spring: continual personalization for Hugging Face causal LMs (SPRInG + LoGo memory).

The public names below are imported lazily, on first use (as `transformers` does): `import transformers_spring.data`
reads files without loading the memory's ANN index (hnswlib) or a trainer, and `import transformers_spring` is cheap.

Only the API a user calls is exported here. The building blocks behind it stay importable from their subpackages:
`transformers_spring.generation` (`FusedDualPathDecoder`, `HistoryPromptBuilder`, `AdapterRouter`,
`skinny_cpu_linear`), `transformers_spring.memory` (`BM25Index`, `ContributorSupport`, `MediatorExample`),
`transformers_spring.records` (`BufferStore`, `RetrievalMemory`), `transformers_spring.training` (`BaseLogProbCache`,
`find_lora_target_modules`) and `transformers_spring.utils` (`load_smollm2`).
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
    "generation": ("Personalization", "RetrievalInterpolationLogitsProcessor", "SpringConfig", "SpringForCausalLM"),
    "memory": (
        "BackendError", "CalibratedMediator", "HashingEncoder", "LoGoMemory", "Mediator", "MilvusBackend",
        "RelevanceGate", "VectorBackend", "resolve_encoder",
    ),
    "records": ("Interaction", "MediatedContext", "RetrievedItem"),
    "server": ("BackgroundServer", "ServeArguments"),
    "training": (
        "ContinualPersonalizer", "PersonalizationTuner", "SpringPeriodOutput", "SpringTrainer",
        "SpringTrainingArguments", "TuningArguments", "UserShard", "claim_user_shard", "drift_scores",
    ),
}  # fmt: skip
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}
# building blocks that were top-level names once -> the subpackage that exports them
_MOVED = {
    "AdapterRouter": "generation", "FusedDualPathDecoder": "generation", "HistoryPromptBuilder": "generation",
    "skinny_cpu_linear": "generation", "BM25Index": "memory", "ContributorSupport": "memory",
    "MediatorExample": "memory", "BufferStore": "records", "RetrievalMemory": "records",
    "BaseLogProbCache": "training", "find_lora_target_modules": "training", "load_smollm2": "utils",
}  # fmt: skip

__all__ = [
    "BackendError",
    "BackgroundServer",
    "BenchmarkArguments",
    "CalibratedMediator",
    "ContinualBenchmark",
    "ContinualPersonalizer",
    "HashingEncoder",
    "Interaction",
    "LoGoMemory",
    "MediatedContext",
    "Mediator",
    "MilvusBackend",
    "PeriodSplit",
    "Personalization",
    "PersonalizationTuner",
    "RelevanceGate",
    "RetrievalInterpolationLogitsProcessor",
    "RetrievedItem",
    "ServeArguments",
    "SpringConfig",
    "SpringForCausalLM",
    "SpringPeriodOutput",
    "SpringTrainer",
    "SpringTrainingArguments",
    "TuningArguments",
    "UserShard",
    "VectorBackend",
    "__version__",
    "claim_user_shard",
    "convert_news_category",
    "drift_scores",
    "read_interactions_jsonl",
    "read_lamp",
    "read_news_jsonl",
    "resolve_encoder",
    "rouge_scores",
    "run_benchmark",
    "select_users",
    "temporal_split",
    "write_interactions_jsonl",
]


_SUBMODULES = ("cli", "data", "evaluation", "generation", "memory", "persistence", "records", "training", "utils")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `transformers_spring.memory` without importing it first, as before
        return importlib.import_module(f".{name}", __name__)
    module = _SOURCE.get(name)
    if module is None:
        if name in _MOVED:  # a clear pointer instead of a bare AttributeError
            raise AttributeError(
                f"`{name}` is no longer a top-level name of {__name__}; import it from `{__name__}.{_MOVED[name]}`."
            )
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
    from .generation import Personalization, RetrievalInterpolationLogitsProcessor, SpringConfig, SpringForCausalLM
    from .memory import (
        BackendError,
        CalibratedMediator,
        HashingEncoder,
        LoGoMemory,
        Mediator,
        MilvusBackend,
        RelevanceGate,
        VectorBackend,
        resolve_encoder,
    )
    from .records import Interaction, MediatedContext, RetrievedItem
    from .server import BackgroundServer, ServeArguments
    from .training import (
        ContinualPersonalizer,
        PersonalizationTuner,
        SpringPeriodOutput,
        SpringTrainer,
        SpringTrainingArguments,
        TuningArguments,
        UserShard,
        claim_user_shard,
        drift_scores,
    )
