"""Utilities: offline loaders for the project's small real models."""

from .models import (
    SMOLLM2_HUB_ID,
    default_cache_dir,
    load_causal_lm,
    load_smollm2,
    smollm2_gguf_path,
    smollm2_path,
)

__all__ = [
    "SMOLLM2_HUB_ID",
    "default_cache_dir",
    "load_causal_lm",
    "load_smollm2",
    "smollm2_gguf_path",
    "smollm2_path",
]
