"""Memory: per-user local memories, a global collective memory, the relevance gate and the mediator (LoGo)."""

from ..records import Interaction, MediatedContext, RetrievedItem
from .bm25 import BM25Index, bm25_tokenize
from .encoders import CallableEncoder, Encoder, HashingEncoder, SentenceTransformerEncoder, resolve_encoder
from .gate import RelevanceGate
from .global_memory import GlobalMemory
from .local import LocalMemory, VectorStore
from .logo import LoGoMemory
from .mediator import CalibratedMediator, Mediator, MediatorExample
from .support import ContributorSupport

__all__ = [
    "BM25Index",
    "CalibratedMediator",
    "CallableEncoder",
    "ContributorSupport",
    "Encoder",
    "GlobalMemory",
    "HashingEncoder",
    "Interaction",
    "LoGoMemory",
    "LocalMemory",
    "MediatedContext",
    "Mediator",
    "MediatorExample",
    "RelevanceGate",
    "RetrievedItem",
    "SentenceTransformerEncoder",
    "VectorStore",
    "bm25_tokenize",
    "resolve_encoder",
]
