"""Small questions about a (possibly peft-wrapped) transformers model, asked in generation and training alike."""

from __future__ import annotations

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


def base_name_or_path(model: nn.Module) -> str | None:
    """The id or path the (wrapped) model was loaded from, or None."""
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
