"""transformers-spring: continual personalization for Hugging Face causal LMs (SPRInG + LoGo memory)."""

__version__ = "0.1.0.dev0"

from .data import read_news_jsonl  # noqa: E402
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
    "ContinualPersonalizer",
    "FusedDualPathDecoder",
    "HashingEncoder",
    "HistoryPromptBuilder",
    "Interaction",
    "LoGoMemory",
    "MediatedContext",
    "Mediator",
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
    "drift_scores",
    "find_lora_target_modules",
    "load_smollm2",
    "read_news_jsonl",
    "resolve_encoder",
    "skinny_cpu_linear",
]
