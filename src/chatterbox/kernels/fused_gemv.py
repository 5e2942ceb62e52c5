"""The small-M GEMV with the work around a Llama projection folded in: norm prologue, SiLU-gate
epilogue, residual epilogue.

In T3's decode every projection is surrounded by a cheap elementwise kernel: the RMS norm before
q/k/v and gate/up, SiLU(gate) * up before down, the residual add after o and down. Each of those is
a launch of its own (~1-1.5 us on an H100, 30 layers, every token). Here they run inside the GEMV
(the same weight-streaming fma loop as ``small_m_linear``, same tile configs):

* ``rms_linear(x, g, w, eps)``  = ``F.linear(rms_norm(x, g, eps), w)``, computed as
  ``rsqrt(mean(x^2) + eps) * ((x * g) @ w.T)``: the sum of squares accumulates in the same pass as
  the products, so the row is read once, and the normalised input is not rounded to the activation
  dtype on the way (the unfused norm rounds it twice), a difference of the order of that rounding;
* ``residual_linear(x, w, residual)`` = ``residual + F.linear(x, w)``;
* ``rms_glu_linear(x, g, w_interleaved, eps)`` = ``silu(gate) * up`` of ``rms_linear`` on gate/up
  weights whose rows interleave (``interleave_rows``), the activation as the GEMV's epilogue.

The GEMV result is rounded to the activation dtype before the residual is added (as the unfused
code adds two rounded tensors); the add is fp32, rounded once. Off CUDA, for M > 8, split-K configs
or unsupported dtypes, each function runs its plain torch composition instead (exact reference).
The kernels are launched directly (no custom op): they are meant for eager code and CUDA-graph
capture, not for ``torch.compile``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..nn.norm import rms_norm

from .small_m_linear import MAX_M, SUPPORTED_DTYPES, VECTOR_BYTES, SmallMConfig, _next_pow2, _sms_of, config_for

PRO_NONE, PRO_RMS = 0, 1


@triton.jit
def _load_x(ptrs, mask, UNMASKED: tl.constexpr):
    if UNMASKED:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fused_gemv_kernel(x_ptr, g_ptr, w_ptr, res_ptr, out_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_om,
                       eps,
                       PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, VEC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                       EVEN_M: tl.constexpr, GLU_OUT: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None, None]
    dt = out_ptr.dtype.element_ty
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    sq = tl.zeros([M_PAD, 1, BLOCK_K], tl.float32)
    w_ptrs = w_ptr + offs_n[None, :, None] * stride_wn + offs_k[None, None, :]
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = ((k0 + offs_k) < K)[None, None, :]
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, mask=(offs_n < N)[None, :, None] & k_ok, other=0.0,
                        eviction_policy="evict_first")
        cols = (k0 + offs_k)[None, None, :]
        x = _load_x(x_rows + cols, m_ok & k_ok, EVEN_M and EVEN_K)
        if PROLOGUE == 1:
            sq += x * x
            x = x * _load_x(g_ptr + cols, k_ok, EVEN_K)
        prod = x * w.to(tl.float32)
        acc += tl.sum(tl.reshape(prod, [M_PAD, BLOCK_N, BLOCK_K // VEC, VEC]), axis=3)
    y = tl.sum(acc, axis=2)
    if PROLOGUE == 1:
        y = y * tl.rsqrt(tl.sum(sq, axis=2) / K + eps)
    y = y.to(dt)
    if GLU_OUT:  # rows of w interleave gate and up: column pairs (2j, 2j + 1) -> silu(gate_j) * up_j
        gate, up = tl.split(tl.reshape(y.to(tl.float32), [M_PAD, BLOCK_N // 2, 2]))
        y = (gate * tl.sigmoid(gate) * up).to(dt)
        offs_n = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        N = N // 2
    out_off = offs_m[:, None] * stride_om + offs_n[None, :]
    ok2 = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if RESIDUAL:
        r = tl.load(res_ptr + out_off, mask=ok2, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(dt)
    tl.store(out_ptr + out_off, y, mask=ok2)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _kernel_ok(x2: Tensor, weight: Tensor, cfg: SmallMConfig) -> bool:
    return (x2.device.type == "cuda" and weight.device == x2.device and x2.dtype == weight.dtype
            and x2.dtype in SUPPORTED_DTYPES and weight.is_contiguous() and 1 <= x2.shape[0] <= MAX_M
            and cfg.mode == "fma" and cfg.split_k == 1
            and not (torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad)))


def _launch(x2: Tensor, weight: Tensor, k: int, prologue: int, g: Tensor | None, residual: Tensor | None,
            eps: float, cfg: SmallMConfig, glu_out: bool = False) -> Tensor:
    m, n = x2.shape[0], weight.shape[0]
    x2 = x2.contiguous()
    out = torch.empty((m, n // 2 if glu_out else n), dtype=x2.dtype, device=x2.device)
    res = residual.reshape(m, n).contiguous() if residual is not None else out
    _fused_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, g if g is not None else weight, weight, res, out, m, n, k, x2.stride(0), weight.stride(0),
        out.stride(0), eps, PROLOGUE=prologue, RESIDUAL=residual is not None, M_PAD=_next_pow2(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, VEC=min(cfg.block_k, VECTOR_BYTES // x2.element_size()),
        EVEN_K=k % cfg.block_k == 0, EVEN_N=n % cfg.block_n == 0, EVEN_M=m == _next_pow2(m), GLU_OUT=glu_out,
        num_warps=cfg.num_warps)
    return out


def _config(x2: Tensor, weight: Tensor, cfg: SmallMConfig | None) -> SmallMConfig:
    return cfg or config_for(x2.shape[0], weight.shape[0], weight.shape[1], weight.dtype, _sms_of(x2))


def rms_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float, cfg: SmallMConfig | None = None) -> Tensor:
    """``F.linear(rms_norm(x, norm_weight, eps), weight)``: x (..., K), weight (N, K) -> (..., N)."""
    x2 = _rows(x)
    c = _config(x2, weight, cfg)
    if not _kernel_ok(x2, weight, c) or norm_weight.dtype != x.dtype:
        return F.linear(rms_norm(x, norm_weight, eps), weight)
    out = _launch(x2, weight, x2.shape[1], PRO_RMS, norm_weight.contiguous(), None, eps, c)
    return out.view(*x.shape[:-1], weight.shape[0])


def interleave_rows(gate: Tensor, up: Tensor) -> Tensor:
    """(I, K) gate and up weights -> (2I, K) with rows gate_0, up_0, gate_1, up_1, ... (``rms_glu_linear``'s layout)."""
    return torch.stack((gate, up), dim=1).reshape(-1, gate.shape[1])


def rms_glu_linear(x: Tensor, norm_weight: Tensor, gate_up: Tensor, eps: float,
                   cfg: SmallMConfig | None = None) -> Tensor:
    """``silu(gate) * up`` of ``F.linear(rms_norm(x, norm_weight, eps), W)`` for W = ``gate_up`` with
    interleaved rows (``interleave_rows``): x (..., K) -> (..., I). The pair of a gate and an up row
    is in one program, so the activation is the GEMV's epilogue and the (..., 2I) product is never
    stored; gate and up are rounded to the activation dtype first, as the unfused code stores them."""
    x2 = _rows(x)
    c = _config(x2, gate_up, cfg)
    if not _kernel_ok(x2, gate_up, c) or norm_weight.dtype != x.dtype or c.block_n % 2:
        both = F.linear(rms_norm(x, norm_weight, eps), gate_up)
        gate, up = both[..., 0::2], both[..., 1::2]
        return F.silu(gate) * up
    out = _launch(x2, gate_up, x2.shape[1], PRO_RMS, norm_weight.contiguous(), None, eps, c, glu_out=True)
    return out.view(*x.shape[:-1], gate_up.shape[0] // 2)


def residual_linear(x: Tensor, weight: Tensor, residual: Tensor, cfg: SmallMConfig | None = None) -> Tensor:
    """``residual + F.linear(x, weight)``."""
    x2 = _rows(x)
    c = _config(x2, weight, cfg)
    if not _kernel_ok(x2, weight, c) or residual.dtype != x.dtype:
        return residual + F.linear(x, weight)
    out = _launch(x2, weight, x2.shape[1], PRO_NONE, None, residual, 0.0, c)
    return out.view(*x.shape[:-1], weight.shape[0])
