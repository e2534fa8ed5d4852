"""
Every use of a transformers or peft internal, in one place.

The rest of the package talks to models through public calls (`model(...)`, `generate()`, peft's `PeftModel`) and
through the helpers below. Each helper says in one line which versions need it, so a rename upstream is mended here
once. CI runs the test suite on the newest releases and on the lower bounds of `setup.cfg`
(`.ci/lower-bounds.txt`).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from packaging import version
from transformers import GenerationConfig

from .modeling import pad_token_id, unwrap_model

TRANSFORMERS_VERSION = version.parse(transformers.__version__)

# transformers 5.24 renamed the forward's `past_key_values=` to `cache=` (the old name is deprecated, removal
# announced for 5.40) and outputs carry `.cache`. Both names are supported; the model's own signature decides.
CACHE_KWARG_NAMES = ("cache", "past_key_values")
_CACHE_RENAME_VERSION = version.parse("5.24.0")


# ------------------------------------------------------------------------------------------------- forward signature
@functools.lru_cache(maxsize=256)
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """The named parameters of the (peft-unwrapped) model's `forward`, cached per class."""
    return _forward_parameters(type(unwrap_model(model)))


def cache_kwarg_name(model: nn.Module) -> str:
    """The keyword the model's `forward` takes its KV cache under: `cache` (transformers >= 5.24) or
    `past_key_values` (< 5.24), read from the signature. A forward that names neither (remote code with `**kwargs`)
    gets the installed version's name."""
    params = forward_parameters(model)
    for name in CACHE_KWARG_NAMES:
        if name in params:
            return name
    return "cache" if TRANSFORMERS_VERSION >= _CACHE_RENAME_VERSION else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name the model's `forward` expects (see [`cache_kwarg_name`])."""
    return {cache_kwarg_name(model): cache}


def output_cache(outputs: Any) -> Any:
    """The KV cache of a model output: `.cache` (>= 5.24) or `.past_key_values` (< 5.24). Read by key, since the
    5.24 `past_key_values` property logs a deprecation."""
    getter = getattr(outputs, "get", None)
    if getter is None:
        return None
    for name in CACHE_KWARG_NAMES:
        value = getter(name)
        if value is not None:
            return value
    return None


def pop_cache(model_kwargs: dict[str, Any]) -> Any:
    """Removes and returns the cache that `generate()` prepared: `model_kwargs["cache"]` (>= 5.24) or
    `model_kwargs["past_key_values"]` (< 5.24)."""
    found = None
    for name in CACHE_KWARG_NAMES:
        value = model_kwargs.pop(name, None)
        found = found if found is not None else value
    return found


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers >= 4.50 causal LMs): the LM head then runs
    on the kept positions only."""
    return "logits_to_keep" in forward_parameters(model)


def supports_logits_to_keep_mask(model: nn.Module) -> bool:
    """Whether `logits_to_keep` also takes a 2-D boolean `(batch, seq)` mask, returning the kept positions flattened
    (`modeling_utils.slice_logits_to_keep`, newer 5.x; 5.0 indexes `hidden_states[:, mask, :]` and fails)."""
    from transformers import modeling_utils

    return supports_logits_to_keep(model) and hasattr(modeling_utils, "slice_logits_to_keep")


# ------------------------------------------------------------------------------------------------------ KV cache rows
def is_stackable_cache(cache: Any) -> bool:
    """Whether `cache` is a `DynamicCache` of full-attention `DynamicLayer`s only, the one layout whose per-layer
    keys/values can be padded, stacked and repeated along the batch (transformers >= 4.56 layered caches).
    Sliding-window, static, quantized, linear-attention (hybrid) and legacy tuple caches are not."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return type(cache) is DynamicCache and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def has_unstackable_layers(model: nn.Module) -> bool:
    """Whether the model's config declares attention layers other than full attention (`config.layer_types`, e.g.
    Gemma 3's "sliding_attention", transformers >= 4.54): their caches cannot be stacked, whatever the cache
    object looks like before the first forward (5.0 creates the layers lazily)."""
    config = getattr(unwrap_model(model), "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    layer_types = getattr(config, "layer_types", None) or ()
    return any(kind != "full_attention" for kind in layer_types)


def stack_cache_rows(main: Any, other: Any, width: int) -> Any | None:
    """Stacks two stackable caches along the batch, `main` first, left-padding each layer to `width` positions with
    zeros (masked positions). Returns `main` extended in place, or None when either cannot be stacked (transformers
    >= 4.56: `layer.keys` / `layer.values` / `layer.is_initialized`)."""
    if not (is_stackable_cache(main) and is_stackable_cache(other)) or len(main.layers) != len(other.layers):
        return None
    if not all(layer.is_initialized for layer in (*main.layers, *other.layers)):
        return None
    for layer, extra in zip(main.layers, other.layers, strict=True):
        layer.keys = torch.cat([_left_pad_kv(layer.keys, width), _left_pad_kv(extra.keys, width)], dim=0)
        layer.values = torch.cat([_left_pad_kv(layer.values, width), _left_pad_kv(extra.values, width)], dim=0)
    return main


def _left_pad_kv(states: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, heads, length, dim) -> (batch, heads, width, dim) with zeros on the left."""
    missing = width - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing > 0 else states


def select_cache_rows(cache: Any, index: torch.Tensor) -> None:
    """Keeps the batch rows `index` of `cache`, in place (`Cache.batch_select_indices`, transformers >= 4.42)."""
    cache.batch_select_indices(index)


def repeat_cache_rows(cache: Any, repeats: int) -> Any:
    """A copy of a one-row `cache` repeated `repeats` times along the batch (`Cache.batch_repeat_interleave`,
    transformers >= 4.42); the copy keeps the forward from appending to the original."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(repeats)
    return cache


# ------------------------------------------------------------------------------------------------------- generate()
def pad_token_tensor(generation_config: GenerationConfig, device: torch.device) -> torch.Tensor | None:
    """The pad id as a tensor, as `generate()` prepared it (`GenerationConfig._pad_token_tensor`, transformers
    >= 4.41); falls back to the public `pad_token_id`, then the first EOS."""
    tensor = getattr(generation_config, "_pad_token_tensor", None)
    if tensor is None:
        value = pad_token_id(generation_config.pad_token_id, generation_config.eos_token_id)
        tensor = None if value is None else torch.tensor(value)
    return None if tensor is None else tensor.to(device)


def merged_generation_config(model: nn.Module, kwargs: dict[str, Any]) -> GenerationConfig:
    """The `GenerationConfig` a `generate(**kwargs)` call decodes with: the call's `generation_config` (or the
    model's), updated with the kwargs that are generation settings, as `generate()`'s private
    `_prepare_generation_config` does (all 5.x)."""
    base = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config" and hasattr(config, k)})
    return config


def needs_synced_gpus(model: nn.Module, synced_gpus: bool | None) -> bool:
    """`synced_gpus` as `generate()` resolves it (all 5.x): unset means on under DeepSpeed ZeRO-3 or FSDP with more
    than one process."""
    if synced_gpus is not None:
        return bool(synced_gpus)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    return is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model)


def sample_loop(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config: GenerationConfig,
    streamer=None,
    **model_kwargs,
):
    """`generate()`'s own greedy/sampling loop (`GenerationMixin._sample`, all 5.x), for a `custom_generate` callable
    that hands a request back to the standard decoding with the inputs `generate()` prepared."""
    from transformers.generation.utils import GenerationMixin

    loop = getattr(type(model), "_sample", GenerationMixin._sample)
    return loop(
        model,
        input_ids,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        generation_config=generation_config,
        synced_gpus=False,
        streamer=streamer,
        **model_kwargs,
    )


# ---------------------------------------------------------------------------------------------- masks and positions
def none_if_full(mask: torch.Tensor) -> torch.Tensor | None:
    """`generate()` drops an all-ones mask (transformers >= 4.53, the fastest attention path); doing the same keeps
    results bit-identical."""
    return None if bool((mask == 1).all()) else mask


def left_padded_positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids for a left-padded batch, as `generate()` builds them (padding gets position 0; all 5.x)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


# ------------------------------------------------------------------------------------------- sentence-transformers
def embedding_dimension(model: Any) -> int | None:
    """A SentenceTransformer's output dimension: `get_embedding_dimension()` (sentence-transformers >= 5.4) or
    `get_sentence_embedding_dimension()` (older); None for an object with neither."""
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        method = getattr(model, name, None)
        if callable(method):
            return int(method())
    return None


# --------------------------------------------------------------------------------------------------- peft internals
def _lora_layer_classes() -> tuple[type, ...]:
    """peft's LoRA layer classes and its `modules_to_save` wrapper, which both take `adapter_names=` in their forward
    (peft >= 0.10; `AuxiliaryTrainingWrapper` since 0.15)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but keep generation usable without it
        return ()
    classes: list[type] = [LoraLayer]
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper

        classes.append(AuxiliaryTrainingWrapper)
    except ImportError:
        pass
    return tuple(classes)


def find_adapter_layers(model: nn.Module) -> tuple[list[nn.Module], set[str]]:
    """The modules that accept `adapter_names=` and the adapter names found in LoRA layers (peft's `lora_A` /
    `lora_embedding_A` module dicts, all supported peft versions)."""
    classes = _lora_layer_classes()
    if not classes:
        return [], set()
    layers, names = [], set()
    for module in model.modules():
        if isinstance(module, classes):
            layers.append(module)
            for attr in ("lora_A", "lora_embedding_A"):
                names |= set(getattr(module, attr, {}).keys())
    return layers, names


def _lora_linear_class() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


class _HookPair:
    """Two hook handles removed together (the handle [`add_adapter_names_hook`] returns)."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batched_lora_applies(layer: nn.Module, names: Sequence[str], x: Any) -> bool:
    """Whether [`add_adapter_names_hook`] may add `layer`'s per-row LoRA deltas itself: a peft LoRA `Linear` whose
    routed adapters are all vanilla LoRA (no DoRA or other variant, no `lora_bias`, no active dropout), adapters
    enabled and unmerged, and one name per row of `x`. Anything else goes through peft's own mixed-batch forward."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != len(names) or torch.is_grad_enabled():
        return False  # (the stacked weights are detached copies: inference only)
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return False
    variants, biases = getattr(layer, "lora_variant", {}), getattr(layer, "lora_bias", {})
    for name in set(names):
        if name not in layer.lora_A:
            continue
        if name in variants or biases.get(name, False):
            return False
        dropout = layer.lora_dropout[name]
        if layer.training and getattr(dropout, "p", 0.0) > 0:
            return False
    return True


def add_adapter_names_hook(layer: nn.Module, names_getter) -> Any:
    """Routes each row of a LoRA layer's input to its own adapter (`names_getter()`: one adapter name per row, or None
    for no routing), as peft's `adapter_names=` keyword does (peft >= 0.10, what `PeftModel.generate(adapter_names=)`
    injects). Returns a handle whose `remove()` undoes it.

    peft's mixed-batch forward loops over the batch's distinct adapters, a few small matmuls each; with one adapter
    per row (the server's batches) that loop cost a third of a decoding step on CPU (`benchmarks/bench_serve.py`).
    So for a plain LoRA `Linear` the layer runs its base weights only (every row routed to `"__base__"`) and the
    per-row deltas `B_i(A_i x_i) * scaling_i` are added by two batched matmuls over the adapters' weights stacked once
    per routing: the same products as peft's, by another kernel (equal to float rounding, tested against peft's
    forward). Other layers and adapter kinds, and any forward that records gradients, go through peft.
    """
    linear = _lora_linear_class()
    state: dict[str, Any] = {"pending": None, "stacks": {}}

    def pre_hook(module, args, kwargs):
        names = names_getter()
        state["pending"] = None
        if names is None:
            return args, kwargs
        x = args[0] if args else kwargs.get("x")
        if linear is not None and isinstance(module, linear) and _batched_lora_applies(module, names, x):
            kwargs["adapter_names"] = ["__base__"] * len(names)
            state["pending"] = (list(names), x)
        else:
            kwargs["adapter_names"] = names
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        pending, state["pending"] = state["pending"], None
        if pending is None:
            return output
        names, x = pending
        present = sorted({name for name in names if name in module.lora_A})
        if not present:
            return output
        key = tuple(present)
        stacks = state["stacks"].get(key)
        if stacks is None:  # the adapters' weights, stacked once per routing (zero-padded to the largest rank)
            rank = max(module.lora_A[name].weight.shape[0] for name in present)
            a0 = module.lora_A[present[0]].weight
            b0 = module.lora_B[present[0]].weight
            a = a0.new_zeros((len(present) + 1, rank, a0.shape[1]))  # the last slot: rows without an adapter
            b = b0.new_zeros((len(present) + 1, b0.shape[0], rank))
            scaling = torch.zeros(len(present) + 1, dtype=torch.float32, device=a0.device)
            for i, name in enumerate(present):
                r = module.lora_A[name].weight.shape[0]
                a[i, :r] = module.lora_A[name].weight.detach()
                b[i, :, :r] = module.lora_B[name].weight.detach()
                scaling[i] = float(module.scaling[name])
            stacks = state["stacks"][key] = (a, b, scaling, {name: i for i, name in enumerate(present)})
        a, b, scaling, index = stacks
        rows = torch.tensor([index.get(name, len(present)) for name in names], device=a.device)
        flat = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a[rows].transpose(1, 2)), b[rows].transpose(1, 2))
        # peft multiplies by a Python float: at float32 precision, whatever the weights' dtype.
        delta = (delta.float() * scaling[rows].view(-1, 1, 1)).to(delta.dtype)
        return output + delta.reshape(*output.shape[:-1], delta.shape[-1]).to(output.dtype)

    return _HookPair(
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        layer.register_forward_hook(post_hook, with_kwargs=True),
    )


def active_adapter_of(layers: Sequence[nn.Module], adapters: set[str], base_name: str) -> str | None:
    """The adapter a LoRA layer applies now: the single active one, `base_name` when adapters are disabled or none
    is active, or None when several are (peft's `LoraLayer.active_adapters` / `disable_adapters`, peft >= 0.7)."""
    layer = next((layer for layer in layers if hasattr(layer, "active_adapters")), None)
    if layer is None or getattr(layer, "disable_adapters", False):
        return base_name
    active = [name for name in layer.active_adapters if name in adapters]
    if not active:
        return base_name
    return active[0] if len(active) == 1 else None


def is_lora_parameter_of(param_name: str, names: Sequence[str]) -> bool:
    """Whether a parameter is a LoRA weight of one of the adapters `names`: peft names them
    `...q_proj.lora_A.<adapter>.weight` (all supported peft versions)."""
    parts = param_name.split(".")
    return any(part.startswith("lora_") and parts[i + 1] in names for i, part in enumerate(parts[:-1]))


def erase_adapter(model: nn.Module, name: str) -> bool:
    """Removes adapter `name` from a peft model; returns whether it is gone. peft cannot delete a model's only
    adapter: that one is kept with every LoRA weight zeroed (nothing learned from its user survives, and it adds
    nothing to the base model), and False is returned."""
    names = list(getattr(model, "peft_config", {}) or {})
    if name not in names:
        return True
    if len(names) > 1:
        if getattr(model, "active_adapter", None) == name:  # peft warns when the active adapter is deleted
            model.set_adapter(next(other for other in names if other != name))
        model.delete_adapter(name)
        return True
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            # A and B only: zero B alone already makes the LoRA delta zero, and a DoRA magnitude vector set to zero
            # would zero the layer's output instead of restoring the base weight.
            if is_lora_parameter_of(param_name, [name]) and ("lora_A" in param_name or "lora_B" in param_name or
                                                             "lora_embedding" in param_name):  # fmt: skip
                param.zero_()
    return False


def set_adapter_trainable(model: nn.Module, name: str) -> None:
    """Makes `name` the single active adapter with only its weights trainable: `set_adapter` unfreezes it (even one
    loaded with `is_trainable=False`), and its config's `inference_mode` must follow (peft >= 0.7)."""
    model.set_adapter(name)
    model.peft_config[name].inference_mode = False


def response_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: torch.Tensor,
    use_logits_to_keep: bool | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Logits at the positions `keep` (a `(batch, seq)` bool mask over `input_ids`), flattened row-major to
    `(keep.sum(), vocab)`.

    When the model takes `logits_to_keep` (transformers v5 causal LMs), only those positions go through the LM head,
    which saves most of the head's cost (the vocabulary projection) on the prompt tokens. `model_kwargs` go to the
    forward (e.g. the KV cache, in which case `attention_mask` also covers the cached positions).
    """
    if use_logits_to_keep is None:
        use_logits_to_keep = supports_logits_to_keep_mask(model)
    if use_logits_to_keep:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **model_kwargs).logits
        if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        if logits.shape[:2] == keep.shape:  # the model ignored the mask
            return logits[keep]
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)} for a keep mask of {tuple(keep.shape)}.")
    return model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[keep]


def accelerate_state_initialized() -> bool:
    """Whether accelerate's process state was already set up in this process (a `TrainingArguments` or
    `Accelerator` was built), read without setting it up. (`PartialState._shared_state`, accelerate >= 0.20.)"""
    from accelerate.state import PartialState

    return bool(getattr(PartialState, "_shared_state", {}))


def parser_action(parser: Any, dest: str) -> Any:
    """The `argparse.Action` that fills `dest` (argparse keeps them in the private `_actions` list, in every Python
    version this package supports; `HfArgumentParser` builds them from a dataclass, so there is no public handle)."""
    for action in parser._actions:
        if action.dest == dest:
            return action
    raise KeyError(f"the parser has no argument for {dest!r}.")
