"""Building blocks of the CFM estimator (the causal 1-D U-Net in ``decoder.py``).

Submodule names reproduce the published checkpoint keys: the convolution blocks keep the
``block.0`` (conv) / ``block.2`` (LayerNorm) slots, the transformer blocks use the diffusers
``BasicTransformerBlock`` layout (``norm1``, ``attn1.to_q`` ..., ``norm3``, ``ff.net.0.proj``,
``ff.net.2``).

Masks are ``(B, 1, T)`` float tensors of 0/1, or ``None`` when no frame is padded: multiplying by a
mask of ones is exact, so the ``None`` path skips those products and gives identical numbers. For the
same reason masking twice equals masking once, which lets the decoder mask each resnet input once
(``CausalResnetBlock1D`` takes its input already masked) with bit-identical results.

Everything here traces into one ``torch.compile`` graph (no host syncs, no value-dependent Python
branches; ``tests/test_estimator_compile.py`` checks it with ``fullgraph=True``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.conv import Conv1d

# Additive attention bias for padded keys, as upstream's mask_to_bias writes it.
PADDED_KEY_BIAS = -1.0e10


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def channels_first(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> contiguous (B, C, T), zero on padded frames when there is a mask.

    Same numbers as ``apply_mask(h.transpose(1, 2).contiguous(), mask)``, but with a mask the product
    writes the transposed layout directly: one kernel instead of a copy and a product. Autograd does
    not take ``out=``, so when it would record the product the two-step form is used.
    """
    x = h.transpose(1, 2)
    if mask is None:
        return x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or mask.requires_grad):
        return x.contiguous() * mask
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, mask.dtype), device=x.device)
    return torch.mul(x, mask, out=out)


def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, T) 0/1 mask -> (B, 1, 1, T) additive SDPA bias, or ``None`` without padding.

    A row whose frames are all padded gets a zero bias (upstream un-masks such rows so that the
    softmax stays finite; their outputs are multiplied by the mask later anyway).
    """
    if mask is None:
        return None
    valid = mask.bool()  # (B, 1, T)
    valid = valid | (valid.sum(dim=-1, keepdim=True) == 0)
    # built in float32 and cast once: in float16 the bias rounds to -inf, and 0 * -inf would be NaN
    bias = ((1.0 - valid.float()) * PADDED_KEY_BIAS).to(dtype)
    return bias.unsqueeze(1)  # (B, 1, 1, T): broadcast over heads and queries


def sinusoidal_embedding(t: torch.Tensor, dim: int, time_scale: float, max_period: float) -> torch.Tensor:
    """(B,) diffusion times -> (B, dim) [sin | cos] features, frequencies spaced as upstream's."""
    half = dim // 2
    step = math.log(max_period) / (half - 1)
    # float32 frequencies whatever t's dtype, matching the reference numerics
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -step)  # (half,)
    t = t.reshape(-1)
    args = (time_scale * t).unsqueeze(1) * freqs.unsqueeze(0)  # (B, half)
    return torch.cat((args.sin(), args.cos()), dim=-1).to(t.dtype)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal time features (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class CausalConv1d(Conv1d):
    """Stride-1 convolution that only looks back: ``kernel_size - 1`` zeros are padded on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        self.left_pad = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CausalBlock1D(nn.Module):
    """Causal conv -> channel LayerNorm -> Mish, masked before and after."""

    def __init__(self, dim: int, dim_out: int, kernel_size: int, eps: float):
        super().__init__()
        # slots 1 and 3 held upstream's transposes; only 0 and 2 carry weights
        self.block = nn.ModuleList([
            CausalConv1d(dim, dim_out, kernel_size),
            nn.Identity(),
            ChannelLayerNorm(dim_out, eps=eps),
        ])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.forward_masked(apply_mask(x, mask), mask)

    def forward_masked(self, x_masked: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``forward`` for an input that is already zero on padded frames (skips that product)."""
        conv, _, norm = self.block
        h = F.mish(norm(conv(x_masked)))
        return apply_mask(h, mask)


class CausalResnetBlock1D(nn.Module):
    """Two causal blocks with the time embedding added in between, plus a 1x1 residual projection.

    ``forward`` takes the input already masked and the time embedding already through Mish: both are
    shared by every resnet of the decoder, so it computes them once per call.
    """

    def __init__(self, dim: int, dim_out: int, time_dim: int, kernel_size: int, eps: float):
        super().__init__()
        # slot 0 was upstream's Mish module; the activation is applied functionally
        self.mlp = nn.ModuleList([nn.Identity(), nn.Linear(time_dim, dim_out)])
        self.block1 = CausalBlock1D(dim, dim_out, kernel_size, eps)
        self.block2 = CausalBlock1D(dim_out, dim_out, kernel_size, eps)
        self.res_conv = Conv1d(dim, dim_out, 1)

    def forward(self, x_masked: torch.Tensor, mask: torch.Tensor | None, t_act: torch.Tensor) -> torch.Tensor:
        """x_masked: (B, C_in, T), zero on padded frames; t_act: (B, time_dim), Mish(time embedding)."""
        h = self.block1.forward_masked(x_masked, mask)  # (B, C_out, T)
        h = h + self.mlp[1](t_act).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x_masked)


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; q/k/v projections without bias, output with bias.

    The three projections keep their own ``Linear`` (checkpoint keys) but run as one GEMM on their
    stacked weights: one wider matrix product instead of three narrow ones.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        weight = torch.cat((self.to_q.weight, self.to_k.weight, self.to_v.weight))  # (3 * inner, dim)
        qkv = F.linear(x, weight).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), strided views
        # default SDPA scale is head_dim ** -0.5, the reference scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.to_out[0](out)


class GeluProjection(nn.Module):
    """Linear followed by exact GELU (key ``proj``)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        # slot 1 was dropout (inactive at inference)
        self.net = nn.ModuleList([GeluProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and GELU feed-forward, each with a residual; works on (B, T, C)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_mult: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = SelfAttention(dim, num_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, dim * ff_mult)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x
