"""Conformer building blocks of the S3Gen flow encoder (ESPnet relative-position flavour).

Pieces: the ESPnet relative positional table, the linear input layer that scales by sqrt(d) and
emits the table, relative-position multi-head attention (Transformer-XL style, ``pos_bias_u/v``),
and the pre-norm Conformer layer without macaron FFN or convolution module.
All sequences are full length (no padding mask): the flow always runs on one unpadded utterance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConformerLayerConfig:
    d_model: int = 512
    n_heads: int = 8
    ffn_dim: int = 2048
    # ESPnet's layer norms inside each Conformer layer use 1e-12, unlike the 1e-5 elsewhere.
    norm_eps: float = 1e-12
    # Base of the sinusoidal relative-position table.
    pos_base: float = 10000.0

    @classmethod
    def published(cls) -> "ConformerLayerConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "ConformerLayerConfig":
        return cls(d_model=32, n_heads=4, ffn_dim=64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rel_pos_table(length: int, d_model: int, base: float, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ESPnet relative positional table for a length-``length`` sequence: (1, 2*length-1, d_model).

    Row k encodes the relative position ``length-1-k`` (from +(length-1) down to -(length-1)), with
    sin at even and cos at odd channels. Built in float32 with the same arithmetic as ESPnet's
    precomputed table, so the rows equal the centre window of that table.
    """
    if length < 1:
        raise ValueError(f"relative position table needs length >= 1, got {length}")
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                         * -(math.log(base) / d_model))  # (d/2,)
    steps = torch.arange(0, length, dtype=torch.float32, device=device)  # (L,)
    pos_angles = steps.unsqueeze(1) * inv_freq  # (L, d/2), positions 0..L-1
    # ESPnet negates the position before multiplying; (-p)*w == -(p*w) exactly in IEEE arithmetic.
    neg_angles = -pos_angles[1:]  # (L-1, d/2), positions -1..-(L-1)
    angles = torch.cat([pos_angles.flip(0), neg_angles], dim=0)  # (2L-1, d/2)
    table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(2 * length - 1, d_model)
    return table.unsqueeze(0).to(dtype)  # (1, 2L-1, d)


class LinearInput(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(d); also returns the relative-position table."""

    def __init__(self, in_dim: int, cfg: ConformerLayerConfig, norm_eps: float) -> None:
        super().__init__()
        self.cfg = cfg
        # Index 0/1 of a Sequential, to keep the checkpoint's ``out.0`` / ``out.1`` key names.
        self.out = nn.Sequential(nn.Linear(in_dim, cfg.d_model), nn.LayerNorm(cfg.d_model, eps=norm_eps))
        self.xscale = math.sqrt(cfg.d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, in_dim) -> (B, T, d), pos: (1, 2T-1, d)
        y = self.out(x) * self.xscale
        pos = rel_pos_table(x.shape[1], self.cfg.d_model, self.cfg.pos_base, device=x.device, dtype=y.dtype)
        return y, pos


def rel_shift(bd_full: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) scores against table rows -> (B, H, T, T) scores against key positions.

    Query i and key j are ``i-j`` apart, which is table row ``T-1-i+j``. Reading that row for every
    (i, j) is a strided view: row i starts ``T-1-i`` into its own line, i.e. the line stride
    shrinks by one per query.
    """
    b, h, t, width = bd_full.shape
    base = bd_full.contiguous()
    sb, sh, _, _ = base.stride()
    return base.as_strided((b, h, t, t), (sb, sh, width - 1, 1), base.storage_offset() + t - 1)


class RelPosSelfAttention(nn.Module):
    """Self-attention with Transformer-XL relative positions (ESPnet ``RelPositionMultiHeadedAttention``).

    scores = ((q + u)·k + rel_shift((q + v)·p)) / sqrt(d_k). The positional term enters SDPA as an
    additive float mask, so the content term still runs through the fused kernel.
    """

    def __init__(self, cfg: ConformerLayerConfig) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        if d % h:
            raise ValueError(f"d_model {d} is not divisible by n_heads {h}")
        self.cfg = cfg
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, cfg.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, cfg.head_dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, d) -> (B, T, H, d_k)
        return x.unflatten(-1, (self.cfg.n_heads, self.cfg.head_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d); pos: (1, 2T-1, d)
        q = self._heads(self.linear_q(x))  # (B, T, H, d_k)
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # (B, H, T, d_k)
        v = self._heads(self.linear_v(x)).transpose(1, 2)  # (B, H, T, d_k)
        p = self._heads(self.linear_pos(pos)).transpose(1, 2)  # (1, H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)  # (B, H, T, d_k)
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        pos_scores = rel_shift(torch.matmul(q_v, p.transpose(-2, -1))) * scale  # (B, H, T, T)
        ctx = F.scaled_dot_product_attention(q_u, k, v, attn_mask=pos_scores, scale=scale)  # (B, H, T, d_k)
        return self.linear_out(ctx.transpose(1, 2).flatten(2))  # (B, T, d)


class FeedForward(nn.Module):
    """Position-wise FFN with SiLU (ESPnet ``PositionwiseFeedForward``, swish activation)."""

    def __init__(self, cfg: ConformerLayerConfig) -> None:
        super().__init__()
        self.w_1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.w_2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: ConformerLayerConfig) -> None:
        super().__init__()
        self.self_attn = RelPosSelfAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        # norm_ff before norm_mha: the published checkpoint's key order
        self.norm_ff = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm_mha = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d)
        x = x + self.self_attn(self.norm_mha(x), pos)
        return x + self.feed_forward(self.norm_ff(x))
