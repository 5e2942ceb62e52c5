"""Perceiver resampler: squeezes a variable-length prompt embedding into a fixed number of queries.

One attention block (shared LayerNorm on both inputs, q/k/v/out projections with bias, residual onto
the query side) is applied twice: learned queries -> prompt (cross), then result -> itself (self).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PerceiverConfig:
    num_queries: int
    dim: int
    num_heads: int
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def published(cls) -> "PerceiverConfig":
        return cls(num_queries=32, dim=1024, num_heads=4)

    @classmethod
    def tiny(cls) -> "PerceiverConfig":
        return cls(num_queries=4, dim=64, num_heads=2)


class PerceiverAttention(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.to_q = nn.Linear(cfg.dim, cfg.dim)
        self.to_k = nn.Linear(cfg.dim, cfg.dim)
        self.to_v = nn.Linear(cfg.dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.cfg.num_heads, self.cfg.dim // self.cfg.num_heads).transpose(1, 2)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        """queries (B, Q, C), context (B, L, C) -> (B, Q, C)."""
        qn, cn = self.norm(queries), self.norm(context)
        q, k, v = self._heads(self.to_q(qn)), self._heads(self.to_k(cn)), self._heads(self.to_v(cn))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, C/H), no mask: every slot is real
        b, _, n, _ = h.shape
        h = h.transpose(1, 2).reshape(b, n, self.cfg.dim)
        return queries + self.proj_out(h)


class Perceiver(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_attention_query = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.dim))
        self.attn = PerceiverAttention(cfg)

    def forward(self, prompt: Tensor) -> Tensor:
        """prompt (B, L, C) -> (B, num_queries, C)."""
        queries = self.pre_attention_query.expand(prompt.shape[0], -1, -1)
        pooled = self.attn(queries, prompt)
        return self.attn(pooled, pooled)
