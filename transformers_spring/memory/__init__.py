"""Memory: per-user local memories, a global collective memory, the relevance gate and the mediator (LoGo)."""

from ..records import Interaction, MediatedContext, RetrievedItem
from .backends import BackendError, VectorBackend, WriteJournal
from .bm25 import BM25Index, bm25_tokenize
from .config import LoGoMemoryConfig
from .encoders import CallableEncoder, Encoder, HashingEncoder, SentenceTransformerEncoder, resolve_encoder
from .gate import RelevanceGate
from .global_memory import GlobalMemory
from .local import LocalMemory, VectorStore
from .logo import LoGoMemory
from .mediator import CalibratedMediator, Mediator, MediatorExample
from .milvus import MilvusBackend
from .support import ContributorSupport

__all__ = [
    "BackendError",
    "BM25Index",
    "CalibratedMediator",
    "CallableEncoder",
    "ContributorSupport",
    "Encoder",
    "GlobalMemory",
    "HashingEncoder",
    "Interaction",
    "LoGoMemory",
    "LoGoMemoryConfig",
    "LocalMemory",
    "MediatedContext",
    "Mediator",
    "MediatorExample",
    "MilvusBackend",
    "RelevanceGate",
    "RetrievedItem",
    "SentenceTransformerEncoder",
    "VectorBackend",
    "VectorStore",
    "WriteJournal",
    "bm25_tokenize",
    "resolve_encoder",
]
