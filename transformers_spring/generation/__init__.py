"""SPRInG's gated dual-path decoding: `SpringForCausalLM`, its config and the retrieval-interpolation processor."""

from .adapters import AdapterRouter
from .config import SPRING_CONFIG_NAME, SpringConfig
from .cpu_linear import skinny_cpu_linear
from .fused import FusedDualPathDecoder
from .logits_process import RetrievalInterpolationLogitsProcessor, js_divergence
from .model import SpringForCausalLM
from .personalization import Personalization, RowPersonalization
from .prompting import HistoryPromptBuilder

__all__ = [
    "SPRING_CONFIG_NAME",
    "AdapterRouter",
    "FusedDualPathDecoder",
    "HistoryPromptBuilder",
    "Personalization",
    "RetrievalInterpolationLogitsProcessor",
    "RowPersonalization",
    "SpringConfig",
    "SpringForCausalLM",
    "js_divergence",
    "skinny_cpu_linear",
]
