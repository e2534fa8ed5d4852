"""Small questions about a (possibly peft-wrapped) transformers model, asked in generation and training alike."""

from __future__ import annotations

from typing import Any

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


def pad_token_id(*candidates: Any, default: int | None = None) -> int | None:
    """The first of `candidates` that is set, as an int: the id right-padding (or finished rows) is filled with.

    Generation, training and the fused decoder all pick a pad id the same way: the configured pad id, else the EOS id
    (which a tokenizer without a pad token pads with), else `default`. A candidate given as a list (a generation
    config's several EOS ids) counts by its first element.

    Args:
        *candidates (`int`, `list[int]` or `None`): the ids to try, in order (e.g. the generation config's and the
            tokenizer's `pad_token_id`, then `eos_token_id`).
        default (`int`, *optional*): what to return when every candidate is None (0 where the pad positions are
            masked out anyway).

    Returns:
        `int` or `None`: the pad id, or `default`.
    """
    for value in candidates:
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    return default


def base_name_or_path(model: nn.Module) -> str | None:
    """The id or path the (wrapped) model was loaded from, or None."""
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "name_or_path", None) or None
