"""The runtime contexts an ``OptConfig`` names: the autograd mode of a public call and the pinned
attention kernel. Entered by the engine around the work of a request, never inside model code."""
from __future__ import annotations

import contextlib

import torch

from .config import ATTENTION_BACKENDS, AUTOGRAD_MODES


def autograd_context(mode: str) -> contextlib.AbstractContextManager:
    """The context a public call runs in; entered once per call (once per chunk when streaming)."""
    if mode == "inference_mode":
        return torch.inference_mode()
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "none":
        return contextlib.nullcontext()
    raise ValueError(f"autograd_mode must be one of {AUTOGRAD_MODES}, got {mode!r}")


def attention_context(backend: str) -> contextlib.AbstractContextManager:
    """Pin the scaled-dot-product-attention kernel (``"sdpa"``: torch's own choice, no context)."""
    if backend == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if backend not in pinned:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    backends = [pinned[backend]] if backend == "math" else [pinned[backend], SDPBackend.MATH]
    return sdpa_kernel(backends)
