"""Small questions about a (possibly peft-wrapped) transformers model, asked in generation and training alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .models import converted_model

_HUB_CACHE_PREFIX = "models--"  # huggingface_hub's cache: <cache>/models--<org>--<name>/snapshots/<revision>


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


def is_hub_repo_id(name: Any) -> bool:
    """Whether `name` is a well-formed Hugging Face Hub model repo id (`"name"` or `"org/name"`), by the Hub's own
    rules (`huggingface_hub.utils.validate_repo_id`). Only the form is checked: nothing is looked up.

    Args:
        name (`Any`): the candidate.
    """
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return False
    return True


def base_model_hub_id(model_or_path: nn.Module | str | os.PathLike | None) -> str | None:
    """The Hub repo id a base model can be loaded by elsewhere (a serving engine, another machine), or None when
    only a local path is known. For a model, its `config.name_or_path` (see [`base_name_or_path`]) is looked at:

    - a folder [`~utils.models.smollm2_path`] converted from a GGUF (its marker file): the repo the GGUF was made from
      ([`~utils.models.SMOLLM2_HUB_ID`]);
    - a snapshot in the Hugging Face cache layout, `.../models--<org>--<name>/snapshots/<revision>`: `"<org>/<name>"`;
    - any other existing local file or directory: None;
    - otherwise the name itself when it is a well-formed repo id ([`is_hub_repo_id`]), else None.

    Args:
        model_or_path (`nn.Module`, `str`, `os.PathLike` or `None`): a (possibly peft-wrapped) model, or the id or
            path it was loaded from.

    Returns:
        `str` or `None`: the repo id.

    Raises:
        `TypeError`: `model_or_path` is none of these.
    """
    if isinstance(model_or_path, nn.Module):
        name = base_name_or_path(model_or_path)
    elif model_or_path is None or isinstance(model_or_path, (str, os.PathLike)):
        name = os.fspath(model_or_path) if model_or_path is not None else None
    else:
        raise TypeError(
            f"`model_or_path` must be a model, a str or an os.PathLike, got {type(model_or_path).__name__}."
        )
    if not name:
        return None
    path = Path(name)
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith(_HUB_CACHE_PREFIX):
        repo_id = parts[-3][len(_HUB_CACHE_PREFIX) :].replace("--", "/")  # a repo id never holds "--"
        if is_hub_repo_id(repo_id):
            return repo_id
    if path.exists():
        converted = converted_model(path) if path.is_dir() else None
        return converted.hub_id if converted is not None else None
    return name if is_hub_repo_id(name) else None
