"""Llama decoder backbone of T3 (HF ``LlamaModel`` math, inputs are always embeddings).

Two entry points:

* ``forward(embeds, cache=None)``: causal pass over positions ``0..S-1`` (teacher forcing, prefill).
  With a cache, the keys/values of those positions are also written into it.
* ``decode(embeds, positions, cache)``: the tokens at ``positions`` attend over the whole static
  cache with a mask built from ``positions``. Shapes never depend on how much of the cache is
  filled, so one decode step can be captured in a CUDA graph.

Static KV cache and autograd modes: the cache is written in place (``index_copy_``). It is a
per-generation object that must be created in the same autograd mode it is used in (e.g. both
inside ``torch.inference_mode()``): torch forbids in-place writes to an inference tensor outside
inference mode. It is meant for generation; do not backpropagate through a decode that reused it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.norm import rms_norm
from ...nn.rotary import apply_rotary
from .cached_stack import CachedStack
from .kv_cache import KVCache, write_layer_cache

# Supported rotary variants: plain RoPE, and HF's "llama3" frequency rescaling.
ROPE_LLAMA3 = "llama3"
ROPE_DEFAULT = "default"


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = ROPE_DEFAULT
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 1.0
    rope_original_max_positions: int = 0
    max_position_embeddings: int = 2048
    # The token embedding table is never used (inputs are embeddings) but is a checkpoint key.
    vocab_size: int = 8

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_type not in (ROPE_DEFAULT, ROPE_LLAMA3):
            raise ValueError(f"unsupported rope_type {self.rope_type!r}")

    @classmethod
    def published(cls) -> "LlamaConfig":
        """``Llama_520M`` of upstream's llama_configs.py."""
        return cls(
            hidden_size=1024, intermediate_size=4096, num_layers=30, num_heads=16, num_kv_heads=16,
            head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type=ROPE_LLAMA3,
            rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
            rope_original_max_positions=8192, max_position_embeddings=131072, vocab_size=8,
        )

    @classmethod
    def tiny(cls) -> "LlamaConfig":
        """A few-layer model with the same structure, for fast unit tests."""
        return cls(
            hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type=ROPE_LLAMA3,
            rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
            rope_original_max_positions=64, max_position_embeddings=1024, vocab_size=8,
        )


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Rotary inverse frequencies (head_dim/2,) in float32, in HF's op order (bit-compatible)."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    if cfg.rope_type != ROPE_LLAMA3:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: LlamaConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (S, head_dim) for integer ``positions`` (S,), computed in float32.

    Computed per call (a few tiny kernels) rather than stored, so a model built on the meta device
    needs nothing beyond its state dict.
    """
    inv_freq = rope_inv_freq(cfg, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (S, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (S, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.cfg.head_dim).transpose(1, 2)  # (B, n, S, D)

    def _expand_kv(self, x: Tensor) -> Tensor:
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        return x if groups == 1 else x.repeat_interleave(groups, dim=1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                cache_kv: tuple[Tensor, Tensor] | None, attend_cache: bool, attn_mask: Tensor | None) -> Tensor:
        """x (B, S, C). ``cache_kv``: this layer's (B, kv_heads, max_len, D) slices, written at ``positions``.

        ``attend_cache`` False: causal attention over this call's own keys (positions must be 0..S-1).
        True: attention over the whole cache under ``attn_mask`` (1, 1, S, max_len).
        """
        b, s, _ = x.shape
        q = apply_rotary(self._heads(self.q_proj(x), self.cfg.num_heads), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x), self.cfg.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.cfg.num_kv_heads)
        k, v = write_layer_cache(cache_kv, positions, k, v, attend_cache)
        if attend_cache:
            out = F.scaled_dot_product_attention(q, self._expand_kv(k), self._expand_kv(v), attn_mask=attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, self._expand_kv(k), self._expand_kv(v), is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, self.cfg.num_heads * self.cfg.head_dim)  # (B, S, H*D)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                cache_kv: tuple[Tensor, Tensor] | None, attend_cache: bool, attn_mask: Tensor | None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache_kv, attend_cache, attn_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(CachedStack):
    """Decoder stack + final RMSNorm; returns the normalised last hidden states (B, S, C)
    (``forward`` and ``decode`` over a static cache: ``CachedStack``)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _run(self, embeds: Tensor, positions: Tensor, cache: KVCache | None, attend_cache: bool,
             attn_mask: Tensor | None) -> Tensor:
        cos, sin = rope_cos_sin(self.cfg, positions, embeds.dtype)
        h = embeds
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            h = layer(h, cos, sin, positions, cache_kv, attend_cache, attn_mask)
        return self.norm(h)
