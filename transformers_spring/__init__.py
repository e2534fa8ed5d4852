"""transformers-spring: continual personalization for Hugging Face causal LMs (SPRInG + LoGo memory)."""

__version__ = "0.1.0.dev0"

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
    "RelevanceGate",
    "RetrievedItem",
    "__version__",
    "resolve_encoder",
]
