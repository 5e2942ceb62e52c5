"""Deterministic cuDNN for the one operation that needs it.

A transposed convolution runs on cuDNN's backward-data algorithms, some of which accumulate with
atomics: for some shapes cuDNN's heuristics pick one of those, and the same input then gives results
that differ in the last bits from run to run. Streaming calls the vocoder's transposed convolutions
at many window lengths (one-shot synthesis at one), which is how seeded streams came out different
on the GPU while one-shot synthesis was bit-exact. ``deterministic_cudnn`` restricts cuDNN to its
deterministic algorithms for the calls inside it. cuDNN's flag is process-wide, so entries are
counted: the flag is set by the first caller in and restored by the last one out, whatever threads
are inside at the same time.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_lock = threading.Lock()
_depth = 0
_saved = False


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.backends.cudnn.deterministic
            torch.backends.cudnn.deterministic = True
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.backends.cudnn.deterministic = _saved
