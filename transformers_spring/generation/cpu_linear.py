"""Skinny matrix products on CPU: `nn.Linear` on a handful of rows computed as `W · xᵀ`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..utils.validation import check_int

# Above this many rows the default kernel is as fast (measured on a 2-core AVX-512 CPU with SmolLM2-135M).
DEFAULT_MAX_ROWS = 8


def _skinny_forward(module: nn.Linear, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() > 1 and x.shape[-1] else 0
        if not 1 < rows <= max_rows:
            return nn.Linear.forward(module, x)
        # `x @ Wᵀ` with 2–8 rows takes MKL's general GEMM path, ~1.5x the time of one row; `W @ xᵀ` keeps the
        # weight as the streamed left operand, so a decoding step on a few rows costs about what one row costs.
        out = torch.matmul(module.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if module.bias is not None:
            out = out + module.bias
        return out.reshape(*x.shape[:-1], module.out_features)

    forward.spring_skinny = True
    return forward


def _eligible(module: nn.Module) -> bool:
    # Exactly nn.Linear: quantized subclasses (bitsandbytes, torchao) have their own kernels. An instance-level
    # `forward` means someone else (accelerate's offload hooks) already wraps this module: leave it alone.
    return (
        type(module) is nn.Linear
        and "forward" not in module.__dict__
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )


@contextmanager
def skinny_cpu_linear(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[int]:
    r"""
    Within the context, every fp32 `nn.Linear` of `model` that lives on the CPU computes inputs of 2 to `max_rows`
    rows (batch × sequence) as `W · xᵀ` instead of `x · Wᵀ`. Decoding a few rows per step on CPU is bound by reading
    the weights; PyTorch's default kernel for such skinny inputs is much slower than for one row, the transposed
    product is not. One row (plain batch-1 decoding) and prefill (many rows) keep the default kernel.

    Results equal the default kernel's up to floating-point rounding (a different summation order). Only the
    modules' instance `forward` is overridden and restored on exit; other models and other `nn.Linear` modules are
    untouched. GPU, half-precision and quantized layers are left alone.

    Args:
        model (`nn.Module`): the model whose linear layers are switched.
        max_rows (`int`, *optional*, defaults to 8): the largest number of rows routed to the skinny product.

    Yields:
        `int`: the number of linear layers switched (0 on GPU).
    """
    max_rows = check_int(max_rows, "max_rows", minimum=2)
    switched = [module for module in model.modules() if _eligible(module)]
    for module in switched:
        module.forward = _skinny_forward(module, max_rows)
    try:
        yield len(switched)
    finally:
        for module in switched:
            if getattr(module.__dict__.get("forward"), "spring_skinny", False):
                del module.forward
