"""Writes per-user adapters as an export folder for a multi-LoRA serving engine (the layout and the vLLM rules are in
[`~persistence.serving`])."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..utils.modeling import base_name_or_path, unwrap_model
from .adapter_checks import check_adapter_folder
from .continual_state import check_one_user_per_adapter
from .folder import save_folder
from .serving import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    VLLM_NO_LORA_MODEL_TYPES,
    assign_lora_int_ids,
    check_max_lora_rank,
    check_vllm_lora,
    file_sha256,
    lora_rank,
    previous_serving_ids,
    write_adapter_folder,
    write_lora_int_ids,
    write_serving_manifest,
)

logger = logging.get_logger(__name__)


def export_adapters_for_serving(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    adapters: Mapping[str, str],
    offloaded_folder: Callable[[str], Path | None],
    *,
    max_lora_rank: int,
) -> dict[str, Any]:
    """Writes one plain peft folder per user plus `serving_manifest.json`, checking every folder against vLLM's LoRA
    rules before anything is committed; the save is atomic and keeps files it did not write. Only the main process
    of a distributed run writes.

    Args:
        directory (`str` or `os.PathLike`): the export folder.
        model (`PeftModel`): the model holding the resident adapters.
        adapters (`Mapping[str, str]`): user id → adapter name, in export order.
        offloaded_folder (`Callable[[str], Path | None]`): the peft folder of an adapter that is not loaded in
            `model` (its two files are copied bit for bit), or None for a loaded one (its weights are read from
            `model`).
        max_lora_rank (`int`): the server's `--max-lora-rank`.

    Returns:
        `dict`: the manifest written (empty on the other processes of a distributed run).

    Raises:
        `ValueError`: an adapter vLLM would refuse (the field is named), a `max_lora_rank` it does not accept, or
        two users with one adapter name (both named).
    """
    from accelerate import PartialState
    from peft import get_peft_model_state_dict

    max_lora_rank = check_max_lora_rank(max_lora_rank)
    # One folder per user: two users on one adapter name would be served each other's weights.
    check_one_user_per_adapter(adapters, "export_for_serving")
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if model_type in VLLM_NO_LORA_MODEL_TYPES:
        logger.warning(
            f"vLLM's {model_type} model class does not support LoRA: these adapters load with peft, S-LoRA or "
            "LoRAX, but not in vLLM."
        )
    manifest: dict[str, Any] = {}
    state = PartialState()
    if state.is_main_process:
        with save_folder(directory, "ServingExport", argument="directory") as tmp:
            # Read under the folder's lock: two exports at once never hand out one id for different weights.
            previous = previous_serving_ids(directory)
            entries = []
            for user, name in adapters.items():
                folder = tmp / name
                source = offloaded_folder(name)
                if source is None:
                    weights = get_peft_model_state_dict(model, adapter_name=name)
                    write_adapter_folder(folder, model.peft_config[name], weights)
                else:  # the two files peft wrote, copied bit for bit (nothing else, no symlink)
                    folder.mkdir()
                    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                        if (source / file).is_symlink() or not (source / file).is_file():
                            raise ValueError(f"the offloaded adapter of {user!r} has no regular file {file}.")
                        shutil.copyfile(source / file, folder / file)
                # Resident or offloaded, every folder is checked by the validator of every load before it is served.
                check_adapter_folder(folder, base_model=model, check_values=False, where=source or folder)
                check_vllm_lora(folder, max_lora_rank)
                config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
                digest = file_sha256(folder / ADAPTER_WEIGHTS)
                entries.append(
                    {"user_id": user, "lora_name": name, "path": name, "rank": lora_rank(config), "sha256": digest}
                )
            assign_lora_int_ids(entries, previous)
            manifest = write_serving_manifest(
                tmp, entries, base_name_or_path(model), max_lora_rank, retired=previous.retired(entries)
            )
            # Beside the manifest and committed with it: the ids survive the manifest's loss (never reused).
            write_lora_int_ids(tmp, previous.used | {e["lora_int_id"] for e in entries})
    state.wait_for_everyone()
    return manifest
