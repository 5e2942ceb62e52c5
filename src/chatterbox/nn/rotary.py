"""Rotary position embedding in the "rotate half" form shared by T3's Llama and the S3 tokenizer:
the two halves of each head vector are rotated as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
with cos/sin tables whose halves repeat. The one definition every model and kernel reference uses."""
from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """(..., D) -> (..., D): (x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., D) with cos/sin broadcastable to it (halves repeated)."""
    return x * cos + rotate_half(x) * sin
