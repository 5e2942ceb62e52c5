"""Encoder and finite-scalar quantizer of the S3 speech tokenizer (v2, 25 Hz).

A Whisper-style audio encoder: two strided convolutions over the log-mel, then pre-norm transformer
blocks whose attention uses rotary positions and adds an FSMN memory (a depthwise convolution over
the values). The quantizer projects each frame to a few scalars and rounds each to three levels,
which gives a base-3 token id. Submodule names follow the published checkpoint keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.conv import Conv1d
from ..nn.dtype import as_float32, cast_floating
from ..nn.rotary import apply_rotary
from .s3tokenizer_config import S3TokenizerConfig



def conv_out_frames(frames: torch.Tensor | int, kernel: int, stride: int) -> torch.Tensor | int:
    """Frames left after a conv with 'same'-style padding (kernel // 2) and the given stride."""
    pad = kernel // 2
    return (frames + 2 * pad - (kernel - 1) - 1) // stride + 1


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool, True on the first ``lengths[b]`` positions of each row."""
    positions = torch.arange(size, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def rotary_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_positions, head_dim), frequencies repeated as [f, f]."""
    # Built on the host even under a meta/device context: these are deterministic non-checkpoint
    # buffers, and a module materialised from a state dict would otherwise keep them on meta.
    with torch.device("cpu"):
        half = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[:half].float() / head_dim))
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, half)
        # Same construction (unit-modulus polar form) as the reference, so the tables agree bit for bit.
        unit = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))  # (P, half, 2)
        cos = torch.cat([unit[..., 0], unit[..., 0]], dim=-1)
        sin = torch.cat([unit[..., 1], unit[..., 1]], dim=-1)
    return cos, sin


class FSMNAttention(nn.Module):
    """Multi-head self-attention with rotary q/k and an FSMN memory branch on the values."""

    def __init__(self, cfg: S3TokenizerConfig) -> None:
        super().__init__()
        width = cfg.n_state
        self.n_head = cfg.n_head
        self.head_dim = width // cfg.n_head
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        # Depthwise, symmetric zero padding: each channel sees +-(k-1)/2 neighbouring frames.
        self.fsmn_block = Conv1d(width, width, cfg.fsmn_kernel, stride=1, padding=cfg.fsmn_kernel // 2,
                                 groups=width, bias=False)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, keep: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); attn_bias (B, 1, 1, T) additive; keep (B, T, 1) float 0/1; cos/sin (T, D)."""
        batch, frames, width = x.shape
        q = self.query(x).view(batch, frames, self.n_head, self.head_dim)
        k = self.key(x).view(batch, frames, self.n_head, self.head_dim)
        v = self.value(x)  # (B, T, C)

        rope_cos = cos.unsqueeze(1)  # (T, 1, D): broadcast over heads
        rope_sin = sin.unsqueeze(1)
        q = apply_rotary(q, rope_cos, rope_sin)
        k = apply_rotary(k, rope_cos, rope_sin)

        # The reference scales q and k by D^-0.25 each; SDPA's default 1/sqrt(D) is the same product.
        heads_v = v.view(batch, frames, self.n_head, self.head_dim)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), heads_v.transpose(1, 2), attn_mask=attn_bias,
            scale=self.head_dim ** -0.5,
        )  # (B, H, T, D)
        attended = attended.transpose(1, 2).reshape(batch, frames, width)

        masked_v = v * keep
        memory = self.fsmn_block(masked_v.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        memory = (memory + masked_v) * keep
        return self.out(attended) + memory


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig) -> None:
        super().__init__()
        self.attn = FSMNAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.n_state, eps=cfg.ln_eps)
        hidden = cfg.n_state * cfg.mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(cfg.n_state, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_state))
        self.mlp_ln = nn.LayerNorm(cfg.n_state, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, keep: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), attn_bias, keep, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


class S3Encoder(nn.Module):
    """Log-mel (B, n_mels, T) -> hidden states (B, T', n_state) at the token rate."""

    def __init__(self, cfg: S3TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.conv_kernel
        self.conv1 = Conv1d(cfg.n_mels, cfg.n_state, k, stride=cfg.conv_strides[0], padding=k // 2)
        self.conv2 = Conv1d(cfg.n_state, cfg.n_state, k, stride=cfg.conv_strides[1], padding=k // 2)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.n_layer))
        cos, sin = rotary_tables(cfg.n_state // cfg.n_head, cfg.rope_max_positions, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def output_lengths(self, mel_lens: torch.Tensor | int) -> torch.Tensor | int:
        """Token count for each mel length (works on ints and on integer tensors)."""
        for stride in self.cfg.conv_strides:
            mel_lens = conv_out_frames(mel_lens, self.cfg.conv_kernel, stride)
        return mel_lens

    def forward(self, mel: torch.Tensor, mel_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, n_mels, T) with valid lengths mel_lens (B,) -> (hidden (B, T', C), lens (B,))."""
        if mel.dim() != 3 or mel.shape[1] != self.cfg.n_mels:
            raise ValueError(f"expected a log-mel of shape (B, {self.cfg.n_mels}, T), got {tuple(mel.shape)}")
        lens = mel_lens.to(device=mel.device, dtype=torch.long)
        size = mel.shape[-1]
        x = cast_floating(mel, self.conv1.weight.dtype)
        # Padding frames are zeroed before each conv so that they cannot leak into valid outputs.
        for conv, stride in ((self.conv1, self.cfg.conv_strides[0]), (self.conv2, self.cfg.conv_strides[1])):
            keep = length_mask(lens, size).unsqueeze(1).to(x.dtype)  # (B, 1, T)
            x = F.gelu(conv(x * keep))
            lens = conv_out_frames(lens, self.cfg.conv_kernel, stride)
            size = x.shape[-1]
        if size > self.rope_cos.shape[0]:
            raise ValueError(f"{size} encoder frames exceed the rotary table ({self.rope_cos.shape[0]} positions)")

        x = x.transpose(1, 2)  # (B, T', C)
        valid = length_mask(lens, size)  # (B, T')
        keep = valid.unsqueeze(-1).to(x.dtype)  # (B, T', 1)
        attn_bias = torch.where(valid, 0.0, self.cfg.mask_bias).to(x.dtype)[:, None, None, :]  # (B, 1, 1, T')
        cos = self.rope_cos[:size].to(x.dtype)
        sin = self.rope_sin[:size].to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_bias, keep, cos, sin)
        return as_float32(x), lens


class FSQCodebook(nn.Module):
    """Projection to ``fsq_dim`` scalars, each rounded to ``fsq_levels`` levels -> one integer id."""

    def __init__(self, cfg: S3TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.project_down = nn.Linear(cfg.n_state, cfg.fsq_dim)
        powers = cfg.fsq_levels ** torch.arange(cfg.fsq_dim, device="cpu")
        self.register_buffer("digit_weights", powers, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., C) -> ids (...) int64 in [0, levels ** fsq_dim)."""
        bounded = torch.tanh(self.project_down(hidden)) * self.cfg.fsq_scale  # (..., fsq_dim)
        # round() maps (-1, 1) to {-1, 0, 1}; the shift gives digits {0, 1, 2} (first digit least significant).
        digits = (torch.round(bounded) + self.cfg.fsq_levels // 2).long()
        return (digits * self.digit_weights.to(digits.device)).sum(dim=-1)


class FSQuantizer(nn.Module):
    """Holds the codebook under the checkpoint's ``_codebook`` name."""

    def __init__(self, cfg: S3TokenizerConfig) -> None:
        super().__init__()
        self._codebook = FSQCodebook(cfg)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pre-tanh projection (..., fsq_dim)."""
        return self._codebook.project_down(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._codebook(hidden)
