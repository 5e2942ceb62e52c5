"""RMS normalisation as Llama defines it: statistics in float32 whatever the activation dtype, the
scale applied in the activation dtype. The one definition the T3 backbone, its fused decode and the
fused GEMV kernels' references use."""
from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
