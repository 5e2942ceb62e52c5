"""One decode step of Llama attention in one or two Triton kernels: rotary + cache write + split-KV attention.

T3 decodes one position at a time (a CFG pair of 2 rows, 16 heads of 64). The reference path spends
four launches a layer on that: the rotary kernel, ``index_copy_`` of the new key/value into the
cache, an additive mask, and an SDPA kernel that is built for long queries. This module does it in
one kernel (two without ``counters``) that reads the raw q/k/v projection output:

* ``_partial_kernel``, grid (B * H, splits): rotates q and the new k of its head (the rotary halves
  are handled as two D/2 vectors, as ``rotate_half``), walks its split of the cache window in
  ``block_l`` slots with an online softmax, and writes an fp32 partial (running max, sum, weighted
  values). The slot at ``position`` takes the new key/value from registers, not from the cache,
  and the program that owns that slot for the first head of each kv group writes the rotated key
  and the value into the cache, so no program depends on another's write.
* the merge of a head's splits, in a fixed order (deterministic), into the (B, H * D) layout the
  output projection reads: done by the head's last split program to finish when the caller passes
  zeroed ``counters`` (an atomic count per head; its acquire makes the other splits' partials
  visible), else by ``_combine_kernel``, grid (B * H,), a second launch.

``position`` is read on the device, so one launch (or one CUDA-graph capture) serves every position
of a cache window. No load waits for it: every split loads its slots and masks the scores of slots
after ``position`` (splits wholly after it contribute nothing), which keeps one DRAM round trip off
the critical path; the slot at ``position`` may be read stale by another head's program, which
replaces it from registers. Softmax statistics and the value sum
are fp32; q and the rotated key are rounded to the activation dtype as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Running-max start: finite, so a split with no live slot keeps alpha = exp(0) and p = 0 (no NaN).
_NO_SCORE = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """split_len: cache slots per program (a multiple of block_l); block_l: slots per inner tile;
    single_pass_max_len: windows up to this many slots run as one split per head (no combine kernel)."""

    split_len: int = 32
    block_l: int = 32
    num_warps: int = 2
    single_pass_max_len: int = 0

    def __post_init__(self) -> None:
        if self.single_pass_max_len < 0:
            raise ValueError("single_pass_max_len must be >= 0")
        for name in ("split_len", "block_l", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if self.split_len % self.block_l:
            raise ValueError("split_len must be a multiple of block_l")


DEFAULT_CONFIG = DecodeAttentionConfig()


@triton.jit
def _partial_kernel(qkv_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, part_ptr, stat_ptr, final_ptr, count_ptr, s_ob,
                    L, sm_scale, s_qb, s_qh, s_c2, s_cb, s_ch, s_cl,
                    H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, SPLITS: tl.constexpr,
                    SPLIT_LEN: tl.constexpr, BLOCK_L: tl.constexpr, MERGE_HERE: tl.constexpr,
                    SPLITS_POW2: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    pos = tl.load(pos_ptr)
    lo = split * SPLIT_LEN
    stat = stat_ptr + (bh * SPLITS + split) * 2
    out = part_ptr + (bh * SPLITS + split) * (2 * HALF)
    if SPLITS == 1:  # one split holds the window: normalise and write the head's output here
        out = final_ptr + b * s_ob + h * (2 * HALF)
    _attend_split(qkv_ptr, cos_ptr, sin_ptr, cache_ptr, pos, lo, h, b, out, stat, L, sm_scale, s_qb, s_qh,
                  s_c2, s_cb, s_ch, s_cl, H, KVH, HALF, SPLIT_LEN, BLOCK_L, SPLITS == 1)
    if MERGE_HERE:  # the last split of a head to finish merges them (its acquire sees the others' writes)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
        if done == SPLITS - 1:
            _merge_splits(part_ptr, stat_ptr, final_ptr, bh, b, h, s_ob, 2 * HALF, SPLITS, SPLITS_POW2)


@triton.jit
def _attend_split(qkv_ptr, cos_ptr, sin_ptr, cache_ptr, pos, lo, h, b, out, stat, L, sm_scale, s_qb, s_qh,
                  s_c2, s_cb, s_ch, s_cl, H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr,
                  SPLIT_LEN: tl.constexpr, BLOCK_L: tl.constexpr, FINAL: tl.constexpr):
    d = tl.arange(0, HALF)
    kvh = h // (H // KVH)
    dt = cache_ptr.dtype.element_ty
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
    k_base = cache_ptr + b * s_cb + kvh * s_ch
    v_base = k_base + s_c2
    if (pos >= lo) & (pos < lo + SPLIT_LEN) & (h % (H // KVH) == 0):
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
def _merge_splits(part_ptr, stat_ptr, out_ptr, bh, b, h, s_ob, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                  SPLITS_POW2: tl.constexpr):
    """Merge head ``bh``'s split partials in split order; loads bypass L1 (.cg): other programs wrote them."""
    sp = tl.arange(0, SPLITS_POW2)
    stat = stat_ptr + bh * SPLITS * 2
    m = tl.load(stat + sp * 2, mask=sp < SPLITS, other=float("-inf"), cache_modifier=".cg")
    l_sum = tl.load(stat + sp * 2 + 1, mask=sp < SPLITS, other=0.0, cache_modifier=".cg")
    top = tl.max(m, axis=0)
    w = tl.where(sp < SPLITS, tl.exp(m - top), 0.0)
    w = tl.where(l_sum > 0, w, 0.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_ptr + (bh * SPLITS + sp[:, None]) * HEAD_DIM + d[None, :],
                  mask=(sp[:, None] < SPLITS) & (l_sum[:, None] > 0), other=0.0, cache_modifier=".cg")
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + b * s_ob + h * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(part_ptr, stat_ptr, out_ptr, s_ob, H: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr):
    bh = tl.program_id(0)
    _merge_splits(part_ptr, stat_ptr, out_ptr, bh, bh // H, bh % H, s_ob, HEAD_DIM, SPLITS, SPLITS_POW2)


def _check(qkv: Tensor, cos: Tensor, sin: Tensor, layer_kv: Tensor, position: Tensor, num_heads: int,
           num_kv_heads: int) -> None:
    if qkv.dim() != 3 or qkv.shape[1] != num_heads + 2 * num_kv_heads:
        raise ValueError(f"qkv must be (B, {num_heads + 2 * num_kv_heads}, D), got {tuple(qkv.shape)}")
    b, _, d = qkv.shape
    if layer_kv.dim() != 5 or layer_kv.shape[0] != 2 or layer_kv.shape[1] != b or layer_kv.shape[2] != num_kv_heads \
            or layer_kv.shape[4] != d:
        raise ValueError(f"layer_kv must be (2, {b}, {num_kv_heads}, L, {d}), got {tuple(layer_kv.shape)}")
    if qkv.stride(2) != 1 or layer_kv.stride(4) != 1:
        raise ValueError("qkv and layer_kv need a unit stride over the head dimension")
    if d % 2 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be an even power of two")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads do not group over {num_kv_heads} kv heads")
    if cos.numel() != d or sin.numel() != d or position.numel() != 1:
        raise ValueError("cos/sin must hold head_dim values and position one")
    if qkv.dtype != layer_kv.dtype or qkv.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtypes {qkv.dtype}/{layer_kv.dtype} not supported")


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, layer_kv: Tensor, position: Tensor, num_heads: int,
                     num_kv_heads: int, counters: Tensor | None = None,
                     cfg: DecodeAttentionConfig = DEFAULT_CONFIG) -> Tensor:
    """Attention of one new position; writes its rotated key and value into ``layer_kv`` at ``position``.

    qkv (B, H + 2 * KVH, D): the projection output, heads [q..., k..., v...] before rotary.
    cos, sin (D,): the rotary factors of ``position`` (halves repeated, as ``rope``).
    layer_kv (2, B, KVH, L, D): this layer's cache window (keys then values); slots after
    ``position`` are ignored. position (1,) int64 on the device, 0 <= position < L.
    counters: optional zeroed int32 (>= B * H,) on the device; with it, the last split program of each
    head merges the splits (one launch); without it a second kernel does. The counters are left
    non-zero: a call needs fresh zeros (one ``torch.zeros`` per decode step serves every layer).
    Returns (B, H * D) in qkv's dtype: the softmax(q k^T / sqrt(D)) v of every head, rows laid out as
    the output projection reads them.
    """
    _check(qkv, cos, sin, layer_kv, position, num_heads, num_kv_heads)
    b, _, d = qkv.shape
    length = layer_kv.shape[3]
    split_len = cfg.split_len
    if length <= cfg.single_pass_max_len:
        split_len = cfg.block_l * triton.cdiv(length, cfg.block_l)
    splits = triton.cdiv(length, split_len)
    part = torch.empty((b * num_heads, splits, d), dtype=torch.float32, device=qkv.device)
    stat = torch.empty((b * num_heads, splits, 2), dtype=torch.float32, device=qkv.device)
    out = torch.empty((b, num_heads * d), dtype=qkv.dtype, device=qkv.device)
    merge_here = splits > 1 and counters is not None
    if merge_here and (counters.dtype != torch.int32 or counters.numel() < b * num_heads
                       or not counters.is_contiguous()):
        raise ValueError(f"counters must be contiguous int32 with >= {b * num_heads} entries")
    _partial_kernel[(b * num_heads, splits)](
        qkv, cos.reshape(-1), sin.reshape(-1), layer_kv, position, part, stat, out,
        counters if merge_here else stat, out.stride(0), length, d ** -0.5,
        qkv.stride(0), qkv.stride(1), layer_kv.stride(0), layer_kv.stride(1), layer_kv.stride(2), layer_kv.stride(3),
        H=num_heads, KVH=num_kv_heads, HALF=d // 2, SPLITS=splits, SPLIT_LEN=split_len, BLOCK_L=cfg.block_l,
        MERGE_HERE=merge_here, SPLITS_POW2=triton.next_power_of_2(splits),
        num_warps=cfg.num_warps)
    if splits > 1 and not merge_here:
        _combine_kernel[(b * num_heads,)](part, stat, out, out.stride(0), H=num_heads, HEAD_DIM=d, SPLITS=splits,
                                          SPLITS_POW2=triton.next_power_of_2(splits), num_warps=1)
    return out


def reference_decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, layer_kv: Tensor, position: Tensor,
                               num_heads: int, num_kv_heads: int, counters: Tensor | None = None) -> Tensor:
    """The same step in plain torch (rotary, ``index_copy_`` into the cache, masked SDPA): the
    equivalence reference for tests and the fallback where the kernels do not run."""
    b, _, d = qkv.shape
    half = d // 2

    def rotate(x: Tensor) -> Tensor:
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    q = rotate(qkv[:, :num_heads])[:, :, None]  # (B, H, 1, D)
    k = rotate(qkv[:, num_heads:num_heads + num_kv_heads])
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
