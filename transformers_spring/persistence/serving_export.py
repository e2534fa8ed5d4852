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

from ..utils.modeling import base_model_hub_id, base_name_or_path, is_hub_repo_id, unwrap_model
from ..utils.models import converted_model
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
    base_model_id: str | None = None,
) -> dict[str, Any]:
    """Writes one plain peft folder per user plus `serving_manifest.json`, checking every folder against vLLM's LoRA
    rules before anything is committed; the save is atomic and keeps files it did not write. Only the main process
    of a distributed run writes.

    The manifest's `base_model_name_or_path` is what a server loads (`LLM(model=...)`): `base_model_id`, else the
    Hub id [`~utils.modeling.base_model_hub_id`] finds for the model (a converted SmolLM2 folder, a Hub cache
    snapshot, a repo id), else the model's local path, with a warning (another machine cannot load it). The local path
    is kept as `base_model_local_path` when it differs; a model dequantized from a GGUF gets a `base_model_note`.

    Args:
        directory (`str` or `os.PathLike`): the export folder.
        model (`PeftModel`): the model holding the resident adapters.
        adapters (`Mapping[str, str]`): user id → adapter name, in export order.
        offloaded_folder (`Callable[[str], Path | None]`): the peft folder of an adapter that is not loaded in
            `model` (its two files are copied bit for bit), or None for a loaded one (its weights are read from
            `model`).
        max_lora_rank (`int`): the server's `--max-lora-rank`.
        base_model_id (`str`, *optional*): the Hub repo id of the base model, when the model's own name or path does
            not tell it (a local copy).

    Returns:
        `dict`: the manifest written (empty on the other processes of a distributed run).

    Raises:
        `ValueError`: an adapter vLLM would refuse (the field is named), a `max_lora_rank` it does not accept, a
        `base_model_id` that is not a repo id, or two users with one adapter name (both named).
    """
    from accelerate import PartialState
    from peft import get_peft_model_state_dict

    max_lora_rank = check_max_lora_rank(max_lora_rank)
    base_model_id = check_base_model_id(base_model_id)
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
            base, base_fields = serving_base_model(model, base_model_id)
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
                if config.get("base_model_name_or_path") != base:
                    # vLLM's filesystem LoRA resolver serves a folder only when this names the served model.
                    config["base_model_name_or_path"] = base
                    (folder / ADAPTER_CONFIG).write_text(
                        json.dumps(config, indent=2, sort_keys=True), encoding="utf-8"
                    )
                digest = file_sha256(folder / ADAPTER_WEIGHTS)
                entries.append(
                    {"user_id": user, "lora_name": name, "path": name, "rank": lora_rank(config), "sha256": digest}
                )
            assign_lora_int_ids(entries, previous)
            manifest = write_serving_manifest(
                tmp, entries, base, max_lora_rank, retired=previous.retired(entries), **base_fields
            )
            # Beside the manifest and committed with it: the ids survive the manifest's loss (never reused).
            write_lora_int_ids(tmp, previous.used | {e["lora_int_id"] for e in entries})
    state.wait_for_everyone()
    return manifest


def check_base_model_id(base_model_id: Any) -> str | None:
    """`base_model_id` as given: None, or a Hub repo id.

    Args:
        base_model_id (`str`, *optional*): the id to record in `serving_manifest.json`.

    Raises:
        `TypeError`: another type. `ValueError`: a string that is not a well-formed `"org/name"` or `"name"`.
    """
    if base_model_id is None:
        return None
    if not isinstance(base_model_id, str):
        raise TypeError(f"`base_model_id` must be a Hub repo id (str), got {type(base_model_id).__name__}.")
    if not is_hub_repo_id(base_model_id):
        raise ValueError(
            f"`base_model_id` must be a Hugging Face Hub repo id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', got "
            f"{base_model_id!r}."
        )
    return base_model_id


def serving_base_model(model: torch.nn.Module, base_model_id: str | None = None) -> tuple[str | None, dict[str, str]]:
    """What the manifest records about the base model: `base_model_name_or_path` (the Hub id when known, else the
    local path, with a warning) and the optional `base_model_local_path` and `base_model_note` fields.

    Args:
        model (`nn.Module`): the (peft-wrapped) base model.
        base_model_id (`str`, *optional*): its Hub repo id, given by the caller (checked with
            [`check_base_model_id`]).

    Returns:
        `(base_model_name_or_path, fields)`: `fields` holds the keyword arguments of the optional fields to write.
    """
    local = base_name_or_path(model)
    found = base_model_hub_id(local)
    if base_model_id is not None and found is not None and found != base_model_id:
        logger.warning(
            f"`base_model_id` {base_model_id!r} is recorded as the base model, but the model was loaded from "
            f"{local!r}, which is {found!r}: the adapters may not fit the model a server loads."
        )
    hub_id = base_model_id or found
    fields: dict[str, str] = {}
    if local is not None and hub_id is not None and local != hub_id:
        fields["base_model_local_path"] = local
    converted = converted_model(local) if local is not None and os.path.isdir(local) else None
    if converted is not None:
        fields["base_model_note"] = (
            f"the adapters were trained on weights dequantized from the quantized GGUF {converted.gguf_file} (local "
            f"copy {local}); a server loading {hub_id} serves its original weights, so outputs can differ slightly."
        )
        logger.warning(f"serving_manifest.json: {fields['base_model_note']}")
    elif hub_id is None and local is None:
        logger.warning(
            "serving_manifest.json names no base model: the model records no name or path (`config.name_or_path`). "
            "Pass `base_model_id=` (the Hub repo id of the base model) to `export_for_serving`."
        )
    elif hub_id is None:
        logger.warning(
            f"serving_manifest.json records the base model as the local path {local!r}: no Hub id is known for it, "
            "so a server on another machine cannot load it. Pass `base_model_id=` (the Hub repo id of the base "
            "model) to `export_for_serving`."
        )
    return hub_id or local, fields
