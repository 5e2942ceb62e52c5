"""Modules the engine swaps into its own copy of the models (load-time swaps): each keeps the
signature of the module it wraps and replays CUDA graphs of it from the engine's ``GraphRegistry``,
so the models call ``self.estimator(...)`` or ``self.speaker_encoder(...)`` as always and never see a
runner. Off CUDA (or with graphs disabled), and while autograd records, they call the wrapped module.

* ``GraphedForward``: ``forward(x)`` replayed from one graph per exact input shape (the per-voice
  encoders: a reference of a length seen before replays; a few lengths kept, least recent dropped).
* ``BucketedEstimator``: the CFM estimator at frame counts padded up to a multiple of
  ``bucket_frames``; padded frames carry mask 0, and the causal convolutions and the key-padding mask
  keep the valid frames' output unchanged.

Other attributes are read from the wrapped module (``campplus.features(...)`` still works).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graphs import GraphRegistry

# Graphs kept per wrapped module for exact-shape graphs (reference lengths).
SHAPE_GRAPHS_KEPT = 8


class _Delegating(nn.Module):
    def __init__(self, inner: nn.Module, graphs: GraphRegistry, name: str) -> None:
        super().__init__()
        self.inner = inner
        self.graphs = graphs
        self.graph_name = name

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def _eager(self, x: Tensor) -> bool:
        return not self.graphs.enabled or x.device.type != "cuda" or (torch.is_grad_enabled() and x.requires_grad)


class GraphedForward(_Delegating):
    def forward(self, x: Tensor) -> Tensor:
        if self._eager(x):
            return self.inner(x)
        key = (self.graph_name, tuple(x.shape), x.dtype)
        with self.graphs.lock:
            return self.graphs.get(key, self.inner, clone_outputs=True, limit=SHAPE_GRAPHS_KEPT)(x)


class BucketedEstimator(_Delegating):
    def __init__(self, inner: nn.Module, graphs: GraphRegistry, name: str, bucket_frames: int) -> None:
        if bucket_frames < 1:
            raise ValueError(f"bucket_frames must be >= 1, got {bucket_frames}")
        super().__init__(inner, graphs, name)
        self.bucket_frames = bucket_frames

    def padded_length(self, frames: int) -> int:
        return self.bucket_frames * math.ceil(frames / self.bucket_frames)

    def forward(self, x: Tensor, mask: Tensor | None, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                r: Tensor | None = None) -> Tensor:
        if self._eager(x):
            return self.inner(x, mask, mu, t, spks, cond) if r is None else self.inner(x, mask, mu, t, spks, cond, r)
        batch, _, frames = x.shape  # (B, n_feats, T)
        pad = self.padded_length(frames) - frames
        if mask is None:
            mask = x.new_ones(batch, 1, frames)
        x, mask, mu, cond = (F.pad(v, (0, pad)) for v in (x, mask, mu, cond))  # mask pads 0: frames ignored
        key = (self.graph_name, tuple(x.shape), x.dtype, t.dtype, r is not None)
        args = (x, mask, mu, t, spks, cond) if r is None else (x, mask, mu, t, spks, cond, r)
        with self.graphs.lock:
            graph = self.graphs.get(key, self.inner, clone_outputs=False)
            # sliced and copied under the lock: the static output is overwritten by the next replay
            return graph(*args)[..., :frames].clone()
