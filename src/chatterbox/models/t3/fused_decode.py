"""One-token Llama decode on packed projection weights (the fast path of ``LlamaModel.decode``).

Same math as ``LlamaModel.decode`` for a single position, arranged for small-batch decoding:

* q/k/v projections are one GEMM on a packed ``(q + k + v, C)`` weight, gate/up one GEMM on a packed
  ``(2 * I, C)`` weight: 4 GEMMs a layer instead of 7.
* Attention of a layer is a function ``attend(layer, qkv) -> attn`` given by the caller: rotary, the
  write of the step's key/value into the request's cache and attention over it. ``decode`` passes
  the torch reference or the Triton kernel over one request's cache tensor; ``decode_table`` the
  Triton kernel over a table of requests' caches (one captured step serves any requests).
* Without GEMV fusion, the work after attention is one pure function per layer (``attention_outputs``:
  output projection, residual, norm, gate/up, SiLU gate, down projection, residual, the next layer's
  norm), which a pass may replace by a compiled version (``with_kernels``). With GEMV fusion
  (``kernels/fused_gemv.py``) the norms, the SiLU gate and the residual adds run inside the
  projections: five launches a layer plus attention's; gate/up rows are then interleaved
  (gate_0, up_0, gate_1, ...) so SiLU(gate) * up is the gate/up GEMV's epilogue.

Packing copies each layer's projection weights into one tensor and points the module's parameters
at slices of it (``.data``), so weights are not held twice and the module's state dict is unchanged
(same keys, shapes and values). Pack after any dtype/device change of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels.decode_attention import (CacheTable, decode_attention_table, reference_decode_attention,
                                         write_kv_table)
from ...kernels.fused_gemv import residual_linear, rms_glu_linear, rms_linear
from ...nn.norm import rms_norm
from ...nn.rotary import apply_rotary
from .llama import KVCache, LlamaConfig, LlamaModel, rope_inv_freq

# attend(layer index, qkv (B, S, H + 2 KVH, D)) -> (B, S, H * D), writing the keys/values into the cache
Attend = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class PackedLayer:
    input_norm: Tensor  # (C,)
    qkv: Tensor  # (q + k + v, C)
    o: Tensor  # (C, q)
    post_norm: Tensor  # (C,)
    gate_up: Tensor  # (2 * I, C): [gate; up], or interleaved rows for the GEMV fusion
    down: Tensor  # (C, I)


def _pack_rows(linears) -> Tensor:
    packed = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = packed[row:row + n]
        row += n
    return packed


def _pack_interleaved(gate: torch.nn.Linear, up: torch.nn.Linear) -> Tensor:
    packed = torch.stack((gate.weight.detach(), up.weight.detach()), dim=1).reshape(-1, gate.weight.shape[1])
    gate.weight.data = packed[0::2]
    up.weight.data = packed[1::2]
    return packed


def pack_layers(model: LlamaModel, interleave_gate_up: bool = False) -> tuple[PackedLayer, ...]:
    """Pack every layer's projections (the module's parameters become views of the packed tensors)."""
    layers = []
    with torch.no_grad():
        for layer in model.layers:
            att, mlp = layer.self_attn, layer.mlp
            layers.append(PackedLayer(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=_pack_rows((att.q_proj, att.k_proj, att.v_proj)),
                o=att.o_proj.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=(_pack_interleaved(mlp.gate_proj, mlp.up_proj) if interleave_gate_up
                         else _pack_rows((mlp.gate_proj, mlp.up_proj))),
                down=mlp.down_proj.weight.detach(),
            ))
    return tuple(layers)


def attention_outputs(x: Tensor, attn: Tensor, o_w: Tensor, norm_w: Tensor, gate_up_w: Tensor, down_w: Tensor,
                      next_norm_w: Tensor, eps: float, linear: Callable = F.linear) -> tuple[Tensor, Tensor]:
    """Residual x (B, 1, C) + attention (B, 1, H * D) -> (layer output, it normed for the next layer).

    ``next_norm_w`` is the next layer's input norm, or the final norm after the last layer; the
    residual add and that norm then fuse into one kernel when compiled.
    """
    h = x + linear(attn, o_w)
    gate, up = linear(rms_norm(h, norm_w, eps), gate_up_w).chunk(2, dim=-1)
    out = h + linear(F.silu(gate) * up, down_w)
    return out, rms_norm(out, next_norm_w, eps)


def allocate_stacked_cache(cfg: LlamaConfig, batch: int, max_len: int, device: torch.device | str,
                           dtype: torch.dtype) -> KVCache:
    """A zeroed ``KVCache`` whose k and v are halves of one (layers, 2, B, kv_heads, max_len, D) tensor
    (the layout ``CacheTable`` addresses)."""
    if max_len < 1 or max_len > cfg.max_position_embeddings:
        raise ValueError(f"cache length {max_len} outside 1..{cfg.max_position_embeddings}")
    kv = torch.zeros(cfg.num_layers, 2, batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype)
    return KVCache(kv[:, 0], kv[:, 1])


def stacked_view(cache: KVCache) -> Tensor | None:
    """The (layers, 2, B, kv_heads, L, D) tensor behind a stacked cache, else None."""
    k, v = cache.k, cache.v
    if k.shape != v.shape or k.stride() != v.stride() or k.dtype != v.dtype or k.device != v.device:
        return None
    if k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
        return None  # two allocations: no single tensor spans both
    step = v.data_ptr() - k.data_ptr()
    if step <= 0 or step % k.element_size():
        return None
    offset = step // k.element_size()
    size = (k.shape[0], 2, *k.shape[1:])
    stride = (k.stride(0), offset, *k.stride()[1:])
    return k.as_strided(size, stride)


@dataclass(frozen=True)
class FusedDecoder:
    """Packed weights + the per-layer functions (eager by default, or compiled by the engine)."""

    cfg: LlamaConfig
    layers: tuple[PackedLayer, ...]
    final_norm: Tensor
    inv_freq: Tensor  # (D/2,) float32
    outputs_fn: Callable = attention_outputs
    norm_fn: Callable = rms_norm
    # y = x @ W.T for the projections: F.linear, or e.g. kernels.small_m_linear.
    linear_fn: Callable = F.linear
    # The one-request attention of ``decode``: the torch reference, or kernels.decode_attention.
    attend_fn: Callable = reference_decode_attention
    # Norms, SiLU gate and residual adds inside the projections (needs interleaved gate/up rows).
    gemv_fusion: bool = False
    # When set, every projection runs on groups of this many rows (one request's CFG pair) on its own,
    # so a request's numbers never depend on how many others share its step (CPU GEMMs block by the
    # row count). None: one projection over the whole batch.
    request_rows: int | None = None

    @classmethod
    def pack(cls, model: LlamaModel, gemv_fusion: bool = False) -> "FusedDecoder":
        device = model.norm.weight.device
        return cls(cfg=model.cfg, layers=pack_layers(model, interleave_gate_up=gemv_fusion),
                   final_norm=model.norm.weight.detach(), inv_freq=rope_inv_freq(model.cfg, device),
                   gemv_fusion=gemv_fusion)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.dtype

    def with_linear(self, linear_fn: Callable) -> "FusedDecoder":
        return replace(self, linear_fn=linear_fn)

    def with_attention(self, attend_fn: Callable) -> "FusedDecoder":
        return replace(self, attend_fn=attend_fn)

    def with_request_rows(self, rows: int | None) -> "FusedDecoder":
        return replace(self, request_rows=rows)

    def with_kernels(self, outputs_fn: Callable, norm_fn: Callable | None = None) -> "FusedDecoder":
        return replace(self, outputs_fn=outputs_fn, norm_fn=norm_fn or self.norm_fn)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Integer positions (S,) -> cos, sin (S, D) in ``dtype`` (halves repeated)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def decode(self, embeds: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """``LlamaModel.decode`` for one token of one request: embeds (B, 1, C) at ``position`` (1,) ->
        normed hidden (B, 1, C). ``cache`` must be stacked (``allocate_stacked_cache``); its batch is B."""
        cfg = self.cfg
        self._check_embeds(embeds)
        kv = stacked_view(cache)
        if kv is None:
            raise ValueError("fused decode needs a stacked KV cache (see allocate_stacked_cache)")
        if kv.shape[0] != cfg.num_layers or kv.shape[2] != embeds.shape[0]:
            raise ValueError(f"cache (layers {kv.shape[0]}, batch {kv.shape[2]}) does not fit "
                             f"{cfg.num_layers} layers x batch {embeds.shape[0]}")
        cos, sin = self.rope(position.reshape(1), embeds.dtype)
        heads, kv_heads, attend = cfg.num_heads, cfg.num_kv_heads, self.attend_fn

        def attend_one(i: int, qkv: Tensor) -> Tensor:
            return attend(qkv[:, 0], cos[0], sin[0], kv[i], position, heads, kv_heads)[:, None]

        return self.run_layers(embeds, attend_one)

    def decode_table(self, embeds: Tensor, positions: Tensor, ptr: Tensor, length: Tensor, window: int,
                     rows: int = 2) -> Tensor:
        """One token for each of S requests: embeds (S * rows, 1, C), their positions (S,), and the
        addresses/lengths of their stacked caches (see ``CacheTable``) -> normed hidden (S * rows, 1, C).
        Attention covers cache slots [0, window). Triton only (CUDA, or the interpreter)."""
        cfg = self.cfg
        self._check_embeds(embeds)
        cos, sin = self.rope(positions, embeds.dtype)
        table = CacheTable(ptr, length, positions)
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads

        def attend_table(i: int, qkv: Tensor) -> Tensor:
            return decode_attention_table(qkv[:, 0], cos, sin, table, i, heads, kv_heads, window, rows)[:, None]

        return self.run_layers(embeds, attend_table)

    def prefill_table(self, embeds: Tensor, ptr: Tensor, length: Tensor, rows: int = 2) -> Tensor:
        """Positions 0..S-1 of S_req requests' prompts: embeds (S_req * rows, S, C) -> normed hidden
        (S_req * rows, S, C), keys and values written into each request's stacked cache through the
        table (``kernels.decode_attention.write_kv_table``); causal attention over the prompt itself."""
        cfg = self.cfg
        s = embeds.shape[1]
        cos, sin = self.rope(torch.arange(s, device=embeds.device), embeds.dtype)  # (S, D)
        cos, sin = cos[:, None], sin[:, None]  # (S, 1, D): broadcast over heads
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        groups = heads // kv_heads

        def attend_prompt(i: int, qkv: Tensor) -> Tensor:
            b = qkv.shape[0]
            q = apply_rotary(qkv[:, :, :heads], cos, sin).transpose(1, 2)  # (B, H, S, D)
            k = apply_rotary(qkv[:, :, heads:heads + kv_heads], cos, sin).transpose(1, 2)  # (B, KVH, S, D)
            v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
            write_kv_table(k, v, ptr, length, i, rows)
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
            return out.transpose(1, 2).reshape(b, s, heads * cfg.head_dim)

        return self.run_layers(embeds, attend_prompt)

    @staticmethod
    def _check_embeds(embeds: Tensor) -> None:
        if embeds.dim() != 3 or embeds.shape[1] != 1:
            raise ValueError(f"fused decode takes one position (B, 1, C), got {tuple(embeds.shape)}")

    def run_layers(self, embeds: Tensor, attend: Attend) -> Tensor:
        """The decoder stack on (B, S, C) with ``attend`` for each layer's attention -> normed hidden."""
        cfg = self.cfg
        b, s = embeds.shape[:2]
        eps = cfg.rms_norm_eps
        width = cfg.num_heads + 2 * cfg.num_kv_heads
        x = embeds
        grouped = self._grouped
        if self.gemv_fusion:
            for i, w in enumerate(self.layers):
                qkv = grouped(rms_linear, (0,), x, w.input_norm, w.qkv, eps).view(b, s, width, cfg.head_dim)
                h = grouped(residual_linear, (0, 2), attend(i, qkv), w.o, x)
                gate = grouped(rms_glu_linear, (0,), h, w.post_norm, w.gate_up, eps)
                x = grouped(residual_linear, (0, 2), gate, w.down, h)
            return self.norm_fn(x, self.final_norm, eps)
        normed = self.norm_fn(x, self.layers[0].input_norm, eps)
        last = len(self.layers) - 1
        for i, w in enumerate(self.layers):
            qkv = grouped(self.linear_fn, (0,), normed, w.qkv).view(b, s, width, cfg.head_dim)
            attn = attend(i, qkv)
            next_norm = self.final_norm if i == last else self.layers[i + 1].input_norm
            x, normed = grouped(self.outputs_fn, (0, 1), x, attn, w.o, w.post_norm, w.gate_up, w.down, next_norm,
                                eps, self.linear_fn)
        return normed

    def per_request(self, fn: Callable, x: Tensor) -> Tensor:
        """``fn(x)`` for a row-wise ``fn`` (the speech head), per request when ``request_rows`` is set."""
        return per_request_rows(fn, self.request_rows, (0,), x)

    def _grouped(self, fn: Callable, row_args: tuple[int, ...], *args):
        return per_request_rows(fn, self.request_rows, row_args, *args)


def per_request_rows(fn: Callable, rows: int | None, row_args: tuple[int, ...], *args):
    """``fn(*args)``, or with ``rows`` set, ``fn`` on each request's ``rows`` rows of the arguments at
    ``row_args`` (the ones that carry the batch), joined back."""
    b = args[0].shape[0]
    if rows is None or b <= rows:
        return fn(*args)
    parts = []
    for lo in range(0, b, rows):
        part = [a[lo:lo + rows] if i in row_args else a for i, a in enumerate(args)]
        parts.append(fn(*part))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(ps, dim=0) for ps in zip(*parts))
    return torch.cat(parts, dim=0)


__all__ = ["Attend", "FusedDecoder", "PackedLayer", "allocate_stacked_cache", "attention_outputs", "pack_layers",
           "per_request_rows", "stacked_view"]
