"""decode_attention: T3's one-position attention (rotary + cache write + split-KV softmax) in Triton.

CPU (CI): the two kernels run under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must
be set before triton is imported) against ``reference_decode_attention`` (rotary, ``index_copy_``,
masked SDPA in plain torch), in float32 and bfloat16, for: the first slot, a position inside the
first split, on a split boundary, in the last slot of the window, a window that is not a multiple of
the split length, grouped kv heads (H = 2 * KVH), a CFG batch of 2, and single-pass windows (one
split per head, no combine kernel). Both the output and the
whole cache after the call are compared: the kernel must write the rotated key and the value at
``position`` and nothing else; the merge done by the last split program (atomic counters) must
equal the separate combine kernel bit for bit. GPU-marked tests repeat the T3 shape at full window sizes.

Tolerances, max|out - ref| / max|ref|: float32 1e-5 (fp32 softmax either way), bfloat16 2e-2 (the
reference's SDPA rounds q k^T and the probabilities through bf16, the kernel keeps them fp32). The
cache must match exactly in float32 and to one bf16 rounding of the rotary in bfloat16.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import run_triton_interpreted

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
CACHE_TOL = {"float32": 0.0, "bfloat16": 1e-2}

# name -> (batch, heads, kv_heads, head_dim, window, position, split_len, block_l, single_pass_max_len)
CASES = {
    "first_slot": (2, 4, 4, 16, 64, 0, 32, 16, 0),
    "inside_first_split": (2, 4, 4, 16, 64, 9, 32, 16, 0),
    "split_boundary": (1, 2, 2, 16, 64, 32, 32, 16, 0),
    "last_slot": (2, 2, 2, 16, 64, 63, 32, 16, 0),
    "ragged_window": (1, 2, 2, 16, 80, 70, 32, 16, 0),
    "grouped_kv": (2, 4, 2, 16, 64, 40, 32, 16, 0),
    "t3_heads": (2, 16, 16, 64, 128, 77, 64, 32, 0),
    "single_pass": (2, 4, 2, 16, 80, 50, 32, 16, 128),
    "single_pass_first_slot": (1, 2, 2, 16, 64, 0, 32, 32, 64),
}

CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from chatterbox.kernels.decode_attention import (DecodeAttentionConfig, decode_attention,
                                                     reference_decode_attention)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    out = {}
    for name, (b, h, kvh, d, window, pos, split_len, block_l, single) in json.loads(sys.argv[1]).items():
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(len(name))
            qkv = torch.randn(b, h + 2 * kvh, d, generator=g).to(dtype)
            cache = torch.randn(2, b, kvh, window, d, generator=g).to(dtype)
            ang = 0.37 * (pos + 1) * torch.arange(d // 2) / d
            ang = torch.cat((ang, ang))
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
            position = torch.tensor([pos])
            c_ref = cache.float()
            ref = reference_decode_attention(qkv.float(), cos.float(), sin.float(), c_ref, position, h, kvh)
            c_ker = cache.clone()
            cfg = DecodeAttentionConfig(split_len=split_len, block_l=block_l, single_pass_max_len=single)
            got = decode_attention(qkv, cos, sin, c_ker, position, h, kvh, cfg=cfg)
            c_merged = cache.clone()
            counters = torch.zeros(b * h, dtype=torch.int32)
            merged = decode_attention(qkv, cos, sin, c_merged, position, h, kvh, counters, cfg=cfg)
            untouched = torch.ones(window, dtype=torch.bool)
            untouched[pos] = False
            out[f"{name}/{str(dtype).split('.')[-1]}"] = {
                "out": rel(got.float(), ref),
                "cache_pos": rel(c_ker[:, :, :, pos].float(), c_ref[:, :, :, pos].float()),
                "cache_rest_equal": bool(torch.equal(c_ker[:, :, :, untouched], cache[:, :, :, untouched])),
                "shape_ok": tuple(got.shape) == (b, h * d) and got.dtype == dtype,
                "merged_in_kernel_equal": bool(torch.equal(merged, got) and torch.equal(c_merged, c_ker)),
            }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_triton_interpreted(CHECK, json.dumps(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpreted_matches_reference(interpreted, name, dtype):
    got = interpreted[f"{name}/{dtype}"]
    assert got["shape_ok"]
    assert got["out"] <= TOL[dtype], got
    assert got["cache_pos"] <= CACHE_TOL[dtype], got
    assert got["cache_rest_equal"], "the kernel wrote cache slots other than position"
    assert got["merged_in_kernel_equal"], "merging in the last split program changed the result"


def test_rejects_bad_shapes():
    from chatterbox.kernels.decode_attention import decode_attention

    qkv = torch.zeros(2, 12, 16)
    cache = torch.zeros(2, 2, 4, 32, 16)
    cs = torch.zeros(16)
    pos = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention(torch.zeros(2, 11, 16), cs, cs, cache, pos, 4, 4)
    with pytest.raises(ValueError, match="layer_kv must be"):
        decode_attention(qkv, cs, cs, torch.zeros(2, 2, 4, 32, 8), pos, 4, 4)
    with pytest.raises(ValueError, match="dtypes"):
        decode_attention(qkv, cs, cs, cache.half(), pos, 4, 4)


@gpu
@pytest.mark.parametrize("window,pos", [(128, 0), (256, 200), (512, 511), (1024, 700)])
def test_gpu_t3_shape(window, pos):
    from chatterbox.kernels.decode_attention import decode_attention, reference_decode_attention

    g = torch.Generator(device="cuda").manual_seed(window)
    qkv = torch.randn(2, 48, 64, device="cuda", generator=g).bfloat16()
    cache = torch.randn(2, 2, 16, window, 64, device="cuda", generator=g).bfloat16()
    ang = torch.linspace(0, 3, 64, device="cuda")
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    position = torch.tensor([pos], device="cuda")
    c_ker = cache.clone()
    ref = reference_decode_attention(qkv.float(), cos.float(), sin.float(), cache.float(), position, 16, 16)
    got = decode_attention(qkv, cos, sin, c_ker, position, 16, 16)
    assert float((got.float() - ref).abs().max() / ref.abs().max()) <= TOL["bfloat16"]
    for _ in range(3):  # the in-kernel merge (atomic counters) is deterministic and equals the combine kernel
        c_merged = cache.clone()
        merged = decode_attention(qkv, cos, sin, c_merged, position, 16, 16,
                                  torch.zeros(32, dtype=torch.int32, device="cuda"))
        assert torch.equal(merged, got) and torch.equal(c_merged, c_ker)
    rest = torch.ones(window, dtype=torch.bool, device="cuda")
    rest[pos] = False
    assert torch.equal(c_ker[:, :, :, rest], cache[:, :, :, rest])
