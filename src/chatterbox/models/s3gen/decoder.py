"""ConditionalDecoder: the velocity estimator of S3Gen's flow matching (a causal 1-D U-Net).

The published model has a single resolution level: down stage (resnet + transformers + causal
conv, no down-sampling), a stack of mid stages, one up stage fed with the down stage's skip, then a
final causal block and a 1x1 projection. Keys live under ``flow.decoder.estimator.`` in s3gen.

Per call, work shared by all stages is done once: the Mish of the time embedding, the attention
bias, and the masking of each stage's input (every transformer stack hands back its output already
masked, in the (B, C, T) layout the convolutions read, see ``channels_first``).

The meanflow variant (Chatterbox-Turbo's ``s3gen_meanflow``) predicts the mean velocity over an
interval [t, r]: both ends go through the same sinusoidal features and time MLP, and a bias-free
linear ``time_embed_mixer`` maps their concatenation [emb(t) | emb(r)] back to one time embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.conv import Conv1d
from ...nn.dtype import as_float32, cast_floating
from .decoder_blocks import (
    CausalBlock1D,
    CausalConv1d,
    CausalResnetBlock1D,
    TimestepMLP,
    TransformerBlock,
    apply_mask,
    channels_first,
    key_padding_bias,
    sinusoidal_embedding,
)


@dataclass(frozen=True)
class ConditionalDecoderConfig:
    n_feats: int = 80  # mel bins: x, mu, cond and the output all have this many channels
    spk_dim: int = 80  # projected speaker vector, broadcast over time
    channels: int = 256  # U-Net width (one level)
    n_blocks: int = 4  # transformer blocks per stage
    num_mid_blocks: int = 12
    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    time_embed_mult: int = 4  # time embedding width = channels * time_embed_mult
    kernel_size: int = 3
    norm_eps: float = 1e-5
    time_scale: float = 1000.0  # t in [0, 1] is scaled before the sinusoidal features
    max_period: float = 10000.0
    # Meanflow estimator: takes the interval end ``r`` too and mixes both time embeddings.
    meanflow: bool = False

    @property
    def in_channels(self) -> int:
        return 3 * self.n_feats + self.spk_dim  # [x, mu, spks, cond]

    @property
    def time_embed_dim(self) -> int:
        return self.channels * self.time_embed_mult

    @classmethod
    def published(cls) -> "ConditionalDecoderConfig":
        return cls()

    @classmethod
    def small(cls) -> "ConditionalDecoderConfig":
        """A tiny estimator for fast unit tests (not a published model)."""
        return cls(n_feats=8, spk_dim=8, channels=16, n_blocks=1, num_mid_blocks=2, num_heads=2, head_dim=8)

    @classmethod
    def published_meanflow(cls) -> "ConditionalDecoderConfig":
        """The estimator of ``s3gen_meanflow.safetensors`` (Chatterbox-Turbo): the published one plus
        the time mixer."""
        return cls(meanflow=True)


def _transformers(cfg: ConditionalDecoderConfig) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(cfg.channels, cfg.num_heads, cfg.head_dim, cfg.ff_mult, cfg.norm_eps)
        for _ in range(cfg.n_blocks)
    )


def _resnet(cfg: ConditionalDecoderConfig, dim_in: int) -> CausalResnetBlock1D:
    return CausalResnetBlock1D(dim_in, cfg.channels, cfg.time_embed_dim, cfg.kernel_size, cfg.norm_eps)


def _run_transformers(blocks: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """(B, C, T) -> transformer blocks on (B, T, C) -> contiguous (B, C, T), masked.

    Every consumer of a stage's output masks it first, so the mask is applied here, fused with the
    layout change.
    """
    h = x.transpose(1, 2)  # (B, T, C); in eager the resnet's sum already has this memory layout
    for block in blocks:
        h = block(h, bias)
    return channels_first(h, mask)


class ConditionalDecoder(nn.Module):
    def __init__(self, cfg: ConditionalDecoderConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.time_mlp = TimestepMLP(cfg.in_channels, cfg.time_embed_dim)
        # each stage is a ModuleList so that keys read "<stage>.0" (resnet), ".1.<i>" (transformers),
        # ".2" (causal conv), as in the checkpoint
        self.down_blocks = nn.ModuleList([
            nn.ModuleList([_resnet(cfg, cfg.in_channels), _transformers(cfg), CausalConv1d(c, c, cfg.kernel_size)])
        ])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([_resnet(cfg, c), _transformers(cfg)]) for _ in range(cfg.num_mid_blocks)
        )
        self.up_blocks = nn.ModuleList([
            nn.ModuleList([_resnet(cfg, 2 * c), _transformers(cfg), CausalConv1d(c, c, cfg.kernel_size)])
        ])
        self.final_block = CausalBlock1D(c, c, cfg.kernel_size, cfg.norm_eps)
        self.final_proj = Conv1d(c, cfg.n_feats, 1)
        if cfg.meanflow:
            # (time_embed_dim, 2 * time_embed_dim), no bias: checkpoint key ``time_embed_mixer.weight``
            self.time_embed_mixer = nn.Linear(2 * cfg.time_embed_dim, cfg.time_embed_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for the current x.

        x, mu, cond: (B, n_feats, T); mask: (B, 1, T) of 0/1, or None when no frame is padded (same
        numbers as a mask of ones, without the masking work); t: (B,) in [0, 1]; spks: (B, spk_dim).
        r: (B,) end of the interval, given exactly when the estimator is a meanflow one.
        Returns (B, n_feats, T), zero on padded frames.
        """
        cfg = self.cfg
        if x.dim() != 3 or x.shape[1] != cfg.n_feats:
            raise ValueError(f"x must be (B, {cfg.n_feats}, T), got {tuple(x.shape)}")
        if mu.shape != x.shape or cond.shape != x.shape:
            raise ValueError(f"mu {tuple(mu.shape)} and cond {tuple(cond.shape)} must match x {tuple(x.shape)}")
        if spks.shape != (x.shape[0], cfg.spk_dim):
            raise ValueError(f"spks must be ({x.shape[0]}, {cfg.spk_dim}), got {tuple(spks.shape)}")
        if mask is not None and mask.shape != (x.shape[0], 1, x.shape[2]):
            raise ValueError(f"mask must be ({x.shape[0]}, 1, {x.shape[2]}), got {tuple(mask.shape)}")
        if (r is not None) != cfg.meanflow:
            raise ValueError("the interval end r is required by a meanflow estimator and taken by no other")

        dtype = self.final_proj.weight.dtype
        x, mask, mu, spks, cond = (cast_floating(v, dtype) for v in (x, mask, mu, spks, cond))
        # t stays float32 under a lower-precision pass (1000 * t needs the mantissa); the features
        # are cast to the activation dtype only after the sinusoids.
        t_emb = self._time_embedding(t, x.dtype)  # (B, time_embed_dim)
        if r is not None:
            pair = torch.cat([t_emb, self._time_embedding(r, x.dtype)], dim=1)  # (B, 2 * time_embed_dim)
            t_emb = self.time_embed_mixer(pair)
        t_act = F.mish(t_emb)  # every resnet projects Mish(t_emb); computed once

        spk_map = spks.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, spk_dim, T)
        h = apply_mask(torch.cat([x, mu, spk_map, cond], dim=1), mask)  # (B, in_channels, T)
        # one level, so every stage sees the same mask and attention bias
        bias = key_padding_bias(mask, h.dtype)

        # resnets take masked inputs; _run_transformers returns masked outputs
        resnet, blocks, conv = self.down_blocks[0]
        skip = _run_transformers(blocks, resnet(h, mask, t_act), bias, mask)
        h = apply_mask(conv(skip), mask)

        for resnet, blocks in self.mid_blocks:
            h = _run_transformers(blocks, resnet(h, mask, t_act), bias, mask)

        resnet, blocks, conv = self.up_blocks[0]
        h = torch.cat([h, skip], dim=1)  # (B, 2C, T)
        h = conv(_run_transformers(blocks, resnet(h, mask, t_act), bias, mask))

        h = self.final_block(h, mask)  # masked on return
        out = self.final_proj(h)  # (B, n_feats, T)
        return as_float32(apply_mask(out, mask))

    def _time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) times -> (B, time_embed_dim): sinusoidal features, then the time MLP."""
        cfg = self.cfg
        t_feat = sinusoidal_embedding(t, cfg.in_channels, cfg.time_scale, cfg.max_period)  # (B, in_channels)
        return self.time_mlp(t_feat.to(dtype))
