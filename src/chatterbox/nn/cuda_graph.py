"""``CudaGraph``: the one CUDA-graph wrapper of the project.

It turns ``fn(*tensors)`` into a captured graph: the first call copies its inputs into static
buffers, runs ``fn`` a few times on a side stream (warm-up: lazy inits, cuBLAS/cuDNN workspaces,
allocator growth), captures one call and replays it; later calls copy their inputs into the same
static buffers and replay. The input signature (shape, dtype, device of every argument) is fixed by
the first call: a different one raises ``GraphSignatureError`` instead of silently re-capturing.

Disabled (``enabled=False``, no CUDA, or ``CHATTERBOX_DISABLE_CUDA_GRAPHS=1``), the same object
runs ``fn`` eagerly with the same signature check, so code written against it runs and is testable
on the CPU.

Rules for ``fn``: tensors in, tensors (or a tuple/list of them) out; no host syncs; everything that
is not an argument is baked in at capture (Python numbers, closed-over tensors and their
addresses). Random ops must use a generator passed in ``generators`` (registered with the graph)
or torch's default CUDA generator.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

DISABLE_ENV = "CHATTERBOX_DISABLE_CUDA_GRAPHS"
DEFAULT_WARMUP = 2

Signature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


class GraphSignatureError(ValueError):
    """A captured graph was called with inputs of another shape, dtype or device."""


def cuda_graphs_disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def signature_of(args: Sequence[Any]) -> Signature:
    sig = []
    for i, a in enumerate(args):
        if not torch.is_tensor(a):
            raise TypeError(f"CUDA-graph inputs must be tensors; argument {i} is {type(a).__name__} "
                            "(bake constants into the function instead)")
        sig.append((tuple(a.shape), a.dtype, a.device))
    return tuple(sig)


def _describe(sig: Signature) -> str:
    return ", ".join(f"{list(shape)} {str(dtype).replace('torch.', '')} {device}" for shape, dtype, device in sig)


class CudaGraph:
    """Capture ``fn`` on first call, replay afterwards; see the module docstring.

    ``clone_outputs``: return copies (safe to keep) instead of the static output buffers, which the
    next replay overwrites. ``pool``: a ``torch.cuda.graph_pool_handle()`` shared by graphs that never
    run concurrently. ``generators``: CUDA generators used inside ``fn``, registered with the graph
    so that each replay draws fresh numbers from their current state.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str = "graph", enabled: bool | None = None,
                 warmup: int = DEFAULT_WARMUP, clone_outputs: bool = True, pool: Any = None,
                 generators: Sequence[torch.Generator] = ()) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs warmed-up kernels), got {warmup}")
        self.fn = fn
        self.name = name
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.pool = pool
        self.generators = tuple(generators)
        want = True if enabled is None else bool(enabled)
        self.enabled = want and torch.cuda.is_available() and not cuda_graphs_disabled_by_env()
        self.signature: Signature | None = None
        self._graph: Any = None
        self._static_in: list[torch.Tensor] = []
        self._static_out: Any = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def check(self, args: Sequence[Any]) -> None:
        """Fix the signature on first use; raise ``GraphSignatureError`` on any later mismatch."""
        sig = signature_of(args)
        if self.signature is None:
            self.signature = sig
        elif sig != self.signature:
            raise GraphSignatureError(
                f"CUDA graph {self.name!r} was captured for inputs ({_describe(self.signature)}) and got "
                f"({_describe(sig)}); shapes are fixed at capture: pad to the captured size or use "
                f"another graph (one per bucket)")

    def __call__(self, *args: torch.Tensor) -> Any:
        self.check(args)
        if not self.enabled:
            return self.fn(*args)
        if any(a.device.type != "cuda" for a in args):
            raise GraphSignatureError(f"CUDA graph {self.name!r} needs CUDA tensors, got devices "
                                      f"{sorted({str(a.device) for a in args})}")
        if self._graph is None:
            self._capture(args)
        else:
            for static, a in zip(self._static_in, args):
                if static.data_ptr() != a.data_ptr():
                    static.copy_(a)
        self._graph.replay()
        return _map_tensors(self._static_out, torch.clone) if self.clone_outputs else self._static_out

    def _capture(self, args: Sequence[torch.Tensor]) -> None:
        # Static inputs are ordinary tensors even when the caller is inside inference_mode, so a
        # later call made outside it may still copy into them.
        with torch.inference_mode(False):
            self._static_in = [a.detach().clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            graph.register_generator_state(gen)
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*self._static_in)
        self._static_out = out
        self._graph = graph
        log.debug("captured CUDA graph %r for (%s)", self.name, _describe(self.signature or ()))

    def reset(self) -> None:
        """Drop the graph and its buffers; the next call captures again (any signature)."""
        self._graph = None
        self._static_in = []
        self._static_out = None
        self.signature = None


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value
