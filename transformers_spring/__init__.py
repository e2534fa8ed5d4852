"""transformers-spring: continual personalization for Hugging Face causal LMs (SPRInG + LoGo memory)."""

__version__ = "0.1.0.dev0"

from .generation import (  # noqa: E402
    Personalization,
    RetrievalInterpolationLogitsProcessor,
    SpringConfig,
    SpringForCausalLM,
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

__all__ = [
    "BM25Index",
    "HashingEncoder",
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
    "__version__",
    "resolve_encoder",
]
