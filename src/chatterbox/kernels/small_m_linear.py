"""``y = x @ W.T`` for a handful of rows (M <= 8): a weight-streaming Triton GEMV.

T3 decodes one token at a time with classifier-free guidance, so every projection multiplies two
rows by a large bf16 weight. That is pure weight traffic (the weight is read once, x is tiny), and
cuBLAS's GEMM kernels reach only a fraction of HBM bandwidth at that size. This kernel is built for
that regime:

* a program owns ``block_n`` output columns (rows of W) and walks its slice of K in ``block_k``
  tiles; each thread loads one 16-byte vector per W row per tile (evict-first: W is streamed once),
  and the x tile (a few KiB, L1/L2 resident) alongside it;
* ``fma`` mode (the default) multiplies in fp32 on the CUDA cores with the K loop unrolled at compile
  time; x and W tiles share one register layout, partial sums stay in registers per thread, and the
  cross-thread sum over K happens once at the end, so the loop has no barriers and loads run ahead.
  ``dot`` mode pads x to 16 rows and uses ``tl.dot``, which gets Triton's multi-stage (cp.async)
  pipelining of the W tiles instead; the benchmark's sweep compares the two;
* optional split-K (``split_k > 1``, for a small N with a long K): each (column block, K slice)
  program writes an fp32 partial to a (split_k, M, N) workspace and a second tiny kernel sums the
  slices in a fixed order, so the result is deterministic (no atomics).

Accumulation is fp32 for every input dtype (bf16, fp16, fp32; fp32 ``dot`` uses IEEE precision, not
TF32); the output has x's dtype.

Block sizes come from a fixed table for T3's four decode shapes and a bandwidth heuristic otherwise
(``config_for``). Nothing is autotuned at call time, so the op is safe to call inside CUDA-graph
capture and inside ``torch.compile``; ``eval/bench_small_m_linear.py --sweep`` times candidate
configs on a GPU for updating ``TUNED``.

``small_m_linear(x, weight)`` is the entry point: x (..., K), weight (N, K) -> (..., N). It calls the
``chatterbox::small_m_linear`` custom op (a ``torch.library.triton_op``, which torch.compile traces
into and inductor launches directly) when the call qualifies, and exactly ``F.linear`` otherwise
(CPU, M > 8, unsupported or mixed dtypes, non-contiguous weight, autograd).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

OP_NAME = "chatterbox::small_m_linear"
MAX_M = 8
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VECTOR_BYTES = 16  # one vectorised load per thread: 8 bf16/fp16 or 4 fp32 elements
WARP = 32
DOT_MIN_ROWS = 16  # tl.dot needs every dimension >= 16: x is padded to this many rows in dot mode
REDUCE_BLOCK = 1024  # elements of (M, N) per program of the split-K reduction
DEFAULT_SMS = 132  # H100 SXM; used only when the device cannot be queried

# heuristic_config's knobs
FMA_WARPS = 4  # block_k = VECTOR_BYTES / elem_bytes * 32 * FMA_WARPS: one 16-byte vector per thread per row
MAX_BLOCK_N = 8  # W rows per program: 8 x 16-byte loads per thread per K tile
MIN_BLOCK_N = 2
MAX_ACC_ROWS = 32  # cap on M_PAD * block_n (the per-thread fp32 accumulators)
PROGRAMS_PER_SM = 3  # shrink block_n, then split K, until the grid has this many programs per SM


@dataclass(frozen=True)
class SmallMConfig:
    """Launch parameters of the GEMV kernel.

    block_n: output columns (rows of W) per program, a power of two (>= 16 in dot mode).
    block_k: K elements per tile, a power of two (>= 16 in dot mode). In fma mode it is best equal to
        (16 / element size) * 32 * num_warps, one 16-byte vector per thread and row.
    split_k: K slices, each its own program; > 1 adds the deterministic reduction kernel.
    num_warps / num_stages: Triton launch options (num_stages is the dot loop's pipeline depth).
    mode: "fma" (CUDA-core multiply-add, K loop unrolled) or "dot" (x padded to 16 rows, tl.dot).
    """

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = FMA_WARPS
    num_stages: int = 1
    mode: str = "fma"

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if self.mode not in ("fma", "dot"):
            raise ValueError(f"mode {self.mode!r} is not 'fma' or 'dot'")
        if self.mode == "dot" and min(self.block_n, self.block_k) < DOT_MIN_ROWS:
            raise ValueError(f"dot mode needs block_n and block_k >= {DOT_MIN_ROWS}")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError("split_k and num_stages must be >= 1")


# (N, K) -> config for 16-bit weights and M <= 4: T3's decode projections (Llama-520M). Not yet timed
# on a GPU: these are heuristic_config's picks for an H100 (132 SMs); replace them with the winners of
# ``python -m eval.bench_small_m_linear --sweep``, which prints a table in this form.
# Fastest of the H100 sweep (eval/results/h100-small-m-linear-sweep.json, M = 2, bf16, cold weights);
# o (1024, 1024) was not swept and keeps the heuristic's pick (2.67 us, eval/results/h100-small-m-linear.json).
TUNED: dict[tuple[int, int], SmallMConfig] = {
    (3072, 1024): SmallMConfig(block_n=2, block_k=512, num_warps=2),  # qkv: 4.02 us (cuBLAS 5.41)
    (1024, 1024): SmallMConfig(block_n=2, block_k=1024),  # o: 2.67 us (cuBLAS 4.43)
    (8192, 1024): SmallMConfig(block_n=2, block_k=512, num_warps=2),  # gate_up: 7.41 us (cuBLAS 7.87)
    (1024, 4096): SmallMConfig(block_n=2, block_k=2048, num_warps=8),  # down: 4.76 us (cuBLAS 8.37)
}
TUNED_MAX_M = 4


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    try:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    except (RuntimeError, AssertionError, AttributeError):  # no CUDA (interpreter tests, tracing on CPU)
        return DEFAULT_SMS


def heuristic_config(m: int, n: int, k: int, elem_bytes: int, sms: int = DEFAULT_SMS) -> SmallMConfig:
    """An fma-mode config for any shape: a K tile of one 16-byte vector per thread and row (fewer warps
    when K is short), up to 8 rows per program, then fewer rows (down to 2) and finally split-K (whole
    tiles per slice) until the grid has ~3 programs per SM."""
    vec = VECTOR_BYTES // elem_bytes
    block_k = vec * WARP * FMA_WARPS
    num_warps = FMA_WARPS
    if _next_pow2(k) < block_k:
        block_k = max(vec, _next_pow2(k))
        num_warps = max(1, min(FMA_WARPS, block_k // (vec * WARP)))
    block_n = min(_next_pow2(n), MAX_BLOCK_N, max(1, MAX_ACC_ROWS // _next_pow2(m)))
    target = PROGRAMS_PER_SM * sms
    while block_n > MIN_BLOCK_N and triton.cdiv(n, block_n) < target:
        block_n //= 2
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < target and k >= 2 * split_k * block_k:
        split_k *= 2
    return SmallMConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps)


def config_for(m: int, n: int, k: int, dtype: torch.dtype, sms: int = DEFAULT_SMS) -> SmallMConfig:
    """``TUNED``'s entry for 16-bit weights of a listed (N, K) and M <= 4, else ``heuristic_config``."""
    elem_bytes = dtype.itemsize
    if elem_bytes == 2 and m <= TUNED_MAX_M and (n, k) in TUNED:
        return TUNED[(n, k)]
    return heuristic_config(m, n, k, elem_bytes, sms)


# ---------------------------------------------------------------------------------------- kernels
@triton.jit
def _fma_slice(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, k_lo, offs_m, offs_n,
               M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
               K_SLICE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """[M_PAD, BLOCK_N] fp32 sums over one K slice, CUDA-core FMAs, loop unrolled at compile time.

    x and W are loaded straight into 3-D shapes ([M_PAD, 1, BLOCK_K] and [1, BLOCK_N, BLOCK_K]) so
    both get the same K-contiguous layout and broadcast without a shared-memory layout conversion.
    Each tile's products are summed over VEC-wide K groups (within a thread when BLOCK_K is
    VEC * 32 * num_warps) into a [M_PAD, BLOCK_N, BLOCK_K // VEC] accumulator; the cross-thread sum
    over K happens once, after the loop, so the loop body has no barriers and loads can run ahead.
    """
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None, None] * stride_xm + (k_lo + offs_k)[None, None, :]
    w_ptrs = w_ptr + offs_n[None, :, None] * stride_wn + (k_lo + offs_k)[None, None, :]
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in tl.static_range(0, K_SLICE, BLOCK_K):
        k_ok = (k_lo + k0 + offs_k < K)[None, None, :]
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, mask=(offs_n < N)[None, :, None] & k_ok, other=0.0,
                        eviction_policy="evict_first")
        if EVEN_M and EVEN_K:
            x = tl.load(x_ptrs + k0)
        else:
            x = tl.load(x_ptrs + k0, mask=(offs_m < M)[:, None, None] & k_ok, other=0.0)
        prod = x.to(tl.float32) * w.to(tl.float32)
        acc += tl.sum(tl.reshape(prod, [M_PAD, BLOCK_N, BLOCK_K // VEC, VEC]), axis=3)
    return tl.sum(acc, axis=2)


@triton.jit
def _dot_slice(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, k_lo, offs_m, offs_n,
               M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SLICE: tl.constexpr,
               EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, IEEE_DOT: tl.constexpr):
    """[M_PAD >= 16, BLOCK_N] fp32 sums over one K slice with tl.dot; the runtime loop lets Triton
    software-pipeline the tile loads over ``num_stages`` (cp.async into shared memory)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K_SLICE, BLOCK_K):
        k_ok = (k_lo + k0 + offs_k < K)[None, :]
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, mask=(offs_n < N)[:, None] & k_ok, other=0.0, eviction_policy="evict_first")
        if EVEN_M and EVEN_K:
            x = tl.load(x_ptrs + k0)
        else:
            x = tl.load(x_ptrs + k0, mask=(offs_m < M)[:, None] & k_ok, other=0.0)
        if IEEE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _small_m_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os,
                    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                    K_SLICE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
    """out[pid_k, m, n] = sum over K slice pid_k of x[m, k] * w[n, k], accumulated in fp32.

    Grid (cdiv(N, BLOCK_N), split_k); slice pid_k is [pid_k * K_SLICE, (pid_k + 1) * K_SLICE) & [0, K),
    K_SLICE a multiple of BLOCK_K. EVEN_M/N/K drop the masks (M == M_PAD, N % BLOCK_N == 0,
    split_k * K_SLICE == K).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_SLICE
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_DOT:
        acc = _dot_slice(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, k_lo, offs_m, offs_n,
                         M_PAD, BLOCK_N, BLOCK_K, K_SLICE, EVEN_M, EVEN_N, EVEN_K, IEEE_DOT)
    else:
        acc = _fma_slice(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, k_lo, offs_m, offs_n,
                         M_PAD, BLOCK_N, BLOCK_K, VEC, K_SLICE, EVEN_M, EVEN_N, EVEN_K)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _split_k_reduce_kernel(part_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] over the flattened (M, N) output, slices added in order 0..SPLIT_K-1."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes {tuple(x.shape)} @ {tuple(weight.shape)}.T do not match")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x rows and weight must be contiguous")
    if x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtypes {x.dtype}/{weight.dtype} not supported")


def _run(x: Tensor, weight: Tensor, cfg: SmallMConfig, gemv, reduce) -> Tensor:
    """Allocate and launch: ``gemv``/``reduce`` are the two kernels, raw or ``wrap_triton``-wrapped."""
    _check(x, weight)
    (m, k), n = x.shape, weight.shape[0]
    m_pad = max(_next_pow2(m), DOT_MIN_ROWS) if cfg.mode == "dot" else _next_pow2(m)
    k_slice = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    meta = dict(M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                VEC=min(cfg.block_k, VECTOR_BYTES // x.element_size()), K_SLICE=k_slice,
                EVEN_M=m == m_pad, EVEN_N=n % cfg.block_n == 0, EVEN_K=k_slice * cfg.split_k == k,
                USE_DOT=cfg.mode == "dot", IEEE_DOT=x.dtype == torch.float32,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    if cfg.split_k == 1:
        gemv[grid](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), 0, **meta)
        return out
    part = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    gemv[grid](x, weight, part, m, n, k, x.stride(0), weight.stride(0), part.stride(1), part.stride(0), **meta)
    reduce[(triton.cdiv(m * n, REDUCE_BLOCK),)](part, out, m * n, SPLIT_K=cfg.split_k, BLOCK=REDUCE_BLOCK)
    return out


def launch(x: Tensor, weight: Tensor, cfg: SmallMConfig | None = None) -> Tensor:
    """Run the kernel(s) directly, no custom op: x (M, K) with unit K stride, weight (N, K) contiguous.

    Works under ``TRITON_INTERPRET=1`` on CPU tensors (the CI tests); the benchmark's sweep uses it
    to time configs other than ``config_for``'s.
    """
    cfg = cfg or config_for(x.shape[0], weight.shape[0], weight.shape[1], weight.dtype, _sms_of(x))
    return _run(x, weight, cfg, _small_m_kernel, _split_k_reduce_kernel)


def _sms_of(x: Tensor) -> int:
    return _sm_count(x.device.index or 0) if x.device.type == "cuda" else DEFAULT_SMS


# ---------------------------------------------------------------------------------------- custom op
@triton_op(OP_NAME, mutates_args=())
def small_m_linear_op(x: Tensor, weight: Tensor) -> Tensor:
    """x (M, K) @ weight (N, K).T -> (M, N) in x's dtype: ``launch`` with both kernels wrapped by
    ``wrap_triton``, so that torch.compile traces into the op and inductor launches the kernels."""
    cfg = config_for(x.shape[0], weight.shape[0], weight.shape[1], weight.dtype, _sms_of(x))
    return _run(x.contiguous(), weight, cfg, wrap_triton(_small_m_kernel), wrap_triton(_split_k_reduce_kernel))


@small_m_linear_op.register_fake
def _small_m_linear_fake(x: Tensor, weight: Tensor) -> Tensor:
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"shapes {tuple(x.shape)} @ {tuple(weight.shape)}.T do not match")
    torch._check(x.dtype == weight.dtype, lambda: f"dtypes {x.dtype}/{weight.dtype} differ")
    return x.new_empty((x.shape[0], weight.shape[0]))


def supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``small_m_linear`` takes the Triton path for these arguments (else exact F.linear)."""
    if x.device.type != "cuda" or weight.device != x.device:
        return False
    if x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES:
        return False
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or not weight.is_contiguous():
        return False
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 1 <= m <= MAX_M or weight.shape[0] == 0:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def small_m_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias) for x (..., K) with at most 8 rows in all, via the Triton
    GEMV on CUDA; any call it does not cover falls back to exactly ``F.linear``."""
    if not supported(x, weight):
        return F.linear(x, weight)
    out = small_m_linear_op(x.reshape(-1, x.shape[-1]), weight)
    return out.view(*x.shape[:-1], weight.shape[0])
