"""Small questions about a (possibly peft-wrapped) transformers model, asked in generation and training alike."""

from __future__ import annotations

import inspect

import torch.nn as nn


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside any (nested) peft wrapper, or the model itself."""
    while callable(getattr(model, "get_base_model", None)):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (computing the LM head on the last positions only)."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def base_name_or_path(model: nn.Module) -> str | None:
    """The id or path the (wrapped) model was loaded from, or None."""
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def is_plain_dynamic_cache(cache) -> bool:
    """Whether `cache` is a transformers `DynamicCache` of full-attention layers only (`DynamicLayer`, no sliding window
    or linear attention): the layout whose per-layer keys/values can be padded, stacked or repeated along the batch."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return type(cache) is DynamicCache and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
