"""One-token Llama decode on packed projection weights (the fast path of ``LlamaModel.decode``).

Same math as ``LlamaModel.decode`` for a single position, arranged for small-batch decoding:

* q/k/v projections are one GEMM on a packed ``(q + k + v, C)`` weight, gate/up one GEMM on a packed
  ``(2 * I, C)`` weight: 4 GEMMs a layer instead of 7.
* The work between GEMMs and attention is two pure functions per layer, ``attention_inputs`` and
  ``attention_outputs`` (tensors in, tensors out, no state, no cache access), which a pass may
  replace by compiled versions (``FusedDecoder.with_kernels``) so that the norms, rotary embedding
  and residual/activation elementwise work each become one kernel. A layer's closing residual add
  is fused with the next layer's input norm (the final norm after the last layer).
* Keys and values of the step are returned stacked ``(2, B, kv_heads, 1, D)`` and written with one
  ``index_copy_`` into a cache whose ``k`` and ``v`` are the two halves of one tensor
  (``allocate_stacked_cache``).
* The rotary inverse frequencies are built once, not per call; the attention mask is an additive
  float mask made once per token, not a boolean one converted in every layer.

Packing copies each layer's projection weights into one tensor and then points the module's
parameters at slices of it (``.data``), so weights are not held twice and the module's state dict is
unchanged (same keys, shapes and values). Pack after any dtype/device change of the weights: a later
``.data`` reassignment of a module parameter is not seen by the packed tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .llama import KVCache, LlamaConfig, LlamaModel, rope_inv_freq


@dataclass(frozen=True)
class PackedLayer:
    input_norm: Tensor  # (C,)
    qkv: Tensor  # (q + k + v, C)
    o: Tensor  # (C, q)
    post_norm: Tensor  # (C,)
    gate_up: Tensor  # (2 * I, C)
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
    """Pack every layer's projections (see the module docstring; the module's parameters become views).

    ``interleave_gate_up``: gate/up rows alternate (gate_0, up_0, gate_1, ...) as
    ``kernels.fused_gemv.rms_glu_linear`` reads them; the gate and up parameters become row-strided views.
    """
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


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm: statistics in float32, scaled in the activation dtype (as ``llama.RMSNorm``)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_inputs(normed: Tensor, qkv_w: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int, linear: Callable = F.linear) -> tuple[Tensor, Tensor]:
    """Normed input (B, 1, C) -> (q (B, H, 1, D) with rotary, stacked new k/v (2, B, kv_heads, 1, D)).

    Rotary is applied to q and k heads together and v is carried along, so a compiler emits one
    kernel for all three; q and k/v are views of that one result.
    """
    b = normed.shape[0]
    heads = linear(normed, qkv_w).view(b, 1, num_heads + 2 * num_kv_heads, head_dim)
    rotary = num_heads + num_kv_heads
    out = torch.cat((_rotate(heads[:, :, :rotary], cos, sin), heads[:, :, rotary:]), dim=2)
    q = out[:, :, :num_heads].transpose(1, 2)
    kv = out[:, :, rotary - num_kv_heads:].view(b, 1, 2, num_kv_heads, head_dim).permute(2, 0, 3, 1, 4)
    return q, kv


def attention_outputs(x: Tensor, attn: Tensor, o_w: Tensor, norm_w: Tensor, gate_up_w: Tensor, down_w: Tensor,
                      next_norm_w: Tensor, eps: float, linear: Callable = F.linear) -> tuple[Tensor, Tensor]:
    """Residual x (B, 1, C) + attention (B, H, 1, D) -> (layer output, it normed for the next layer).

    ``next_norm_w`` is the next layer's input norm, or the final norm after the last layer; the
    residual add and that norm then fuse into one kernel.
    """
    b = x.shape[0]
    h = x + linear(attn.transpose(1, 2).reshape(b, 1, -1), o_w)
    gate, up = linear(rms_norm(h, norm_w, eps), gate_up_w).chunk(2, dim=-1)
    out = h + linear(F.silu(gate) * up, down_w)
    return out, rms_norm(out, next_norm_w, eps)


def allocate_stacked_cache(cfg: LlamaConfig, batch: int, max_len: int, device: torch.device | str,
                           dtype: torch.dtype) -> KVCache:
    """A zeroed ``KVCache`` whose k and v are halves of one (layers, 2, B, kv_heads, max_len, D) tensor."""
    if max_len < 1 or max_len > cfg.max_position_embeddings:
        raise ValueError(f"cache length {max_len} outside 1..{cfg.max_position_embeddings}")
    kv = torch.zeros(cfg.num_layers, 2, batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype)
    return KVCache(kv[:, 0], kv[:, 1])


def stacked_view(cache: KVCache) -> Tensor | None:
    """The (layers, 2, B, kv_heads, L, D) tensor behind a stacked cache (or a window of one), else None."""
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
    """Packed weights + the two per-layer functions (eager by default, or compiled by a pass)."""

    cfg: LlamaConfig
    layers: tuple[PackedLayer, ...]
    final_norm: Tensor
    inv_freq: Tensor  # (D/2,) float32
    inputs_fn: Callable = attention_inputs
    outputs_fn: Callable = attention_outputs
    norm_fn: Callable = rms_norm
    # y = x @ W.T for the projections: F.linear, or e.g. kernels.small_m_linear (a pass sets it).
    linear_fn: Callable = F.linear
    # (qkv (B, H + 2 KVH, D), cos (D,), sin (D,), layer cache (2, B, KVH, L, D), position (1,), H, KVH)
    # -> (B, H * D), writing the step's key/value into the cache: e.g. kernels.decode_attention (a
    # pass sets it). None: rotary in ``inputs_fn``, index_copy_ and SDPA.
    attend_fn: Callable | None = None
    # Norms, SiLU gate and residual adds inside the projections (kernels/fused_gemv.py): five
    # launches a layer plus attention's. Uses ``attend_fn`` (or its torch reference when None).
    gemv_fusion: bool = False
    # gate/up rows interleaved (pack(..., interleave_gate_up=True)): only the gemv_fusion path reads them.
    gate_up_interleaved: bool = False

    @classmethod
    def pack(cls, model: LlamaModel, interleave_gate_up: bool = False) -> "FusedDecoder":
        device = model.norm.weight.device
        return cls(cfg=model.cfg, layers=pack_layers(model, interleave_gate_up), final_norm=model.norm.weight.detach(),
                   inv_freq=rope_inv_freq(model.cfg, device), gate_up_interleaved=interleave_gate_up)

    def with_linear(self, linear_fn: Callable) -> "FusedDecoder":
        return replace(self, linear_fn=linear_fn)

    def with_attention(self, attend_fn: Callable) -> "FusedDecoder":
        return replace(self, attend_fn=attend_fn)

    def with_gemv_fusion(self, on: bool = True) -> "FusedDecoder":
        return replace(self, gemv_fusion=on)

    def with_kernels(self, inputs_fn: Callable, outputs_fn: Callable, norm_fn: Callable | None = None) -> "FusedDecoder":
        return replace(self, inputs_fn=inputs_fn, outputs_fn=outputs_fn, norm_fn=norm_fn or self.norm_fn)

    def rope(self, position: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # (1, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def decode(self, embeds: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """``LlamaModel.decode`` for one token: embeds (B, 1, C) at ``position`` (1,) -> normed hidden (B, 1, C).

        ``cache`` must be stacked (``allocate_stacked_cache``, or a window of one); its batch is B.
        """
        cfg = self.cfg
        if embeds.dim() != 3 or embeds.shape[1] != 1:
            raise ValueError(f"fused decode takes one position (B, 1, C), got {tuple(embeds.shape)}")
        kv = stacked_view(cache)
        if kv is None:
            raise ValueError("fused decode needs a stacked KV cache (see allocate_stacked_cache)")
        if kv.shape[0] != cfg.num_layers or kv.shape[2] != embeds.shape[0]:
            raise ValueError(f"cache (layers {kv.shape[0]}, batch {kv.shape[2]}) does not fit "
                             f"{cfg.num_layers} layers x batch {embeds.shape[0]}")
        cos, sin = self.rope(position, embeds.dtype)
        if self.gemv_fusion:
            return self._decode_fused_gemv(embeds, position, kv, cos[0], sin[0])
        if self.gate_up_interleaved:
            raise ValueError("interleaved gate/up weights are read by the gemv_fusion decode only")
        if self.attend_fn is None:
            slots = torch.arange(kv.shape[4], device=embeds.device)
            # Additive float mask built once per token (a bool mask would be converted in every layer).
            visible = (slots[None, :] <= position[:, None])[None, None]  # (1, 1, 1, L)
            mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~visible, float("-inf"))
        b, heads, head_dim = embeds.shape[0], cfg.num_heads, cfg.head_dim
        groups = cfg.num_heads // cfg.num_kv_heads
        eps = cfg.rms_norm_eps
        x = embeds
        normed = self.norm_fn(x, self.layers[0].input_norm, eps)
        last = len(self.layers) - 1
        for i, w in enumerate(self.layers):
            layer_kv = kv[i]  # (2, B, kvH, L, D)
            if self.attend_fn is not None:
                qkv = self.linear_fn(normed, w.qkv).view(b, heads + 2 * cfg.num_kv_heads, head_dim)
                attn = self.attend_fn(qkv, cos[0], sin[0], layer_kv, position, heads, cfg.num_kv_heads)
                attn = attn.view(b, 1, heads, head_dim).transpose(1, 2)
            else:
                q, new_kv = self.inputs_fn(normed, w.qkv, cos, sin, heads, cfg.num_kv_heads, head_dim,
                                           self.linear_fn)
                # In-place by design, as LlamaModel.decode (see llama.py on the cache's autograd mode).
                layer_kv.index_copy_(3, position, new_kv.to(layer_kv.dtype))
                k, v = layer_kv[0], layer_kv[1]
                if groups > 1:
                    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            next_norm = self.final_norm if i == last else self.layers[i + 1].input_norm
            x, normed = self.outputs_fn(x, attn, w.o, w.post_norm, w.gate_up, w.down, next_norm, eps,
                                        self.linear_fn)
        return normed

    def _decode_fused_gemv(self, embeds: Tensor, position: Tensor, kv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        from ...kernels.decode_attention import reference_decode_attention
        from ...kernels.fused_gemv import glu_linear, residual_linear, rms_glu_linear, rms_linear

        cfg = self.cfg
        attend = self.attend_fn or reference_decode_attention
        b, eps = embeds.shape[0], cfg.rms_norm_eps
        x = embeds
        for i, w in enumerate(self.layers):
            qkv = rms_linear(x, w.input_norm, w.qkv, eps).view(b, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
            attn = attend(qkv, cos, sin, kv[i], position, cfg.num_heads, cfg.num_kv_heads).view(b, 1, -1)
            h = residual_linear(attn, w.o, x)
            if self.gate_up_interleaved:
                x = residual_linear(rms_glu_linear(h, w.post_norm, w.gate_up, eps), w.down, h)
            else:
                x = glu_linear(rms_linear(h, w.post_norm, w.gate_up, eps), w.down, h)
        return self.norm_fn(x, self.final_norm, eps)
