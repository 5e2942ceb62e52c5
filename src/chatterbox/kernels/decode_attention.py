"""One decode step of Llama attention as Triton kernels: rotary + cache write + split-KV attention.

T3 decodes one position at a time per request (a CFG pair of 2 rows, 16 heads of 64). The reference
path spends four launches a layer on that: rotary, ``index_copy_`` of the new key/value into the cache,
an additive mask, and an SDPA kernel built for long queries. Here it takes two launches:

* ``_partial_kernel``, grid (rows * H, splits): rotates q and the new k of its head (the rotary
  halves handled as two D/2 vectors, as ``nn.rotary.rotate_half``), walks its split of the cache
  window in ``block_l`` slots with an online softmax and writes an fp32 partial (running max, sum,
  weighted values). The slot at the row's position takes the new key/value from registers, not from
  the cache, and the program owning that slot for the first head of each kv group writes the rotated
  key and the value into the cache, so no program depends on another's write. No load waits for
  the position: every split loads its slots and masks the scores after the position (splits wholly
  after it contribute nothing).
* ``_combine_kernel``, grid (rows * H,): merges a head's splits in split order, one after another
  (deterministic, and independent of the launch's window: empty splits add exact zeros), into the
  (rows, H * D) layout the output projection reads.

Two ways to name the cache:

* ``decode_attention``: one request's cache window as a tensor (2, rows, KVH, L, D) and one position
  for all its rows (the eager path);
* ``decode_attention_table``: a batch of requests, each with its own cache allocation, found through
  a ``CacheTable`` (per request: the address and length of its stacked cache, and its position), all
  read on the device. One launch, and so one CUDA-graph capture, serves any set of requests whose
  positions fit the launch's window: this is how the engine's captured decode step reads the KV cache
  of whichever requests it is replayed for.

Softmax statistics and the value sum are fp32; q and the rotated key are rounded to the activation
dtype as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..nn.rotary import apply_rotary

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Running-max start: finite, so a split with no live slot keeps alpha = exp(0) and p = 0 (no NaN).
_NO_SCORE = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """split_len: cache slots per program (a multiple of block_l); block_l: slots per inner tile."""

    split_len: int = 32
    block_l: int = 32
    num_warps: int = 2

    def __post_init__(self) -> None:
        for name in ("split_len", "block_l", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if self.split_len % self.block_l:
            raise ValueError("split_len must be a multiple of block_l")


DEFAULT_CONFIG = DecodeAttentionConfig()


@dataclass(frozen=True)
class CacheTable:
    """Where each request's KV cache is, for ``decode_attention_table`` (all on the device).

    Request i's cache is one contiguous tensor (layers, 2, rows, KVH, length[i], D) (keys then
    values; ``allocate_stacked_cache``) starting at address ``ptr[i]``; ``position[i]`` is the slot its
    new token is written to and attends up to. Batch row r of the kernel belongs to request r // rows.
    """

    ptr: Tensor  # (S,) int64 data_ptr of each request's cache
    length: Tensor  # (S,) int64 slots of each request's cache
    position: Tensor  # (S,) int64


@triton.jit
def _partial_kernel(qkv_ptr, cos_ptr, sin_ptr, cache_ptr, ptr_table, len_table, pos_ptr, part_ptr, stat_ptr,
                    final_ptr, s_ob, L, layer, sm_scale, s_qb, s_qh, s_c2, s_cb, s_ch, s_cl,
                    H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, SPLITS: tl.constexpr,
                    SPLIT_LEN: tl.constexpr, BLOCK_L: tl.constexpr, ROWS: tl.constexpr, TABLE: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    if TABLE:
        req = b // ROWS
        pos = tl.load(pos_ptr + req)
        L = tl.load(len_table + req)
        s_cl = 2 * HALF
        s_ch = L * s_cl
        s_cb = KVH * s_ch
        s_c2 = ROWS * s_cb
        base = tl.load(ptr_table + req).to(tl.pointer_type(qkv_ptr.dtype.element_ty))
        row_cache = base + layer * 2 * s_c2 + (b % ROWS) * s_cb
        cos_ptr += req * 2 * HALF
        sin_ptr += req * 2 * HALF
    else:
        pos = tl.load(pos_ptr)
        row_cache = cache_ptr + b * s_cb
    lo = split * SPLIT_LEN
    stat = stat_ptr + (bh * SPLITS + split) * 2
    out = part_ptr + (bh * SPLITS + split) * (2 * HALF)
    if SPLITS == 1:  # one split holds the window: normalise and write the head's output here
        out = final_ptr + b * s_ob + h * (2 * HALF)
    _attend_split(qkv_ptr, cos_ptr, sin_ptr, row_cache, pos, lo, h, b, out, stat, L, sm_scale, s_qb, s_qh,
                  s_c2, s_ch, s_cl, H, KVH, HALF, SPLIT_LEN, BLOCK_L, SPLITS == 1)


@triton.jit
def _attend_split(qkv_ptr, cos_ptr, sin_ptr, row_cache, pos, lo, h, b, out, stat, L, sm_scale, s_qb, s_qh,
                  s_c2, s_ch, s_cl, H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr,
                  SPLIT_LEN: tl.constexpr, BLOCK_L: tl.constexpr, FINAL: tl.constexpr):
    d = tl.arange(0, HALF)
    kvh = h // (H // KVH)
    dt = qkv_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)
    q_row = qkv_ptr + b * s_qb + h * s_qh
    q1 = tl.load(q_row + d).to(tl.float32)
    q2 = tl.load(q_row + HALF + d).to(tl.float32)
    q1r = (q1 * cos - q2 * sin).to(dt).to(tl.float32) * sm_scale
    q2r = (q2 * cos + q1 * sin).to(dt).to(tl.float32) * sm_scale
    k_row = qkv_ptr + b * s_qb + (H + kvh) * s_qh
    k1 = tl.load(k_row + d).to(tl.float32)
    k2 = tl.load(k_row + HALF + d).to(tl.float32)
    k1n = (k1 * cos - k2 * sin).to(dt)
    k2n = (k2 * cos + k1 * sin).to(dt)
    v_row = qkv_ptr + b * s_qb + (H + KVH + kvh) * s_qh
    v1n = tl.load(v_row + d).to(dt)
    v2n = tl.load(v_row + HALF + d).to(dt)
    k_base = row_cache + kvh * s_ch
    v_base = k_base + s_c2
    if (pos >= lo) & (pos < lo + SPLIT_LEN) & (pos < L) & (h % (H // KVH) == 0):
        tl.store(k_base + pos * s_cl + d, k1n)
        tl.store(k_base + pos * s_cl + HALF + d, k2n)
        tl.store(v_base + pos * s_cl + d, v1n)
        tl.store(v_base + pos * s_cl + HALF + d, v2n)
    m = tl.full([1], _NO_SCORE, tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc1 = tl.zeros([HALF], tl.float32)
    acc2 = tl.zeros([HALF], tl.float32)
    for t in tl.static_range(0, SPLIT_LEN, BLOCK_L):
        slots = lo + t + tl.arange(0, BLOCK_L)
        live = slots <= pos
        is_new = (slots == pos)[:, None]
        rows = slots[:, None] * s_cl + d[None, :]
        ok = (slots < L)[:, None]
        kb1 = tl.load(k_base + rows, mask=ok, other=0.0).to(tl.float32)
        kb2 = tl.load(k_base + rows + HALF, mask=ok, other=0.0).to(tl.float32)
        kb1 = tl.where(is_new, k1n.to(tl.float32)[None, :], kb1)
        kb2 = tl.where(is_new, k2n.to(tl.float32)[None, :], kb2)
        s = tl.sum(kb1 * q1r[None, :], axis=1) + tl.sum(kb2 * q2r[None, :], axis=1)
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        vb1 = tl.load(v_base + rows, mask=ok, other=0.0).to(tl.float32)
        vb2 = tl.load(v_base + rows + HALF, mask=ok, other=0.0).to(tl.float32)
        vb1 = tl.where(is_new, v1n.to(tl.float32)[None, :], vb1)
        vb2 = tl.where(is_new, v2n.to(tl.float32)[None, :], vb2)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * vb1, axis=0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * vb2, axis=0)
        m = m_new
    if FINAL:
        ty = out.dtype.element_ty
        tl.store(out + d, (acc1 / l_sum).to(ty))
        tl.store(out + HALF + d, (acc2 / l_sum).to(ty))
    else:
        tl.store(stat + tl.arange(0, 1), m)
        tl.store(stat + 1 + tl.arange(0, 1), l_sum)
        tl.store(out + d, acc1)
        tl.store(out + HALF + d, acc2)


@triton.jit
def _combine_kernel(part_ptr, stat_ptr, out_ptr, s_ob, H: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS: tl.constexpr):
    """Merge head ``bh``'s splits one after another, in split order.

    Splits past the row's position hold a running max of -1e30 and a zero sum: their weight is exactly
    0 and adding them changes nothing, so the result does not depend on the launch's window (how many
    empty splits follow): a request's numbers are the same whatever other requests share its step."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    stat = stat_ptr + bh * SPLITS * 2
    d = tl.arange(0, HEAD_DIM)
    top = tl.load(stat)
    for sp in range(1, SPLITS):
        top = tl.maximum(top, tl.load(stat + sp * 2))
    acc = tl.zeros([HEAD_DIM], tl.float32)
    l_sum = top * 0.0
    for sp in range(0, SPLITS):
        w = tl.exp(tl.load(stat + sp * 2) - top)
        acc += w * tl.load(part_ptr + (bh * SPLITS + sp) * HEAD_DIM + d)
        l_sum += w * tl.load(stat + sp * 2 + 1)
    tl.store(out_ptr + b * s_ob + h * HEAD_DIM + d, (acc / l_sum).to(out_ptr.dtype.element_ty))


def _check_qkv(qkv: Tensor, num_heads: int, num_kv_heads: int) -> None:
    if qkv.dim() != 3 or qkv.shape[1] != num_heads + 2 * num_kv_heads:
        raise ValueError(f"qkv must be (B, {num_heads + 2 * num_kv_heads}, D), got {tuple(qkv.shape)}")
    d = qkv.shape[2]
    if qkv.stride(2) != 1:
        raise ValueError("qkv needs a unit stride over the head dimension")
    if d % 2 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be an even power of two")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads do not group over {num_kv_heads} kv heads")
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {qkv.dtype} not supported")


def _launch(qkv: Tensor, cos: Tensor, sin: Tensor, cache: Tensor, ptr_table: Tensor, len_table: Tensor,
            position: Tensor, length: int, layer: int, strides: tuple[int, int, int, int], num_heads: int,
            num_kv_heads: int, rows: int, table: bool, window: int, cfg: DecodeAttentionConfig) -> Tensor:
    b, _, d = qkv.shape
    splits = triton.cdiv(window, cfg.split_len)
    part = torch.empty((b * num_heads, splits, d), dtype=torch.float32, device=qkv.device)
    stat = torch.empty((b * num_heads, splits, 2), dtype=torch.float32, device=qkv.device)
    out = torch.empty((b, num_heads * d), dtype=qkv.dtype, device=qkv.device)
    _partial_kernel[(b * num_heads, splits)](
        qkv, cos, sin, cache, ptr_table, len_table, position, part, stat, out, out.stride(0), length, layer,
        d ** -0.5, qkv.stride(0), qkv.stride(1), *strides,
        H=num_heads, KVH=num_kv_heads, HALF=d // 2, SPLITS=splits, SPLIT_LEN=cfg.split_len, BLOCK_L=cfg.block_l,
        ROWS=rows, TABLE=table, num_warps=cfg.num_warps)
    if splits > 1:
        _combine_kernel[(b * num_heads,)](part, stat, out, out.stride(0), H=num_heads, HEAD_DIM=d, SPLITS=splits,
                                          num_warps=1)
    return out


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, layer_kv: Tensor, position: Tensor, num_heads: int,
                     num_kv_heads: int, cfg: DecodeAttentionConfig = DEFAULT_CONFIG) -> Tensor:
    """Attention of one new position of one request; writes its rotated key and value into ``layer_kv``.

    qkv (B, H + 2 * KVH, D): the projection output, heads [q..., k..., v...] before rotary.
    cos, sin (D,): the rotary factors of ``position`` (halves repeated).
    layer_kv (2, B, KVH, L, D): this layer's cache window (keys then values); slots after
    ``position`` are ignored. position (1,) int64 on the device, 0 <= position < L.
    Returns (B, H * D) in qkv's dtype, rows laid out as the output projection reads them.
    """
    _check_qkv(qkv, num_heads, num_kv_heads)
    b, _, d = qkv.shape
    if layer_kv.dim() != 5 or tuple(layer_kv.shape[:3]) != (2, b, num_kv_heads) or layer_kv.shape[4] != d \
            or layer_kv.stride(4) != 1:
        raise ValueError(f"layer_kv must be (2, {b}, {num_kv_heads}, L, {d}) with unit stride over D, "
                         f"got {tuple(layer_kv.shape)}")
    if cos.numel() != d or sin.numel() != d or position.numel() != 1:
        raise ValueError("cos/sin must hold head_dim values and position one")
    if layer_kv.dtype != qkv.dtype:
        raise ValueError(f"cache dtype {layer_kv.dtype} differs from qkv's {qkv.dtype}")
    length = layer_kv.shape[3]
    strides = (layer_kv.stride(0), layer_kv.stride(1), layer_kv.stride(2), layer_kv.stride(3))
    return _launch(qkv, cos.reshape(-1), sin.reshape(-1), layer_kv, position, position, position, length, 0,
                   strides, num_heads, num_kv_heads, b, False, length, cfg)


def decode_attention_table(qkv: Tensor, cos: Tensor, sin: Tensor, table: CacheTable, layer: int, num_heads: int,
                           num_kv_heads: int, window: int, rows: int = 2,
                           cfg: DecodeAttentionConfig = DEFAULT_CONFIG) -> Tensor:
    """``decode_attention`` for a batch of requests, each cache found through ``table`` (see ``CacheTable``).

    qkv (S * rows, H + 2 * KVH, D); cos, sin (S, D): per request. ``layer``: which layer of each
    request's stacked cache. ``window``: the launch covers slots [0, window); every request must have
    position < window (slots past a request's length are never read). Nothing here reads the table
    on the host, so the call can be captured once and replayed for other requests.
    """
    _check_qkv(qkv, num_heads, num_kv_heads)
    b, _, d = qkv.shape
    reqs = table.ptr.shape[0]
    if b != reqs * rows or cos.shape != (reqs, d) or sin.shape != (reqs, d):
        raise ValueError(f"{reqs} requests of {rows} rows need qkv ({reqs * rows}, ..., {d}) and cos/sin "
                         f"({reqs}, {d}); got {tuple(qkv.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    # the kernel reads the tables with unit stride (a column of a pool is strided)
    return _launch(qkv, cos.contiguous(), sin.contiguous(), qkv, table.ptr.contiguous(), table.length.contiguous(),
                   table.position.contiguous(), 0, layer, (0, 0, 0, 0), num_heads, num_kv_heads, rows, True, window,
                   cfg)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, ptr_table, len_table, S, layer, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,
                     KVH: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    bk = tl.program_id(0)
    b = bk // KVH
    kvh = bk % KVH
    req = b // ROWS
    L = tl.load(len_table + req)
    s_ch = L * D
    s_cb = KVH * s_ch
    s_c2 = ROWS * s_cb
    base = tl.load(ptr_table + req).to(tl.pointer_type(k_ptr.dtype.element_ty))
    dst = base + layer * 2 * s_c2 + (b % ROWS) * s_cb + kvh * s_ch
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    ok = ((pos < S) & (pos < L))[:, None]
    k = tl.load(k_ptr + b * s_kb + kvh * s_kh + pos[:, None] * s_ks + d[None, :], mask=ok)
    v = tl.load(v_ptr + b * s_vb + kvh * s_vh + pos[:, None] * s_vs + d[None, :], mask=ok)
    tl.store(dst + pos[:, None] * D + d[None, :], k, mask=ok)
    tl.store(dst + s_c2 + pos[:, None] * D + d[None, :], v, mask=ok)


WRITE_BLOCK_S = 16


def write_kv_table(k: Tensor, v: Tensor, ptr: Tensor, length: Tensor, layer: int, rows: int = 2) -> None:
    """Write positions [0, S) of keys and values (B, KVH, S, D) into layer ``layer`` of each request's
    stacked cache (``CacheTable`` addressing, batch row r -> request r // rows; slots past a cache's
    length are skipped). The prefill's cache write, with nothing read on the host."""
    b, kvh, s, d = k.shape
    if v.shape != k.shape or v.dtype != k.dtype or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError(f"k and v must be (B, KVH, S, D) alike with unit stride over D, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if b != ptr.shape[0] * rows:
        raise ValueError(f"{b} rows do not make {ptr.shape[0]} requests of {rows}")
    _write_kv_kernel[(b * kvh, triton.cdiv(s, WRITE_BLOCK_S))](
        k, v, ptr.contiguous(), length.contiguous(), s, layer, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        KVH=kvh, D=d, ROWS=rows, BLOCK_S=WRITE_BLOCK_S, num_warps=1)


def reference_decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, layer_kv: Tensor, position: Tensor,
                               num_heads: int, num_kv_heads: int) -> Tensor:
    """The same step in plain torch (rotary, ``index_copy_`` into the cache, masked SDPA): the
    equivalence reference for tests and the fallback where the kernels do not run."""
    b, _, d = qkv.shape
    q = apply_rotary(qkv[:, :num_heads], cos, sin)[:, :, None]  # (B, H, 1, D)
    k = apply_rotary(qkv[:, num_heads:num_heads + num_kv_heads], cos, sin)
    v = qkv[:, num_heads + num_kv_heads:]
    new = torch.stack((k, v))[:, :, :, None]  # (2, B, KVH, 1, D)
    layer_kv.index_copy_(3, position.reshape(1), new.to(layer_kv.dtype))
    keys, values = layer_kv[0], layer_kv[1]
    groups = num_heads // num_kv_heads
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    visible = torch.arange(layer_kv.shape[3], device=qkv.device) <= position.reshape(1)
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    attn = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None, None, None])
    return attn[:, :, 0].reshape(b, num_heads * d)
