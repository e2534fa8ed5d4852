"""Adapters exported for multi-LoRA serving engines (vLLM, S-LoRA, LoRAX): one plain PEFT folder per user plus a
manifest (user → `lora_int_id`, path, rank), each folder checked against the rules vLLM applies when it loads a LoRA.

The export folder:

```
<dir>/serving_manifest.json            # base model, max_lora_rank, and per user: lora_name, lora_int_id, path, rank,
                                       # sha256 of the weights
<dir>/.lora_int_ids.json               # every lora_int_id this folder ever gave out (survives a lost manifest)
<dir>/<adapter>/adapter_config.json    # a peft LoRA folder: PeftModel.from_pretrained(base, f"<dir>/<adapter>")
<dir>/<adapter>/adapter_model.safetensors
<dir>/spring_manifest.json             # the atomic-save manifest (persistence.folder)
```
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..utils.validation import check_choice, check_int
from .json_files import MAX_SERVING_MANIFEST_BYTES, read_json_capped

logger = logging.get_logger(__name__)

SERVING_MANIFEST = "serving_manifest.json"
# Every `lora_int_id` the folder ever gave out, written by each export next to the manifest: vLLM caches adapters by
# id, so losing the manifest (deleted, or replaced by hand) must not let the next export give an old id to new weights.
LORA_INT_IDS_FILE = ".lora_int_ids.json"
SERVING_FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# vLLM's `--max-lora-rank` accepts only these values (vllm/config/lora.py, `MaxLoRARanks`); its default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# `init_lora_weights` values vLLM serves (the others, PiSSA, OLoRA, CorDA, LoftQ, change the base weights too).
VLLM_INIT_WEIGHTS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT features vLLM refuses (the feature validation of its `PEFTHelper`).
VLLM_UNSUPPORTED = ("lora_bias", "layer_replication", "alora_invocation_tokens", "use_qalora", "use_bdlora")
# Model types (`config.model_type`) whose vLLM model class does not support LoRA at all.
VLLM_NO_LORA_MODEL_TYPES = ("gpt2",)


def check_max_lora_rank(max_lora_rank: Any) -> int:
    """`max_lora_rank` as vLLM would accept it (one of [`VLLM_LORA_RANKS`]): an int (`TypeError` otherwise) that is
    one of vLLM's values (`ValueError` otherwise)."""
    return check_choice(check_int(max_lora_rank, "max_lora_rank"), "max_lora_rank", VLLM_LORA_RANKS)


def vllm_lora_problems(adapter_dir: str | os.PathLike, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> list[str]:
    """Why vLLM would refuse to load (or would load wrongly) the PEFT LoRA folder `adapter_dir`; empty when it is
    fine. The checks follow vLLM's `PEFTHelper` (`vllm/lora/peft_helper.py`) and its weight loader:

    - `adapter_config.json` is a LoRA config with `r`, `lora_alpha` and `target_modules`;
    - its largest rank (`r`, or a larger `rank_pattern` value) is at most `max_lora_rank`;
    - `bias == "none"`, no `modules_to_save`, no DoRA (`use_dora`), no LoRA bias and none of the other features vLLM
      refuses (`layer_replication`, ...); `init_lora_weights` is `true`, `false` or a method vLLM serves;
    - `adapter_model.safetensors` holds only `lora_A` / `lora_B` weights (no embedding or `lm_head` LoRA, which only
      some vLLM model classes accept).

    Args:
        adapter_dir (`str` or `os.PathLike`): a folder written by peft's `save_pretrained` (one adapter).
        max_lora_rank (`int`, *optional*, defaults to 16): the server's `--max-lora-rank`.

    Returns:
        `list[str]`: one sentence per problem, each naming the file and field.
    """
    folder = Path(adapter_dir)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file() or config_path.is_symlink():
        return [f"{config_path} is missing (not a peft adapter folder)."]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{config_path} is not valid JSON: {err}."]
    if not isinstance(config, dict):
        return [f"{config_path} must hold a JSON object."]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"{config_path}: field 'peft_type' is {config.get('peft_type')!r}, vLLM serves 'LORA'.")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) in (None, [], ""):
            problems.append(f"{config_path}: field {field!r} is required by vLLM.")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        problems.append(f"{config_path}: field 'rank_pattern' must be an object.")
        pattern = {}
    ranks = [config.get("r"), *pattern.values()]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    if ranks and max(ranks) > max_lora_rank:
        problems.append(
            f"{config_path}: field 'r' (or 'rank_pattern') is {max(ranks)}, above the server's max_lora_rank "
            f"{max_lora_rank}."
        )
    if config.get("bias", "none") != "none":
        problems.append(f"{config_path}: field 'bias' is {config.get('bias')!r}; vLLM needs 'none'.")
    if config.get("modules_to_save"):
        problems.append(f"{config_path}: field 'modules_to_save' is set; vLLM does not support it.")
    if config.get("use_dora"):
        problems.append(f"{config_path}: field 'use_dora' is true; vLLM does not support DoRA.")
    for field in VLLM_UNSUPPORTED:
        if config.get(field):
            problems.append(f"{config_path}: field {field!r} is set; vLLM does not support it.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init not in VLLM_INIT_WEIGHTS:
        problems.append(f"{config_path}: field 'init_lora_weights' is {init!r}; vLLM serves {VLLM_INIT_WEIGHTS}.")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() or weights.is_symlink():
        problems.append(f"{weights} is missing.")
    else:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                other = [key for key in f.keys() if not (".lora_A." in key or ".lora_B." in key)]
        except (SafetensorError, OSError) as err:
            problems.append(f"{weights} cannot be read: {err}.")
            other = []
        if other:
            problems.append(f"{weights}: holds weights other than lora_A/lora_B (e.g. {other[0]!r}).")
    return problems


def check_vllm_lora(adapter_dir: str | os.PathLike, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> None:
    """Raises `ValueError` listing every [`vllm_lora_problems`] of `adapter_dir`."""
    problems = vllm_lora_problems(adapter_dir, max_lora_rank)
    if problems:
        raise ValueError("the adapter would not load in vLLM: " + " ".join(problems))


def write_adapter_folder(folder: Path, lora_config: Any, state_dict: dict) -> None:
    """One adapter as a plain peft folder, what `PeftModel.save_pretrained` writes for a single adapter: its
    config (in inference mode) and its weights under peft's saved key names."""
    import copy

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = copy.deepcopy(lora_config)
    config.inference_mode = True
    config.save_pretrained(str(folder))
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def lora_rank(config: dict) -> int:
    """The largest rank of an adapter config: `r`, or a larger `rank_pattern` value."""
    pattern = config.get("rank_pattern")
    values = list(pattern.values()) if isinstance(pattern, dict) else []
    return max([config["r"], *(v for v in values if isinstance(v, int) and not isinstance(v, bool))])


class PreviousIds:
    """The `lora_int_id`s an earlier export into the same folder gave out (empty for a new folder)."""

    def __init__(self, entries: Sequence[dict] = (), retired: Sequence[int] = (), given: Sequence[int] = ()):
        self.by_user = {e["user_id"]: (e["lora_int_id"], e.get("sha256")) for e in entries}
        self.used = {e["lora_int_id"] for e in entries} | set(retired) | set(given)

    def retired(self, entries: Sequence[dict]) -> list[int]:
        """Every id given out before and not in `entries`: retired for good."""
        return sorted(self.used - {e["lora_int_id"] for e in entries})


def previous_serving_ids(directory: str | os.PathLike) -> PreviousIds:
    """The ids of the export already in `directory`, if any: those of its manifest (see [`read_serving_manifest`],
    which also verifies its weights) and every id [`LORA_INT_IDS_FILE`] records, so that no id is given out twice
    even when the manifest was lost."""
    given = read_lora_int_ids(directory)
    if not (Path(directory) / SERVING_MANIFEST).is_file():
        if given:
            logger.warning(
                f"{Path(directory) / SERVING_MANIFEST} is missing: every user gets a new lora_int_id, above the "
                f"{len(given)} id(s) this folder gave out before."
            )
        return PreviousIds(given=given)
    manifest = read_serving_manifest(directory)
    return PreviousIds(manifest["adapters"], manifest.get("retired_lora_int_ids", []), given)


def read_lora_int_ids(directory: str | os.PathLike) -> list[int]:
    """The ids [`LORA_INT_IDS_FILE`] in `directory` records (empty when there is none)."""
    path = Path(directory) / LORA_INT_IDS_FILE
    if not path.exists() and not path.is_symlink():
        return []
    if path.is_symlink():
        raise ValueError(f"{path} is a symlink; it is not read.")
    data = read_json_capped(path, MAX_SERVING_MANIFEST_BYTES)
    ids = data.get("lora_int_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(_positive_int(i) for i in ids):
        raise ValueError(f"{path}: field 'lora_int_ids' must list positive ints.")
    return ids


def write_lora_int_ids(directory: Path, ids: Sequence[int]) -> None:
    """Writes [`LORA_INT_IDS_FILE`]: `ids`, every id the folder ever gave out."""
    record = {"format_version": SERVING_FORMAT_VERSION, "lora_int_ids": sorted(set(ids))}
    (directory / LORA_INT_IDS_FILE).write_text(json.dumps(record), encoding="utf-8")


def assign_lora_int_ids(entries: list[dict], previous: PreviousIds) -> None:
    """Sets each entry's `lora_int_id`: the user's earlier id while their weights (`sha256`) are unchanged, else a
    new id above every id ever given out in this folder (vLLM caches adapters by id: an id is never reused)."""
    next_id = max(previous.used, default=0) + 1
    for entry in entries:
        old = previous.by_user.get(entry["user_id"])
        if old is not None and old[1] == entry["sha256"]:
            entry["lora_int_id"] = old[0]
        else:
            entry["lora_int_id"], next_id = next_id, next_id + 1


# Optional string fields about the base model (absent from manifests of earlier releases): the local folder the
# adapters were trained on when `base_model_name_or_path` is its Hub id, and what a server should know about it.
BASE_MODEL_FIELDS = ("base_model_name_or_path", "base_model_local_path", "base_model_note")


def write_serving_manifest(
    directory: Path,
    entries: Sequence[dict[str, Any]],
    base_model: str | None,
    max_lora_rank: int,
    retired: Sequence[int] = (),
    *,
    base_model_local_path: str | None = None,
    base_model_note: str | None = None,
) -> dict[str, Any]:
    """Writes `serving_manifest.json`: `base_model_name_or_path` (what a server loads: the Hub id when one is
    known), `adapters` lists, in order, `user_id`, `lora_name`, `lora_int_id` (vLLM's cache key, see
    [`assign_lora_int_ids`]), `path` (relative to the export folder), `rank` and the weights' `sha256`;
    `retired_lora_int_ids` the ids earlier exports gave out that must not be reused. `base_model_local_path` (the
    local folder the adapters were trained on, when it is not `base_model_name_or_path`) and `base_model_note` are
    written only when given."""
    optional = {"base_model_local_path": base_model_local_path, "base_model_note": base_model_note}
    manifest = {
        "format_version": SERVING_FORMAT_VERSION,
        "library": "transformers_spring",
        "base_model_name_or_path": base_model,
        **{key: value for key, value in optional.items() if value is not None},
        "max_lora_rank": max_lora_rank,
        "adapters": list(entries),
        "retired_lora_int_ids": list(retired),
    }
    (directory / SERVING_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def read_serving_manifest(directory: str | os.PathLike, *, verify_weights: bool = True) -> dict[str, Any]:
    """The manifest of an export folder, cross-checked against the folder, with each adapter's `path` resolved to
    an absolute path inside it:

    - the file is at most [`~persistence.json_files.MAX_SERVING_MANIFEST_BYTES`] and not a symlink;
    - `base_model_name_or_path`, and `base_model_local_path` / `base_model_note` when present (manifests of earlier
      releases have neither), are strings (the first may be null);
    - `lora_int_id`s are unique positive ints, none of them retired; `lora_name`s and `user_id`s are unique;
    - one user per folder and one folder per user: paths stay inside the export folder and no two resolve to the
      same folder;
    - each folder's `adapter_model.safetensors` is a regular file whose sha256 is the entry's `sha256` (so the
      weights a server loads under an id are the ones exported under it).

    Args:
        directory (`str` or `os.PathLike`): the export folder.
        verify_weights (`bool`, *optional*, defaults to `True`): hash every adapter's weights against the manifest.

    Raises:
        `FileNotFoundError`: no manifest. `ValueError`: naming the file and the field that fails a check.
    """
    root = Path(directory)
    path = root / SERVING_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{SERVING_MANIFEST} not found in {root} (is this an export_for_serving folder?).")
    if path.is_symlink():
        raise ValueError(f"{path} is a symlink; it is not read.")
    manifest = read_json_capped(path, MAX_SERVING_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format_version") != SERVING_FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format_version' must be {SERVING_FORMAT_VERSION}.")
    for field in BASE_MODEL_FIELDS:
        if not isinstance(manifest.get(field), (str, type(None))):
            raise ValueError(f"{path}: field {field!r} must be a string.")
    adapters = manifest.get("adapters")
    retired = manifest.get("retired_lora_int_ids", [])
    if not isinstance(adapters, list):
        raise ValueError(f"{path}: field 'adapters' must be a list.")
    if not isinstance(retired, list) or not all(_positive_int(i) for i in retired):
        raise ValueError(f"{path}: field 'retired_lora_int_ids' must list positive ints.")
    seen: dict[str, set] = {"lora_int_id": set(retired), "lora_name": set(), "user_id": set()}
    folders: dict[Path, str] = {}
    for i, entry in enumerate(adapters):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"{path}: field 'adapters[{i}].path' must be a string.")
        if not _positive_int(entry.get("lora_int_id")):
            raise ValueError(f"{path}: field 'adapters[{i}].lora_int_id' must be a positive int.")
        for field in ("lora_name", "user_id"):
            if not isinstance(entry.get(field), str):
                raise ValueError(f"{path}: field 'adapters[{i}].{field}' must be a string.")
        for field, values in seen.items():
            if entry[field] in values:
                raise ValueError(f"{path}: field 'adapters[{i}].{field}' ({entry[field]!r}) repeats or was retired.")
            values.add(entry[field])
        resolved = (root / entry["path"]).resolve()
        if root.resolve() not in resolved.parents:
            raise ValueError(f"{path}: field 'adapters[{i}].path' ({entry['path']!r}) leaves the folder.")
        if resolved in folders:  # two users on one folder: one would be served the other's weights
            raise ValueError(
                f"{path}: field 'adapters[{i}].path' ({entry['path']!r}) is the folder of user "
                f"{folders[resolved]!r} too; each user needs their own folder."
            )
        folders[resolved] = entry["user_id"]
        if verify_weights:
            _verify_weights(path, i, entry, resolved)
        entry["path"] = str(resolved)
    return manifest


def _verify_weights(path: Path, i: int, entry: dict, folder: Path) -> None:
    """Checks that the adapter folder of `adapters[i]` holds the weights its recorded `sha256` names."""
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{path}: field 'adapters[{i}].sha256' must be a sha256 hex digest.")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_symlink() or not weights.is_file():
        raise ValueError(f"{path}: the weights of 'adapters[{i}]', {weights}, are missing or not a regular file.")
    if file_sha256(weights) != digest:
        raise ValueError(
            f"{path}: field 'adapters[{i}].sha256' does not match {weights}: the weights of user "
            f"{entry['user_id']!r} changed after the export."
        )


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks (adapter weights may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
