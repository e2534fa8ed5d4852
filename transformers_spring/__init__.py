"""transformers-spring: continual personalization for Hugging Face causal LMs (SPRInG + LoGo memory)."""

__version__ = "0.1.0.dev0"

from .data import (  # noqa: E402
    PeriodSplit,
    convert_news_category,
    read_interactions_jsonl,
    read_lamp,
    read_news_jsonl,
    select_users,
    temporal_split,
    write_interactions_jsonl,
)
from .evaluation import BenchmarkArguments, ContinualBenchmark, rouge_scores, run_benchmark  # noqa: E402
from .generation import (  # noqa: E402
    AdapterRouter,
    FusedDualPathDecoder,
    HistoryPromptBuilder,
    Personalization,
    RetrievalInterpolationLogitsProcessor,
    SpringConfig,
    SpringForCausalLM,
    skinny_cpu_linear,
)
from .memory import (  # noqa: E402
    BM25Index,
    HashingEncoder,
    Interaction,
    LoGoMemory,
    MediatedContext,
    Mediator,
    RelevanceGate,
    RetrievedItem,
    resolve_encoder,
)
from .training import (  # noqa: E402
    BaseLogProbCache,
    ContinualPersonalizer,
    SpringPeriodOutput,
    SpringTrainer,
    SpringTrainingArguments,
    drift_scores,
    find_lora_target_modules,
)
from .utils import load_smollm2  # noqa: E402

__all__ = [
    "AdapterRouter",
    "BM25Index",
    "BaseLogProbCache",
    "BenchmarkArguments",
    "ContinualBenchmark",
    "ContinualPersonalizer",
    "FusedDualPathDecoder",
    "HashingEncoder",
    "HistoryPromptBuilder",
    "Interaction",
    "LoGoMemory",
    "MediatedContext",
    "Mediator",
    "PeriodSplit",
    "Personalization",
    "RelevanceGate",
    "RetrievalInterpolationLogitsProcessor",
    "RetrievedItem",
    "SpringConfig",
    "SpringForCausalLM",
    "SpringPeriodOutput",
    "SpringTrainer",
    "SpringTrainingArguments",
    "__version__",
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
