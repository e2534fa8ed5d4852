"""The SPRInG folder format, which [`SpringForCausalLM`] and [`ContinualPersonalizer`] both write and read:

```
<dir>/spring_config.json        # SpringConfig, with base_model_name_or_path (the base weights are not saved)
<dir>/adapters/<name>/...       # the LoRA adapters, peft's multi-adapter layout
<dir>/community_adapters.json   # which adapters are community adapters, their members and centroids (when any)
<dir>/memory/...                # the memory, through its own save_pretrained
<dir>/tokenizer*.json           # the tokenizer
<dir>/spring_manifest.json      # the atomic-save manifest (persistence.folder), with the components above
```

Nothing from `transformers_spring.generation` is imported at module import time: `generation` imports this module.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from transformers.utils import logging

from .community_files import COMMUNITY_FILE, write_community_adapters
from .folder import component, read_manifest
from .registry import qualified_name

if TYPE_CHECKING:
    from ..generation.config import SpringConfig

logger = logging.get_logger(__name__)

ADAPTERS_DIR = "adapters"
MEMORY_DIR = "memory"


def spring_components(directory: Path, memory: Any) -> list[dict]:
    """The parts of a SPRInG folder, for its manifest (sentence-transformers' `modules.json` style): the config, and
    when present the adapters, the memory (with its class, which the loader dispatches on) and the tokenizer.

    Args:
        directory (`Path`): the folder as written (a save's staging folder).
        memory (`Any`): the memory that was saved, whose class is recorded.

    Returns:
        `list[dict]`: one `{"name", "path", "type"}` per part.
    """
    from ..generation.config import SPRING_CONFIG_NAME

    parts = [{"name": "config", "path": SPRING_CONFIG_NAME, "type": "SpringConfig"}]
    if (directory / ADAPTERS_DIR).is_dir():
        parts.append({"name": "adapters", "path": ADAPTERS_DIR, "type": "peft.LoraConfig"})
    if (directory / COMMUNITY_FILE).is_file():
        parts.append({"name": "communities", "path": COMMUNITY_FILE, "type": "CommunityAdapters"})
    if (directory / MEMORY_DIR).is_dir():
        parts.append({"name": "memory", "path": MEMORY_DIR, "type": qualified_name(type(memory))})
    if (directory / "tokenizer_config.json").is_file():
        parts.append({"name": "tokenizer", "path": ".", "type": "transformers.AutoTokenizer"})
    return parts


def load_memory_component(directory: Path, memory_kwargs: dict | None) -> Any:
    """The memory of a SPRInG folder, loaded with the class its manifest names (a `LoGoMemory` subclass survives the
    round trip; a folder without a manifest holds a `LoGoMemory`).

    Args:
        directory (`Path`): the SPRInG folder.
        memory_kwargs (`dict`, *optional*): passed to the memory's `from_pretrained` (e.g. `encoder=`).

    Returns:
        The memory, or None when the folder has none.
    """
    if not (directory / MEMORY_DIR).is_dir():
        return None
    from ..memory import LoGoMemory
    from ..memory.logo import MEMORY_TYPES

    entry = component(read_manifest(directory), "memory")
    cls = MEMORY_TYPES.resolve(entry["type"]) if entry is not None else LoGoMemory
    return cls.from_pretrained(directory / (entry["path"] if entry else MEMORY_DIR), **(memory_kwargs or {}))


def save_spring_files(
    directory: str | os.PathLike,
    spring_config: SpringConfig | None,
    model: nn.Module,
    memory: Any,
    tokenizer: Any,
    communities: Any = None,
) -> tuple[SpringConfig, bool]:
    """
    Writes what every SPRInG folder holds besides its adapters: `spring_config.json` (with the base model's id
    filled in), the memory under `memory/`, the tokenizer and `community_adapters.json` (each when not None or
    empty).

    Args:
        directory (`str` or `os.PathLike`): the folder to write (a save's staging folder).
        spring_config ([`SpringConfig`], *optional*): the config; defaults to `SpringConfig()`.
        model (`nn.Module`): the model, whose base id fills in `base_model_name_or_path` when the config has none.
        memory (`Any`): the memory to save under `memory/`, or None.
        tokenizer (`Any`): the tokenizer to save, or None.
        communities ([`~generation.community.CommunityAdapters`], *optional*): the community adapters' routing
            table (their weights are saved with the other adapters).

    Returns:
        `(SpringConfig, bool)`: the config as written, and whether the memory was saved.
    """
    from ..generation.config import SpringConfig
    from ..utils.modeling import base_name_or_path

    config = copy.deepcopy(spring_config) if spring_config is not None else SpringConfig()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_name_or_path(model)
    config.save_pretrained(directory)
    if communities is not None and len(communities):
        write_community_adapters(directory, communities)
    memory_saved = False
    if memory is not None:
        if callable(getattr(memory, "save_pretrained", None)):
            memory.save_pretrained(os.path.join(directory, MEMORY_DIR))
            memory_saved = True
        else:
            logger.warning(f"{type(memory).__name__} has no save_pretrained; the memory is not saved.")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    return config, memory_saved


def load_saved_adapters(model: nn.Module, adapters_dir: str | os.PathLike, is_trainable: bool) -> nn.Module:
    """Loads every adapter of a SPRInG folder's `adapters/` into `model` (a single adapter saved at the top of the
    folder is called `"default"`).

    Args:
        model (`nn.Module`): the base model.
        adapters_dir (`str` or `os.PathLike`): the `adapters/` folder.
        is_trainable (`bool`): load the adapters trainable.

    Returns:
        `nn.Module`: a `PeftModel` holding the adapters, or `model` itself when the folder holds none.

    Raises:
        `ValueError`: `adapters/` or anything in it is a symlink, an adapter's name is not one the library writes, or
        an adapter fails [`~persistence.adapter_checks.check_adapter_folder`] (the file and field are named). Every
        adapter is checked before the first one is loaded: on a refusal `model` is untouched.
    """
    from peft import PeftModel

    from ..generation.adapters import sanitize_adapter_name
    from .adapter_checks import adapter_tree, check_adapter_folder

    adapters_dir = os.fspath(adapters_dir)
    # Walks the whole tree first: a symlinked `adapters/`, adapter folder or file is refused before anything is read.
    adapter_tree(adapters_dir, what="the adapters folder")
    found = []
    if os.path.isfile(os.path.join(adapters_dir, "adapter_config.json")):
        found.append(("default", adapters_dir))
    for name in sorted(os.listdir(adapters_dir)):
        sub = os.path.join(adapters_dir, name)
        if not os.path.isfile(os.path.join(sub, "adapter_config.json")):
            continue
        # A folder name becomes an adapter (module) name: only names the library writes, and no symlinked folder,
        # which could pull in another model's weights.
        if os.path.islink(sub) or name != sanitize_adapter_name(name):
            raise ValueError(f"{adapters_dir}: the adapter folder {name!r} is a symlink or not a valid adapter name.")
        found.append((name, sub))
    if not found:
        return model
    for _, path in found:
        check_adapter_folder(path, base_model=model)
    (first_name, first_path), rest = found[0], found[1:]
    model = PeftModel.from_pretrained(model, first_path, adapter_name=first_name, is_trainable=is_trainable)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    return model


def load_tokenizer(sources: Sequence[str | os.PathLike], **hub_kwargs) -> Any:
    """The tokenizer of the first of `sources` (folders or model ids) that has one.

    Args:
        sources (`Sequence[str | os.PathLike]`): where to look, in order (e.g. the SPRInG folder, then the base model).
        hub_kwargs: passed to `AutoTokenizer.from_pretrained` (`token`, `cache_dir`, `revision`, ...).

    Returns:
        The tokenizer, padding on the left (what batched decoding needs; a decoder-only tokenizer such as SmolLM2's
        saves no padding side and would pad on the right), or None (with a warning) when none of `sources` has one.
    """
    from transformers import AutoTokenizer

    for source in sources:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        except (OSError, ValueError, TypeError):
            continue
        tokenizer.padding_side = "left"
        return tokenizer
    logger.warning("No tokenizer could be loaded; pass `tokenizer=` to personalise generation.")
    return None
