"""The engine's CUDA graphs: one registry, one memory pool, one lock.

Every graph of an engine (T3 prefill and decode steps, the CFM estimator at bucketed lengths, the
voice encoders per reference length) is created here, keyed by what it serves, and shares one
graph memory pool. Sharing a pool is safe because replays never overlap: every replay, and the
copies into and out of a graph's static buffers, happen under ``lock`` on the engine's one CUDA
stream. Runners decide replay or eager themselves (``enabled`` False: no graphs at all, the same
code runs eagerly).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

from ..nn.cuda_graph import CudaGraph, cuda_graphs_disabled_by_env

log = logging.getLogger(__name__)


class GraphRegistry:
    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = torch.device(device)
        self.enabled = (enabled and self.device.type == "cuda" and torch.cuda.is_available()
                        and not cuda_graphs_disabled_by_env())
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        # Reentrant: a runner holding it may call another runner's graphs.
        self.lock = threading.RLock()
        self._graphs: OrderedDict[Hashable, CudaGraph] = OrderedDict()
        self._limits: dict[Hashable, int] = {}

    def get(self, key: tuple, fn: Callable, *, clone_outputs: bool, limit: int | None = None,
            generators: Sequence[torch.Generator] = ()) -> CudaGraph:
        """The graph for ``key`` (made on first request: captured at its first call). ``limit`` caps how
        many graphs of the same family (``key[0]``) are kept, least recently used first out."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        graph = CudaGraph(fn, name=str(key), enabled=self.enabled, clone_outputs=clone_outputs, pool=self.pool,
                          generators=generators)
        self._graphs[key] = graph
        if limit is not None:
            family = [k for k in self._graphs if k[0] == key[0]]
            for old in family[:max(0, len(family) - limit)]:
                del self._graphs[old]
        return graph

    def __len__(self) -> int:
        return len(self._graphs)

    def count(self, family: str) -> int:
        return sum(1 for k in self._graphs if k[0] == family)

    def captured(self) -> list[tuple]:
        return [k for k, g in self._graphs.items() if g.captured]
