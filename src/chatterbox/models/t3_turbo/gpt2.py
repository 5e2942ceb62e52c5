"""GPT-2 decoder backbone of the Turbo/Nano T3 (HF ``GPT2Model`` math; inputs are always embeddings).

Pre-norm blocks: h += attn(LayerNorm(h)); h += MLP(LayerNorm(h)); a final LayerNorm. Learned absolute
positions (``wpe``) are added to the input embeddings over the whole sequence (conditioning, text and
speech alike), so a token's position is its index in the backbone's sequence. The projections are
GPT-2 ``Conv1D`` layers: the weight is stored (in, out) as the checkpoint keys it, with a bias.

Two entry points, as the Llama backbone of the original T3 (``models/t3/llama.py``):

* ``forward(embeds, cache=None)``: causal pass over positions ``0..S-1`` (teacher forcing, prefill);
  with a cache, those positions' keys/values are also written into it.
* ``decode(embeds, positions, cache)``: the tokens at ``positions`` attend over the whole static
  cache under a mask built from ``positions``; shapes never depend on how much of the cache is
  filled, so a decode step can be captured in a CUDA graph.

The static cache is ``models.t3.llama.KVCache`` (this config exposes the fields it reads); it is
written in place, so create it in the autograd mode it is used in (see ``llama.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..t3.cached_stack import CachedStack
from ..t3.kv_cache import KVCache, write_layer_cache

# tanh approximation of GELU ("gelu_new" in HF): 0.5 x (1 + tanh(sqrt(2/pi) (x + c x^3)))
_GELU_CUBIC = 0.044715


@dataclass(frozen=True)
class GPT2Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int  # learned position table (HF ``n_positions``)
    layer_norm_eps: float = 1e-5
    mlp_mult: int = 4  # MLP width = mlp_mult * hidden_size (HF ``n_inner`` unset)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # no grouped-query attention in GPT-2

    @property
    def intermediate_size(self) -> int:
        return self.mlp_mult * self.hidden_size

    @classmethod
    def medium(cls) -> "GPT2Config":
        """Upstream's ``GPT2_medium`` (Chatterbox-Turbo): 24 layers, 1024 wide, 16 heads."""
        return cls(hidden_size=1024, num_layers=24, num_heads=16, max_position_embeddings=8196)

    @classmethod
    def small(cls) -> "GPT2Config":
        """Upstream's ``GPT2_small`` (Chatterbox-Nano): 12 layers, 768 wide, 12 heads."""
        return cls(hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=8196)

    @classmethod
    def tiny(cls) -> "GPT2Config":
        """Two layers with the same structure, for fast unit tests."""
        return cls(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=512)


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, written out as HF's ``NewGELUActivation`` computes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + _GELU_CUBIC * torch.pow(x, 3.0))))


class Conv1D(nn.Module):
    """GPT-2's dense layer: y = x @ weight + bias, with ``weight`` stored (in, out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*lead, self.weight.shape[1])


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)  # fused q | k | v
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.cfg.num_heads, self.cfg.head_dim).transpose(1, 2)  # (B, H, S, D)

    def forward(self, x: Tensor, positions: Tensor, cache_kv: tuple[Tensor, Tensor] | None,
                attend_cache: bool, attn_mask: Tensor | None) -> Tensor:
        """x (B, S, C). ``cache_kv``: this layer's (B, H, max_len, D) slices, written at ``positions``.

        ``attend_cache`` False: causal attention over this call's own keys (positions 0..S-1).
        True: attention over the whole cache under ``attn_mask`` (1, 1, S, max_len).
        """
        b, s, c = x.shape
        q, k, v = (self._heads(part) for part in self.c_attn(x).split(c, dim=2))
        k, v = write_layer_cache(cache_kv, positions, k, v, attend_cache)
        if attend_cache:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, c))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: Tensor, positions: Tensor, cache_kv: tuple[Tensor, Tensor] | None,
                attend_cache: bool, attn_mask: Tensor | None) -> Tensor:
        h = x + self.attn(self.ln_1(x), positions, cache_kv, attend_cache, attn_mask)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(CachedStack):
    """Position table + blocks + final LayerNorm; returns the normalised last hidden states (B, S, C).

    The published checkpoints also hold a token table ``wte``; inputs are always embeddings, so it is
    not part of this module (the loader drops it, as upstream deletes it after loading).
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def init_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """A zeroed static cache of ``max_len`` positions (at most the position table's length)."""
        return KVCache.allocate(self.cfg, batch, max_len, device, dtype)

    def position_limit(self) -> int:
        return self.cfg.max_position_embeddings

    def _run(self, embeds: Tensor, positions: Tensor, cache: KVCache | None, attend_cache: bool,
             attn_mask: Tensor | None) -> Tensor:
        h = embeds + self.wpe(positions).to(embeds.dtype)  # (B, S, C)
        for i, block in enumerate(self.h):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            h = block(h, positions, cache_kv, attend_cache, attn_mask)
        return self.ln_f(h)
