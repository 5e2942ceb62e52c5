"""Host-to-device copies that do not stall the device queue.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory makes PyTorch wait until the
copy is done, which also waits for every kernel queued before it: one such copy in the middle of
a chain of small kernels turns queued work into serial work. Copies made here go through pinned
memory and are asynchronous on CUDA; PyTorch's pinned-memory cache keeps the staging block alive
until the copy has run, so the source may be changed or freed right after the call.
"""
from __future__ import annotations

import numpy as np
import torch


def host_to_device(data: torch.Tensor | np.ndarray, device: torch.device | str,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` on ``device`` (and in ``dtype`` when given), copied without a device synchronisation.

    A tensor already on ``device`` is only cast. Off CUDA this is an ordinary ``.to``.
    """
    device = torch.device(device)
    t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if dtype is not None and t.dtype != dtype and t.device.type == "cpu":
        t = t.to(dtype)  # cast on the host: the copy then moves the final bytes
    if device.type == "cuda" and t.device.type == "cpu":
        # Always a fresh staging block (even for a pinned source, which the caller may reuse).
        staging = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staging.copy_(t)
        t = staging.to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)
