"""The static key/value cache of T3's backbones (Llama and GPT-2): allocated once at full length,
written by position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class CacheShape(Protocol):
    """What a backbone config tells the cache: its layers, kv heads, head width and position table."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int


@dataclass
class KVCache:
    """Static key/value cache, allocated once at full length and written by position.

    ``k``/``v``: (layers, B, kv_heads, max_len, head_dim). Zero-initialised, so masked (unwritten)
    slots never feed NaN/inf into attention.
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, cfg: CacheShape, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> "KVCache":
        if max_len < 1 or max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache length {max_len} outside 1..{cfg.max_position_embeddings}")
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def write_layer_cache(cache_kv: tuple[Tensor, Tensor] | None, positions: Tensor, k: Tensor, v: Tensor,
                      attend_cache: bool) -> tuple[Tensor, Tensor]:
    """Write this call's keys/values (B, KVH, S, D) into a layer's cache slices at ``positions`` (in place:
    the cache is created in the autograd mode it is used in) and return what attention reads: the whole
    cache when ``attend_cache``, else this call's own keys/values."""
    if cache_kv is None:
        return k, v
    cache_k, cache_v = cache_kv
    cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
    cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
    return (cache_k, cache_v) if attend_cache else (k, v)

