"""GPT-2 decode and prefill for requests whose KV caches are found through a cache table (the fast
path of ``GPT2Model.decode`` for Turbo and Nano, as ``models/t3/fused_decode.py`` is for Llama).

The same math as ``GPT2Model``, arranged so that one captured step serves any set of requests:

* Attention is ``kernels.decode_attention``'s table form: each request's stacked cache (its own
  allocation, ``allocate_stacked_cache``) is named by address and length, and each request decodes
  at its own position. GPT-2 has no rotary embedding; the kernel's rotation is given angle zero
  (cos 1, sin 0), which leaves q and k unchanged exactly.
* The learned positions (``wpe``) are looked up per request, so requests at different positions
  share a step.
* The work after attention is one pure function per layer (``block_outputs``: output projection,
  residual, LayerNorm, MLP with tanh-GELU, residual, the next layer's LayerNorm), which the engine
  may replace by a compiled version (``with_kernels``).

No weight is copied: the projections use the modules' own (in, out) ``Conv1D`` weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels.decode_attention import CacheTable, decode_attention_table, write_kv_table
from ..t3.fused_decode import per_request_rows
from .gpt2 import GPT2Config, GPT2Model, gelu_tanh


@dataclass(frozen=True)
class GPT2Layer:
    ln_1: tuple[Tensor, Tensor]  # LayerNorm weight, bias (C,)
    qkv: tuple[Tensor, Tensor]  # (C, 3C) weight, (3C,) bias: [q | k | v]
    o: tuple[Tensor, Tensor]  # (C, C), (C,)
    ln_2: tuple[Tensor, Tensor]
    fc: tuple[Tensor, Tensor]  # (C, I), (I,)
    proj: tuple[Tensor, Tensor]  # (I, C), (C,)


def conv1d(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GPT-2's dense layer on (..., in): ``bias + x @ weight`` with ``weight`` (in, out)."""
    lead = x.shape[:-1]
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*lead, weight.shape[1])


def block_outputs(h: Tensor, attn: Tensor, o_w: Tensor, o_b: Tensor, ln_w: Tensor, ln_b: Tensor, fc_w: Tensor,
                  fc_b: Tensor, proj_w: Tensor, proj_b: Tensor, next_w: Tensor, next_b: Tensor,
                  eps: float) -> tuple[Tensor, Tensor]:
    """Residual h (B, S, C) + attention (B, S, C) -> (block output, it normed by the next LayerNorm:
    the next block's ``ln_1``, or ``ln_f`` after the last block)."""
    width = (h.shape[-1],)
    h = h + conv1d(attn, o_w, o_b)
    h = h + conv1d(gelu_tanh(conv1d(F.layer_norm(h, width, ln_w, ln_b, eps), fc_w, fc_b)), proj_w, proj_b)
    return h, F.layer_norm(h, width, next_w, next_b, eps)


def first_norm(h: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(h, (h.shape[-1],), w, b, eps)


@dataclass(frozen=True)
class GPT2TableDecoder:
    cfg: GPT2Config
    layers: tuple[GPT2Layer, ...]
    wpe: Tensor  # (positions, C)
    ln_f: tuple[Tensor, Tensor]
    outputs_fn: Callable = block_outputs
    norm_fn: Callable = first_norm
    # When set, every projection runs on groups of this many rows on its own (see
    # ``FusedDecoder.request_rows``): a request's numbers never depend on its step's other requests.
    request_rows: int | None = None

    @classmethod
    def of(cls, model: GPT2Model) -> "GPT2TableDecoder":
        def pair(module) -> tuple[Tensor, Tensor]:
            return module.weight.detach(), module.bias.detach()

        layers = tuple(GPT2Layer(ln_1=pair(b.ln_1), qkv=pair(b.attn.c_attn), o=pair(b.attn.c_proj), ln_2=pair(b.ln_2),
                                 fc=pair(b.mlp.c_fc), proj=pair(b.mlp.c_proj)) for b in model.h)
        return cls(cfg=model.cfg, layers=layers, wpe=model.wpe.weight.detach(), ln_f=pair(model.ln_f))

    @property
    def dtype(self) -> torch.dtype:
        return self.wpe.dtype

    def with_kernels(self, outputs_fn: Callable, norm_fn: Callable | None = None) -> "GPT2TableDecoder":
        return replace(self, outputs_fn=outputs_fn, norm_fn=norm_fn or self.norm_fn)

    def with_request_rows(self, rows: int | None) -> "GPT2TableDecoder":
        return replace(self, request_rows=rows)

    def _unrotated(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        d = self.cfg.head_dim
        return like.new_ones((n, d)), like.new_zeros((n, d))

    def decode_table(self, embeds: Tensor, positions: Tensor, ptr: Tensor, length: Tensor, window: int,
                     rows: int = 1) -> Tensor:
        """One token for each of S requests: embeds (S * rows, 1, C) at their positions (S,), caches
        through ``ptr``/``length`` (``CacheTable``) -> hidden after ``ln_f`` (S * rows, 1, C). Attention
        covers cache slots [0, window). Triton only (CUDA, or the interpreter)."""
        if embeds.dim() != 3 or embeds.shape[1] != 1:
            raise ValueError(f"decode takes one position (B, 1, C), got {tuple(embeds.shape)}")
        cfg = self.cfg
        # (S, C) -> (S * rows, 1, C); expand, not repeat_interleave (which reads its size on the host)
        pos_emb = self.wpe.index_select(0, positions)[:, None].expand(-1, rows, -1).reshape(-1, 1, cfg.hidden_size)
        h = embeds + pos_emb.to(embeds.dtype)
        cos, sin = self._unrotated(positions.shape[0], embeds)
        table = CacheTable(ptr, length, positions)

        def attend(i: int, qkv: Tensor) -> Tensor:
            heads = qkv.view(qkv.shape[0], 3 * cfg.num_heads, cfg.head_dim)
            return decode_attention_table(heads, cos, sin, table, i, cfg.num_heads, cfg.num_heads, window,
                                          rows)[:, None]

        return self._run_layers(h, attend)

    def prefill_table(self, embeds: Tensor, ptr: Tensor, length: Tensor, rows: int = 1) -> Tensor:
        """Positions 0..S-1 of S_req requests' prompts: embeds (S_req * rows, S, C) -> hidden after
        ``ln_f``, keys and values written into each request's stacked cache through the table; causal
        attention over the prompt itself."""
        cfg = self.cfg
        b, s, c = embeds.shape
        h = embeds + self.wpe[:s].to(embeds.dtype)

        def attend(i: int, qkv: Tensor) -> Tensor:
            q, k, v = (part.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2) for part in qkv.split(c, dim=2))
            write_kv_table(k, v, ptr, length, i, rows)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
            return out.transpose(1, 2).reshape(b, s, c)

        return self._run_layers(h, attend)

    def _run_layers(self, h: Tensor, attend: Callable[[int, Tensor], Tensor]) -> Tensor:
        eps, rows = self.cfg.layer_norm_eps, self.request_rows
        normed = per_request_rows(self.norm_fn, rows, (0,), h, *self.layers[0].ln_1, eps)
        last = len(self.layers) - 1
        for i, w in enumerate(self.layers):
            qkv = per_request_rows(conv1d, rows, (0,), normed, *w.qkv)
            attn = attend(i, qkv)
            following = self.ln_f if i == last else self.layers[i + 1].ln_1
            h, normed = per_request_rows(self.outputs_fn, rows, (0, 1), h, attn, *w.o, *w.ln_2, *w.fc, *w.proj,
                                         *following, eps)
        return normed

    def per_request(self, fn: Callable, x: Tensor) -> Tensor:
        """``fn(x)`` for a row-wise ``fn`` (the speech head), per request when ``request_rows`` is set."""
        return per_request_rows(fn, self.request_rows, (0,), x)


__all__ = ["GPT2Layer", "GPT2TableDecoder", "block_outputs", "conv1d"]
