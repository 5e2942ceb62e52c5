"""Dtype boundaries of a component: floating inputs meet the weights in the weights' dtype, and
results leave in float32 (what the neighbouring stages expect), whatever a pass lowered the weights to.
For float32 weights every call here returns its argument unchanged (no copy, no kernel)."""
from __future__ import annotations

import torch
from torch import nn


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def cast_floating(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` in ``dtype`` when it is a floating tensor of another dtype, else ``x`` itself."""
    if x is None or not x.is_floating_point() or x.dtype == dtype:
        return x
    return x.to(dtype)


def as_float32(x: torch.Tensor) -> torch.Tensor:
    return cast_floating(x, torch.float32)
