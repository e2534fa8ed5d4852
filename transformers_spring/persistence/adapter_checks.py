"""Checks a peft adapter folder the library did not write before any of it reaches a model: loading one must be as
safe as loading a safetensors file. peft itself applies whatever `adapter_config.json` says at load time: a
`layer_replication` rebuilds the base model's layers, `modules_to_save` replaces whole modules (an `lm_head`), a PiSSA
or OLoRA `init_lora_weights` rewrites base weights, `r = 2**24` allocates until memory runs out, and a missing
`adapter_model.safetensors` falls back to unpickling `adapter_model.bin`. Each of these changes the base model even
with adapters disabled, so [`check_adapter_folder`] refuses them from the config and the safetensors header, before
any allocation, and every load path (`SpringForCausalLM.from_pretrained`, `ContinualPersonalizer.from_pretrained`,
`add_user`, the adapter pool) calls it.

The rules (a refusal is a `ValueError` naming the file and the field):

- the folder and every file in it is a real folder / regular file (no symlink, except a Hub cache snapshot's own
  links into its blob store), and it holds no pickle weights (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`);
- `adapter_config.json` is at most [`MAX_ADAPTER_CONFIG_BYTES`] (1 MiB) of JSON; `peft_type` is `"LORA"` (others only
  when the caller opts in with `allow_peft_types`); `task_type` is unset or `"CAUSAL_LM"`;
- `r` (and every `rank_pattern` value) is an int with 1 ≤ r ≤ [`MAX_LORA_RANK`] (1024); `lora_alpha` (and every
  `alpha_pattern` value) a finite number with 0 < alpha ≤ [`MAX_LORA_ALPHA`] (1e4); `lora_dropout` in [0, 1];
- `bias == "none"`; `init_lora_weights` is `true`, `false` or a method that leaves the base weights alone (vLLM's
  list, `persistence.serving`); every other field outside [`_LORA_FIELDS`] is unset (null, false, empty): so no
  `modules_to_save`, `layer_replication`, `use_dora`, `lora_bias`, `trainable_token_indices`, `target_parameters`,
  `megatron_config`, nor any feature a newer peft adds;
- `target_modules` name Linear layers of the base model (when it is given) and, when the caller knows the expected
  targets, only those;
- `adapter_model.safetensors` holds only `base_model.model.<module>.lora_A.weight` / `lora_B.weight` pairs of floating
  tensors, of targeted Linear layers, shaped `[rank, in_features]` / `[out_features, rank]` with the rank peft gives
  that layer (`rank_pattern`'s, else `r`), and every value is finite.

These are the rules of `persistence.serving.vllm_lora_problems` (without its `max_lora_rank`), plus those about the
base model, which a serving export does not know.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from .json_files import MAX_ADAPTER_CONFIG_BYTES, read_json_capped
from .memory_files import allowed_root
from .safe_copy import UnsafeFolderError, check_tree, copy_tree
from .serving import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VLLM_INIT_WEIGHTS, VLLM_UNSUPPORTED

MAX_LORA_RANK = 1024
MAX_LORA_ALPHA = 1e4
# Weight files peft (or torch) would unpickle: refused whatever else the folder holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The LoRA config fields that may hold a value; every other field must be unset (null, false or empty), so that a
# feature a newer peft adds is refused until it is reviewed here.
_LORA_FIELDS = frozenset(
    {
        "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "auto_mapping",
        "inference_mode", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "lora_dropout", "target_modules",
        "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "use_rslora", "bias",
        "init_lora_weights", "megatron_core", "qalora_group_size",
    }
)  # fmt: skip
# Fields refused for every peft type (the LoRA ones above are covered by `_LORA_FIELDS`).
_NEVER = ("modules_to_save", "layer_replication", "use_dora", "trainable_token_indices", *VLLM_UNSUPPORTED)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_WEIGHT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")


def adapter_tree(folder: str | os.PathLike, *, what: str = "adapter folder") -> list[Path]:
    """The regular files under `folder` (relative paths), after checking that nothing in it is a symlink: as
    [`~persistence.safe_copy.check_tree`], except that in a Hub cache snapshot a file may be the cache's own link
    into the repo's `blobs/` folder.

    Args:
        folder (`str` or `os.PathLike`): the folder.
        what (`str`, *optional*): what the folder is, for error messages.

    Raises:
        [`~persistence.safe_copy.UnsafeFolderError`] (a `ValueError`): naming the offending path.
    """
    root = Path(folder)
    blobs = _hub_blobs(root)
    if blobs is None:
        return check_tree(root, what=what)
    if root.is_symlink() or not root.is_dir():
        raise UnsafeFolderError(f"{what} {root} is a symlink or not a folder; it is not read.")
    files = []
    for path in sorted(root.rglob("*")):  # rglob does not descend into symlinked folders: they are refused below
        if path.is_symlink():
            real = path.resolve()
            # The Hub's blob store is flat: a link may only name a file directly in it.
            if real.parent != blobs or not real.is_file():
                raise UnsafeFolderError(f"{what} holds {path}, which links out of the Hub cache or not to a file.")
            files.append(path.relative_to(root))
        elif path.is_file():
            files.append(path.relative_to(root))
        elif not path.is_dir():
            raise UnsafeFolderError(f"{what} holds {path}, which is neither a file nor a folder.")
    return files


def copy_adapter_folder(source: str | os.PathLike, target: str | os.PathLike, *, what: str = "adapter folder") -> Path:
    """Copies `source` to `target` after [`adapter_tree`]: regular files only, byte for byte (a Hub cache snapshot's
    blob links are copied as the files they point to). Arguments and return value are
    [`~persistence.safe_copy.copy_tree`]'s.
    """
    if _hub_blobs(Path(source)) is None:
        return copy_tree(source, target, what=what)
    # A Hub snapshot: `copyfile` follows its blob links, which `adapter_tree` checked name files of the blob store.
    for relative in adapter_tree(source, what=what):
        os.makedirs(Path(target, relative).parent, exist_ok=True)
        shutil.copyfile(Path(source, relative), Path(target, relative))
    return Path(target)


def check_adapter_folder(
    folder: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    allowed_targets: Sequence[str] | str | None = None,
    allow_peft_types: Sequence[str] = ("LORA",),
    max_rank: int = MAX_LORA_RANK,
    check_values: bool = True,
    where: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Checks the peft adapter folder `folder` against the rules of this module before it is loaded.

    Args:
        folder (`str` or `os.PathLike`): the adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
        base_model (`nn.Module`, *optional*): the model it will be loaded into (a plain model or a `PeftModel`):
            targets and tensor shapes are then checked against its layers.
        allowed_targets (`Sequence[str]` or `str`, *optional*): the `target_modules` the caller expects (e.g. its
            `lora_target_modules`); the config's must be among them.
        allow_peft_types (`Sequence[str]`, *optional*, defaults to `("LORA",)`): the accepted `peft_type`s. For a
            type other than LoRA only the rules that do not depend on LoRA's layout are checked.
        max_rank (`int`, *optional*, defaults to 1024): the largest accepted rank.
        check_values (`bool`, *optional*, defaults to `True`): also read every tensor and refuse NaN or infinity.
        where (`str` or `os.PathLike`, *optional*): the path to name in error messages instead of `folder` (the
            user's folder when `folder` is a private copy of it).

    Returns:
        `dict`: the parsed `adapter_config.json`.

    Raises:
        `ValueError`: naming the file and the field.
    """
    folder = Path(folder)
    shown = Path(where) if where is not None else folder
    files = adapter_tree(folder, what=f"the adapter folder {shown}")
    pickled = [f for f in files if f.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ValueError(f"{shown / pickled[0]}: pickle weights are never loaded; save the adapter as safetensors.")
    config = _read_config(folder / ADAPTER_CONFIG, shown / ADAPTER_CONFIG)
    where_config = shown / ADAPTER_CONFIG
    peft_type = config.get("peft_type")
    if peft_type not in tuple(allow_peft_types):
        raise ValueError(f"{where_config}: field 'peft_type' is {peft_type!r}; accepted: {tuple(allow_peft_types)}.")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where_config}: field 'task_type' is {config.get('task_type')!r}; expected 'CAUSAL_LM'.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where_config}: field 'bias' is {config.get('bias')!r}; only 'none' is loaded.")
    lora = peft_type == "LORA"
    for field, value in config.items():
        if (field in _NEVER or (lora and field not in _LORA_FIELDS)) and value not in (None, False, {}, [], ""):
            raise ValueError(f"{where_config}: field {field!r} is set ({value!r}); it is refused on load.")
    rank_of = _check_lora_fields(config, where_config, max_rank) if lora else None
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or _str_list(targets)) or not targets:
        raise ValueError(f"{where_config}: field 'target_modules' must be a module name list or a regex string.")
    if allowed_targets is not None and not _within(targets, allowed_targets):
        raise ValueError(
            f"{where_config}: field 'target_modules' is {targets!r}; this model's adapters target {allowed_targets!r}."
        )
    layers = _linear_layers(base_model) if base_model is not None else None
    if layers is not None:
        _check_targets_exist(targets, layers, where_config)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{shown / ADAPTER_WEIGHTS} is missing (adapters load from safetensors only).")
    _check_weights(weights, shown / ADAPTER_WEIGHTS, targets, rank_of, layers, check_values)
    return config


def _hub_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder of the Hub cache repo whose snapshot holds `folder`, or None outside a Hub cache."""
    root = allowed_root(folder.absolute())
    return root / "blobs" if root != folder.resolve() else None


def _read_config(path: Path, shown: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{shown} is missing (not a peft adapter folder).")
    config = read_json_capped(path, MAX_ADAPTER_CONFIG_BYTES, what=str(shown))
    if not isinstance(config, dict):
        raise ValueError(f"{shown} must hold a JSON object.")
    return config


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_lora_fields(config: dict, where: Path, max_rank: int) -> Callable[[str], int]:
    """Checks the LoRA hyper-parameters; returns the rank peft gives a module (`rank_pattern`'s, else `r`)."""
    ranks, alphas = {"r": config.get("r")}, {"lora_alpha": config.get("lora_alpha")}
    for field, values in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{where}: field {field!r} must be an object.")
        values.update({f"{field}[{key!r}]": value for key, value in pattern.items()})
    for field, r in ranks.items():
        if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= max_rank):
            raise ValueError(f"{where}: field {field} is {r!r}; it must be an int from 1 to {max_rank}.")
    for field, alpha in alphas.items():
        if not (_number(alpha) and 0 < alpha <= MAX_LORA_ALPHA):
            raise ValueError(f"{where}: field {field} is {alpha!r}; it must be a number in (0, {MAX_LORA_ALPHA:g}].")
    dropout = config.get("lora_dropout", 0.0)
    if not (_number(dropout) and 0 <= dropout <= 1):
        raise ValueError(f"{where}: field 'lora_dropout' is {dropout!r}; it must be a number in [0, 1].")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in VLLM_INIT_WEIGHTS:
        raise ValueError(
            f"{where}: field 'init_lora_weights' is {init!r}; accepted: true, false, {VLLM_INIT_WEIGHTS} (the others "
            "rewrite the base model's weights)."
        )
    for field in ("fan_in_fan_out", "use_rslora", "inference_mode"):
        if not isinstance(config.get(field, False), bool):
            raise ValueError(f"{where}: field {field!r} must be a boolean.")
    from peft.utils.other import get_pattern_key

    pattern = config.get("rank_pattern") or {}
    return lambda module: pattern.get(get_pattern_key(pattern.keys(), module), config["r"])


def _within(targets: list[str] | str, allowed: Sequence[str] | str) -> bool:
    if allowed == "all-linear":  # peft saves the expanded list; each name is checked to be a Linear layer anyway
        return True
    if isinstance(targets, str) or isinstance(allowed, str):
        return targets == allowed
    return set(targets) <= set(allowed)


def _linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name (as peft sees it in the base model) → `(in_features, out_features)` of every Linear-like layer,
    LoRA-wrapped ones included."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    layers = {}
    for name, module in base.named_modules():
        if any(part.startswith("lora_") or part == "base_layer" for part in name.split(".")):
            continue
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, nn.Linear):
            layers[name] = (layer.in_features, layer.out_features)
        elif type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None:
            layers[name] = tuple(layer.weight.shape)  # GPT-2's Conv1D stores its weight as (in, out)
    return layers


def _targeted(name: str, targets: list[str] | str) -> bool:
    """Whether peft's `target_modules` matching selects module `name`."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets_exist(targets: list[str] | str, layers: dict, where: Path) -> None:
    # Each name of a list must match a layer (peft only needs one of them to): a name matching nothing is a typo or
    # a config written for another model.
    patterns = {targets: targets} if isinstance(targets, str) else {target: [target] for target in targets}
    try:
        missing = [shown for shown, p in patterns.items() if not any(_targeted(name, p) for name in layers)]
    except re.error as err:
        raise ValueError(f"{where}: field 'target_modules' is not a valid regex: {err}") from None
    if missing:
        raise ValueError(f"{where}: field 'target_modules' names {missing!r}: no Linear layer of the model.")


def _check_weights(
    path: Path,
    shown: Path,
    targets: list[str] | str,
    rank_of: Callable[[str], int] | None,
    layers: dict | None,
    check_values: bool,
) -> None:
    """Checks the safetensors header (keys, dtypes, shapes) before reading any tensor, then the values."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            pairs: dict[str, dict[str, list[int]]] = {}
            for key in handle.keys():
                tensor = handle.get_slice(key)
                shape, dtype = list(tensor.get_shape()), tensor.get_dtype()
                if dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{shown}: tensor {key!r} has dtype {dtype}; adapters hold floating weights.")
                if rank_of is None:
                    continue  # a non-LoRA type the caller opted into: only dtypes and values are checked
                match = _WEIGHT_KEY.fullmatch(key)
                if match is None or len(shape) != 2:
                    raise ValueError(f"{shown}: tensor {key!r} is not a 2-D lora_A / lora_B weight; it is refused.")
                module = match["module"]
                if not _targeted(module, targets) or (layers is not None and module not in layers):
                    raise ValueError(f"{shown}: tensor {key!r} adapts {module!r}, no targeted Linear layer.")
                pairs.setdefault(module, {})[match["side"]] = shape
            for module, sides in pairs.items():
                _check_pair(shown, module, sides, rank_of(module), layers)
            if check_values:
                for key in handle.keys():
                    if not bool(torch.isfinite(handle.get_tensor(key)).all()):
                        raise ValueError(f"{shown}: tensor {key!r} holds NaN or infinite values.")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{shown} cannot be read as safetensors: {err}") from None


def _check_pair(shown: Path, module: str, sides: dict, rank: int, layers: dict | None) -> None:
    """lora_A is `[rank, in_features]` and lora_B `[out_features, rank]`, with the module's configured rank."""
    if set(sides) != {"A", "B"}:
        raise ValueError(f"{shown}: the weights of {module!r} lack their lora_A or lora_B half.")
    (rank_a, in_features), (out_features, rank_b) = sides["A"], sides["B"]
    expected = layers[module] if layers is not None else (in_features, out_features)
    if not rank_a == rank_b == rank or (in_features, out_features) != expected:
        raise ValueError(
            f"{shown}: the lora_A / lora_B shapes of {module!r} ({sides['A']}, {sides['B']}) do not match the field "
            f"'r' (or 'rank_pattern'), {rank}, and the layer's (in, out) = {expected}."
        )
