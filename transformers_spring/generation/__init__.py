"""SPRInG's gated dual-path decoding: `SpringForCausalLM`, its config, the retrieval-interpolation processor and
the copy path."""

from .adapters import AdapterRouter
from .community import CommunityAdapter, CommunityAdapters
from .config import DECODING_PRESETS, SPRING_CONFIG_NAME, SpringConfig
from .copying import CopyIndex, CopyMixtureLogitsProcessor
from .cpu_linear import skinny_cpu_linear
from .fused import FusedDualPathDecoder
from .logits_process import RetrievalInterpolationLogitsProcessor, adaptive_log_weights, js_divergence
from .model import SpringForCausalLM
from .personalization import Personalization, RowPersonalization
from .prompting import HistoryPromptBuilder

__all__ = [
    "DECODING_PRESETS",
    "SPRING_CONFIG_NAME",
    "AdapterRouter",
    "CommunityAdapter",
    "CommunityAdapters",
    "CopyIndex",
    "CopyMixtureLogitsProcessor",
    "FusedDualPathDecoder",
    "HistoryPromptBuilder",
    "Personalization",
    "RetrievalInterpolationLogitsProcessor",
    "RowPersonalization",
    "SpringConfig",
    "SpringForCausalLM",
    "adaptive_log_weights",
    "js_divergence",
    "skinny_cpu_linear",
]
