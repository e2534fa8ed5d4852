"""Per-user LoRA adapters: target detection, configuration, deterministic creation and weight snapshots."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from ..generation.adapters import adapter_name_for  # noqa: F401 (re-exported: `training.adapter_name_for`)
from ..utils.compat import is_lora_parameter_of, set_adapter_trainable
from ..utils.modeling import is_peft_model

logger = logging.get_logger(__name__)

# The attention query and value projections (the paper's LoRA targets), by the module names architectures use, most
# specific first. Fused QKV projections are adapted whole: LoRA cannot target part of a Linear's output.
_QUERY_VALUE_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, Phi, OPT, SmolLM, ...
    ("query", "value"),  # BERT-style attention
    ("q", "v"),  # T5
    ("c_attn",),  # GPT-2 (fused QKV Conv1D)
    ("query_key_value",),  # GPT-NeoX, Falcon, Bloom
    ("qkv_proj",),  # Phi-3
    ("Wqkv",),  # MPT, ModernBERT
    ("W_pack",),  # Baichuan
    ("c_attn", "q_attn"),
)


def _leaf_names(model: nn.Module) -> dict[str, list[str]]:
    """Last name component -> full names of the Linear-like modules (Linear, GPT-2 Conv1D, LoRA-wrapped layers)."""
    names: dict[str, list[str]] = {}
    for full_name, module in model.named_modules():
        if not full_name or "lora_" in full_name:
            continue
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear")
        if is_linear or hasattr(module, "base_layer"):
            names.setdefault(full_name.rsplit(".", 1)[-1], []).append(full_name)
    return names


def find_lora_target_modules(model: nn.Module) -> list[str] | str:
    """The attention query and value projections of `model`, as LoRA `target_modules`.

    The paper adapts the query and value projections. This looks for the module names architectures give them
    (`q_proj`/`v_proj` for Llama, Qwen2, Mistral, Gemma…; `c_attn` for GPT-2, whose fused QKV projection is adapted
    whole; `query_key_value` for GPT-NeoX, Falcon, Bloom…). In a multimodal model with a `language_model`, only the
    language model's projections are targeted (vision towers often reuse the same names).

    Args:
        model (`nn.Module`): a transformers model (or a `PeftModel` around one).

    Returns:
        `list[str]` of module names, or a regex `str` restricted to the language model.

    Raises:
        `ValueError` naming `lora_target_modules` when no known projection name is found.
    """
    leaves = _leaf_names(model)
    for candidate in _QUERY_VALUE_CANDIDATES:
        if all(name in leaves for name in candidate):
            full = [path for name in candidate for path in leaves[name]]
            in_lm = [path for path in full if "language_model" in path.split(".")]
            if in_lm and len(in_lm) < len(full):
                return rf".*language_model.*\.({'|'.join(candidate)})$"
            return list(candidate)
    sample = sorted(leaves)[:20]
    raise ValueError(
        f"Could not detect the attention query/value projections of {type(model).__name__} (looked for "
        f"{[list(c) for c in _QUERY_VALUE_CANDIDATES]}); set `lora_target_modules` explicitly. Linear-like module "
        f"names found: {sample}."
    )


def build_lora_config(args: Any, model: nn.Module):
    """The `peft.LoraConfig` of a [`SpringTrainingArguments`] for `model` (bias none, causal-LM task)."""
    from peft import LoraConfig

    targets = args.lora_target_modules if args.lora_target_modules is not None else find_lora_target_modules(model)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_seed(seed: int, name: str) -> int:
    """A per-adapter seed, so a user's initial LoRA weights do not depend on which users were created before."""
    digest = hashlib.sha256(f"{seed}\x1f{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters a `PeftModel` holds (empty for anything else)."""
    return list(getattr(model, "peft_config", {}) or {}) if is_peft_model(model) else []


def create_adapter(model: nn.Module, name: str, lora_config: Any, seed: int) -> nn.Module:
    """Adds a fresh LoRA adapter `name` (wrapping `model` with peft when it is not a `PeftModel` yet). Its random
    initialisation runs under a private RNG seeded from `(seed, name)`: the caller's RNG is untouched and the result
    does not depend on the order users arrive in.

    Returns:
        The `PeftModel` (the same object when `model` already was one).
    """
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed(seed, name))
        if is_peft_model(model):
            model.add_adapter(name, lora_config)
        else:
            model = get_peft_model(model, lora_config, adapter_name=name)
    return model


def activate_adapter(model: nn.Module, name: str) -> None:
    """Makes `name` the single active adapter and its weights (only its weights) trainable: peft's `set_adapter`
    unfreezes the active adapter (even one loaded with `is_trainable=False`) and freezes the others."""
    set_adapter_trainable(model, name)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A detached copy of adapter `name`'s weights (LoRA A/B of every targeted layer), keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_parameter_of(n, [name])}


@torch.no_grad()
def restore_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Writes a snapshot from [`adapter_state`] back into the model (in place)."""
    params = dict(model.named_parameters())
    for param_name, value in state.items():
        params[param_name].copy_(value)


@torch.no_grad()
def copy_adapter_weights(model: nn.Module, source: str, target: str) -> int:
    """Copies adapter `source`'s LoRA weights into adapter `target` (same rank and targets), in place: how a user's
    new adapter starts from their community's instead of from peft's initialisation. Returns how many tensors were
    copied.

    Raises:
        `ValueError`: the adapters do not have the same layers and shapes.
    """
    params = dict(model.named_parameters())
    pairs = []
    for param_name, value in params.items():
        if not is_lora_parameter_of(param_name, [source]):
            continue
        twin = param_name.replace(f".{source}.", f".{target}.")
        if twin not in params or params[twin].shape != value.shape:
            raise ValueError(
                f"adapters {source!r} and {target!r} differ at {param_name!r}: they cannot share weights."
            )
        pairs.append((params[twin], value))
    if not pairs:
        raise ValueError(f"adapter {source!r} has no LoRA weights in the model.")
    for twin, value in pairs:  # (every pair checked first: a refusal leaves `target` as it was)
        twin.copy_(value)
    return len(pairs)
