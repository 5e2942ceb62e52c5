"""decode_attention: T3's one-position attention (rotary + cache write + split-KV softmax) in Triton.

CPU (CI): the kernels run under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be
set before triton is imported) against ``reference_decode_attention`` (rotary, ``index_copy_``,
masked SDPA in plain torch), in float32 and bfloat16, for: the first slot, a position inside the
first split, on a split boundary, in the last slot of the window, a window that is not a multiple of
the split length, grouped kv heads (H = 2 * KVH) and a CFG batch of 2. Both the output and the whole
cache after the call are compared: the kernel must write the rotated key and the value at
``position`` and nothing else. The table form (``decode_attention_table``: several requests, each
its own cache allocation, length and position, read through device tables) must equal the direct
form on each request bit for bit (whatever the launch's window: a request's numbers must not depend
on which others share its step), write nothing past a cache's length, and ``write_kv_table``
must write a prompt's keys/values exactly. GPU-marked tests repeat the T3 shape at full windows.

Tolerances, max|out - ref| / max|ref|: float32 1e-5 (fp32 softmax either way), bfloat16 2e-2 (the
reference's SDPA rounds q k^T and the probabilities through bf16, the kernel keeps them fp32). The
cache must match exactly in float32 and to one bf16 rounding of the rotary in bfloat16. The rotary
tables have repeated halves, as every caller builds them (``nn.rotary``).
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

# name -> (batch, heads, kv_heads, head_dim, window, position, split_len, block_l)
CASES = {
    "first_slot": (2, 4, 4, 16, 64, 0, 32, 16),
    "inside_first_split": (2, 4, 4, 16, 64, 9, 32, 16),
    "split_boundary": (1, 2, 2, 16, 64, 32, 32, 16),
    "last_slot": (2, 2, 2, 16, 64, 63, 32, 16),
    "ragged_window": (1, 2, 2, 16, 80, 70, 32, 16),
    "grouped_kv": (2, 4, 2, 16, 64, 40, 32, 16),
    "t3_heads": (2, 16, 16, 64, 128, 77, 64, 32),
}

CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from chatterbox.kernels.decode_attention import (CacheTable, DecodeAttentionConfig, decode_attention,
                                                     decode_attention_table, reference_decode_attention,
                                                     write_kv_table)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    def rope(pos, d, dtype):
        ang = 0.37 * (pos + 1) * torch.arange(d // 2) / d
        ang = torch.cat((ang, ang))
        return ang.cos().to(dtype), ang.sin().to(dtype)

    out = {}
    for name, (b, h, kvh, d, window, pos, split_len, block_l) in json.loads(sys.argv[1]).items():
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(len(name))
            qkv = torch.randn(b, h + 2 * kvh, d, generator=g).to(dtype)
            cache = torch.randn(2, b, kvh, window, d, generator=g).to(dtype)
            cos, sin = rope(pos, d, dtype)
            position = torch.tensor([pos])
            c_ref = cache.float()
            ref = reference_decode_attention(qkv.float(), cos.float(), sin.float(), c_ref, position, h, kvh)
            c_ker = cache.clone()
            cfg = DecodeAttentionConfig(split_len=split_len, block_l=block_l)
            got = decode_attention(qkv, cos, sin, c_ker, position, h, kvh, cfg=cfg)
            untouched = torch.ones(window, dtype=torch.bool)
            untouched[pos] = False
            out[f"{name}/{str(dtype).split('.')[-1]}"] = {
                "out": rel(got.float(), ref),
                "cache_pos": rel(c_ker[:, :, :, pos].float(), c_ref[:, :, :, pos].float()),
                "cache_rest_equal": bool(torch.equal(c_ker[:, :, :, untouched], cache[:, :, :, untouched])),
                "shape_ok": tuple(got.shape) == (b, h * d) and got.dtype == dtype,
            }

    # the table form: three requests (layers=3, CFG pairs), other lengths and positions, one launch
    layers, h, kvh, d, window = 3, 4, 2, 16, 96
    lens, positions = [40, 70, 33], [5, 64, 32]
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        caches = [torch.randn(layers, 2, 2, kvh, n, d, generator=g).to(dtype) for n in lens]
        before = [c.clone() for c in caches]
        qkv = torch.randn(6, h + 2 * kvh, d, generator=g).to(dtype)
        cs = [rope(p, d, dtype) for p in positions]
        cos, sin = torch.stack([c for c, _ in cs]), torch.stack([s for _, s in cs])
        table = CacheTable(torch.tensor([c.data_ptr() for c in caches]), torch.tensor(lens), torch.tensor(positions))
        got = decode_attention_table(qkv, cos, sin, table, 1, h, kvh, window)
        equal, others = True, True
        for i in range(3):
            direct_cache = before[i][1].clone()
            direct = decode_attention(qkv[2 * i:2 * i + 2], cos[i], sin[i], direct_cache,
                                      torch.tensor([positions[i]]), h, kvh)
            equal &= bool(torch.equal(got[2 * i:2 * i + 2], direct) and torch.equal(caches[i][1], direct_cache))
            others &= bool(torch.equal(caches[i][0], before[i][0]) and torch.equal(caches[i][2], before[i][2]))
        # the window does not change a request's numbers (empty splits merge as exact zeros)
        narrow = [c.clone() for c in before]
        wide = [c.clone() for c in before]
        tn = CacheTable(torch.tensor([c.data_ptr() for c in narrow[:1]]), torch.tensor(lens[:1]), torch.tensor(positions[:1]))
        tw = CacheTable(torch.tensor([c.data_ptr() for c in wide[:1]]), torch.tensor(lens[:1]), torch.tensor(positions[:1]))
        window_free = bool(torch.equal(decode_attention_table(qkv[:2], cos[:1], sin[:1], tn, 1, h, kvh, 16),
                                       decode_attention_table(qkv[:2], cos[:1], sin[:1], tw, 1, h, kvh, 96)))
        # a position past a cache's length writes nothing (the graphs' scratch request relies on it)
        short = torch.zeros(1, 2, 2, kvh, 1, d, dtype=dtype)
        t2 = CacheTable(torch.tensor([short.data_ptr()]), torch.tensor([1]), torch.tensor([3]))
        decode_attention_table(qkv[:2], cos[:1], sin[:1], t2, 0, h, kvh, 16)
        # the prompt write
        k = torch.randn(6, kvh, 20, d, generator=g).to(dtype)
        v = torch.randn(6, kvh, 20, d, generator=g).to(dtype)
        written = [c.clone() for c in caches]
        wtable = CacheTable(torch.tensor([c.data_ptr() for c in written]), torch.tensor(lens), torch.tensor(positions))
        write_kv_table(k, v, wtable.ptr, wtable.length, 2, rows=2)
        writes_ok = all(torch.equal(written[i][2, 0, :, :, :20], k[2 * i:2 * i + 2])
                        and torch.equal(written[i][2, 1, :, :, :20], v[2 * i:2 * i + 2])
                        and torch.equal(written[i][:2], caches[i][:2])
                        and torch.equal(written[i][2, :, :, :, 20:], caches[i][2, :, :, :, 20:]) for i in range(3))
        out[f"table/{str(dtype).split('.')[-1]}"] = {"equal_direct": equal, "other_layers_untouched": others,
                                                     "short_untouched": bool(short.abs().sum() == 0),
                                                     "writes_ok": writes_ok, "window_free": window_free}
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpreted_table_form_equals_the_direct_form(interpreted, dtype):
    got = interpreted[f"table/{dtype}"]
    assert got["equal_direct"], "a request's output or cache differs from the one-request call"
    assert got["other_layers_untouched"]
    assert got["short_untouched"], "a position past the cache's length was written"
    assert got["writes_ok"], "write_kv_table wrote the wrong slots"
    assert got["window_free"], "the launch's window changed a request's output"


def test_rejects_bad_shapes():
    from chatterbox.kernels.decode_attention import CacheTable, decode_attention, decode_attention_table

    qkv = torch.zeros(2, 12, 16)
    cache = torch.zeros(2, 2, 4, 32, 16)
    cs = torch.zeros(16)
    pos = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention(torch.zeros(2, 11, 16), cs, cs, cache, pos, 4, 4)
    with pytest.raises(ValueError, match="layer_kv must be"):
        decode_attention(qkv, cs, cs, torch.zeros(2, 2, 4, 32, 8), pos, 4, 4)
    with pytest.raises(ValueError, match="cache dtype"):
        decode_attention(qkv, cs, cs, cache.half(), pos, 4, 4)
    table = CacheTable(torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="requests"):
        decode_attention_table(qkv, torch.zeros(2, 16), torch.zeros(2, 16), table, 0, 4, 4, 32)


def _rope_cuda(window: int, d: int = 64):
    half = torch.linspace(0, 3, d // 2, device="cuda")
    ang = torch.cat((half, half))  # halves repeated, as every caller's table
    return ang.cos().bfloat16(), ang.sin().bfloat16()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window,pos", [(128, 0), (256, 200), (512, 511), (1024, 700)])
def test_gpu_t3_shape(window, pos):
    from chatterbox.kernels.decode_attention import decode_attention, reference_decode_attention

    g = torch.Generator(device="cuda").manual_seed(window)
    qkv = torch.randn(2, 48, 64, device="cuda", generator=g).bfloat16()
    cache = torch.randn(2, 2, 16, window, 64, device="cuda", generator=g).bfloat16()
    cos, sin = _rope_cuda(window)
    position = torch.tensor([pos], device="cuda")
    c_ker = cache.clone()
    ref = reference_decode_attention(qkv.float(), cos.float(), sin.float(), cache.float(), position, 16, 16)
    got = decode_attention(qkv, cos, sin, c_ker, position, 16, 16)
    assert float((got.float() - ref).abs().max() / ref.abs().max()) <= TOL["bfloat16"]
    again_cache = cache.clone()
    assert torch.equal(decode_attention(qkv, cos, sin, again_cache, position, 16, 16), got)  # deterministic
    rest = torch.ones(window, dtype=torch.bool, device="cuda")
    rest[pos] = False
    assert torch.equal(c_ker[:, :, :, rest], cache[:, :, :, rest])


@pytest.mark.gpu
@gpu
def test_gpu_table_form_at_t3_shapes_matches_the_direct_form_and_ignores_its_companions():
    from chatterbox.kernels.decode_attention import CacheTable, decode_attention, decode_attention_table

    g = torch.Generator(device="cuda").manual_seed(3)
    lens, positions = [300, 700, 129], [299, 650, 128]
    caches = [torch.randn(2, 2, 2, 16, n, 64, device="cuda", generator=g).bfloat16() for n in lens]
    direct = [c[1].clone() for c in caches]
    qkv = torch.randn(6, 48, 64, device="cuda", generator=g).bfloat16()
    cos, sin = _rope_cuda(64)
    cos, sin = cos.expand(3, -1).contiguous(), sin.expand(3, -1).contiguous()

    def table_of(cs, idx):
        return CacheTable(torch.tensor([c.data_ptr() for c in cs], device="cuda"),
                          torch.tensor([lens[i] for i in idx], device="cuda"),
                          torch.tensor([positions[i] for i in idx], device="cuda"))

    got = decode_attention_table(qkv, cos, sin, table_of(caches, [0, 1, 2]), 1, 16, 16, 768)
    for i in range(3):
        want = decode_attention(qkv[2 * i:2 * i + 2], cos[i], sin[i], direct[i],
                                torch.tensor([positions[i]], device="cuda"), 16, 16)
        # the two forms compile to different code (the table form's strides are runtime values), so
        # they agree to bf16 rounding; both write the same rotated key and value
        err = float((got[2 * i:2 * i + 2].float() - want.float()).abs().max() / want.float().abs().max())
        assert err <= TOL["bfloat16"], (i, err)
        assert torch.equal(caches[i][1], direct[i])
    # what batching relies on: a request's numbers do not depend on the launch's window or on which
    # other requests share it (empty splits merge as exact zeros, splits merge in order)
    again = [c.clone() for c in caches]
    assert torch.equal(decode_attention_table(qkv, cos, sin, table_of(again, [0, 1, 2]), 1, 16, 16, 704), got)
    for i in (0, 2):
        alone = [caches[i].clone()]
        one = decode_attention_table(qkv[2 * i:2 * i + 2], cos[i:i + 1].contiguous(), sin[i:i + 1].contiguous(),
                                     table_of(alone, [i]), 1, 16, 16, lens[i])
        assert torch.equal(one, got[2 * i:2 * i + 2]), i
