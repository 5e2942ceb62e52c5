"""Upsampling Conformer encoder of the S3Gen flow (CosyVoice2 ``UpsampleConformerEncoder``).

token embeddings (B, N, 512) -> linear input + rel-pos -> pre-lookahead conv -> 6 Conformer layers
-> nearest x2 upsample + causal conv -> linear input + rel-pos -> 4 Conformer layers -> LayerNorm
-> (B, 2N, 512). Attention is full-context (no chunk masks), as in the published model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.conv import Conv1d
from ...nn.dtype import as_float32, cast_floating
from .conformer import ConformerLayer, ConformerLayerConfig, LinearInput


@dataclass(frozen=True)
class UpsampleConformerEncoderConfig:
    input_dim: int = 512
    layer: ConformerLayerConfig = field(default_factory=ConformerLayerConfig.published)
    n_layers: int = 6
    n_up_layers: int = 4
    # Tokens of right context the pre-lookahead conv reads (its kernel is this + 1).
    pre_lookahead_len: int = 3
    pre_lookahead_kernel2: int = 3
    pre_lookahead_slope: float = 0.01
    upsample_stride: int = 2
    # Causal conv after the nearest-neighbour repeat (left-padded by kernel - 1).
    upsample_kernel: int = 5
    # Input layers and the final norm use 1e-5 (the Conformer layers' own norms use layer.norm_eps).
    norm_eps: float = 1e-5

    @classmethod
    def published(cls) -> "UpsampleConformerEncoderConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "UpsampleConformerEncoderConfig":
        layer = ConformerLayerConfig.tiny()
        return cls(input_dim=layer.d_model, layer=layer, n_layers=2, n_up_layers=1)

    @property
    def d_model(self) -> int:
        return self.layer.d_model


class PreLookahead(nn.Module):
    """Residual conv stack that mixes in ``pre_lookahead_len`` future tokens, then 2 past ones."""

    def __init__(self, cfg: UpsampleConformerEncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.conv1 = Conv1d(d, d, kernel_size=cfg.pre_lookahead_len + 1)
        self.conv2 = Conv1d(d, d, kernel_size=cfg.pre_lookahead_kernel2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d)
        h = x.transpose(1, 2)  # (B, d, T)
        h = F.pad(h, (0, self.cfg.pre_lookahead_len))  # zeros stand in for tokens not yet seen
        h = F.leaky_relu(self.conv1(h), self.cfg.pre_lookahead_slope)
        h = self.conv2(F.pad(h, (self.cfg.pre_lookahead_kernel2 - 1, 0)))  # causal
        return h.transpose(1, 2) + x  # (B, T, d)


class Upsample(nn.Module):
    """Nearest-neighbour repeat by ``stride``, then a causal conv."""

    def __init__(self, cfg: UpsampleConformerEncoderConfig) -> None:
        super().__init__()
        self.stride = cfg.upsample_stride
        self.conv = Conv1d(cfg.d_model, cfg.d_model, kernel_size=cfg.upsample_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d) -> (B, stride*T, d)
        h = x.transpose(1, 2).repeat_interleave(self.stride, dim=2)  # (B, d, sT)
        h = self.conv(F.pad(h, (self.conv.kernel_size[0] - 1, 0)))
        return h.transpose(1, 2)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: UpsampleConformerEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = LinearInput(cfg.input_dim, cfg.layer, cfg.norm_eps)
        # registered here so the state dict lists keys in the published checkpoint's order
        self.after_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.pre_lookahead_layer = PreLookahead(cfg)
        self.encoders = nn.ModuleList(ConformerLayer(cfg.layer) for _ in range(cfg.n_layers))
        self.up_layer = Upsample(cfg)
        self.up_embed = LinearInput(cfg.d_model, cfg.layer, cfg.norm_eps)
        self.up_encoders = nn.ModuleList(ConformerLayer(cfg.layer) for _ in range(cfg.n_up_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, input_dim) unpadded token embeddings -> (B, stride*N, d)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.input_dim or x.shape[1] < 1:
            raise ValueError(f"encoder input must be (B, N>=1, {self.cfg.input_dim}), got {tuple(x.shape)}")
        h, pos = self.embed(cast_floating(x, self.after_norm.weight.dtype))  # (B, N, d), (1, 2N-1, d)
        h = self.pre_lookahead_layer(h)
        for layer in self.encoders:
            h = layer(h, pos)
        h, pos = self.up_embed(self.up_layer(h))  # (B, 2N, d), (1, 4N-1, d)
        for layer in self.up_encoders:
            h = layer(h, pos)
        return as_float32(self.after_norm(h))
