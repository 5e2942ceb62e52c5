"""fused_gemv: the small-M GEMV with the RMS-norm prologue, the SiLU-gate epilogue (interleaved gate/up
rows) and the residual epilogue.

CPU (CI): the kernel runs under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 before
triton is imported) through ``_launch`` against the torch compositions the functions stand for
(``F.linear(rms_norm(x))``, ``silu(gate) * up`` of it, ``residual + F.linear(x)``),
for M in {1, 2, 3}, ragged N and K, float32 and bfloat16. In-process: the public functions off
CUDA are exactly those compositions, and the fused decode routed through them equals the unfused
decode. GPU-marked: T3's four projection shapes with their tuned configs.

Tolerance, max|y - ref| / max|ref| with ref the same composition in float32 on the same (rounded)
inputs: float32 1e-5, bfloat16 1.6e-2 (the kernel rounds its output, and gate/up before the
activation, to bf16).
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import run_triton_interpreted

from chatterbox.kernels import fused_gemv as fg
from chatterbox.models.t3.fused_decode import FusedDecoder, allocate_stacked_cache
from chatterbox.models.t3.llama import KVCache, LlamaConfig
from chatterbox.nn.norm import rms_norm

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {"float32": 1e-5, "bfloat16": 1.6e-2}
EPS = 1e-5

# name -> (m, n, k, block_n, block_k)
CASES = {
    "even": (2, 8, 64, 2, 32),
    "one_row": (1, 6, 64, 2, 32),
    "three_rows_ragged": (3, 7, 80, 2, 32),
    "wide_tile": (2, 4, 128, 4, 64),
}

CHECK = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from chatterbox.kernels import fused_gemv as fg
    from chatterbox.kernels.small_m_linear import SmallMConfig
    from chatterbox.nn.norm import rms_norm

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    res = {}
    for name, (m, n, k, bn, bk) in json.loads(sys.argv[1]).items():
        cfg = SmallMConfig(block_n=bn, block_k=bk, num_warps=1)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(m * 100 + n + k)
            x = torch.randn(m, k, generator=g).to(dtype)
            w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
            nw = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype)
            r = torch.randn(m, n, generator=g).to(dtype)
            ne = n - n % 2
            wi = w[:ne]
            both = F.linear(rms_norm(x.float(), nw.float(), 1e-5), wi.float())
            want_glu = F.silu(both[:, 0::2]) * both[:, 1::2]
            got_glu = fg._launch(x, wi, k, fg.PRO_RMS, nw, None, 1e-5, cfg, glu_out=True)
            res[f"{name}/rmsglu/{str(dtype).split('.')[-1]}"] = {
                "rel": rel(got_glu.float(), want_glu.float()),
                "ok_shape": tuple(got_glu.shape) == (m, ne // 2) and got_glu.dtype == dtype}
            xf, wf, rf = x.float(), w.float(), r.float()
            want = {"rms": F.linear(rms_norm(xf, nw.float(), 1e-5), wf),
                    "res": rf + F.linear(xf, wf)}
            got = {"rms": fg._launch(x, w, k, fg.PRO_RMS, nw, None, 1e-5, cfg),
                   "res": fg._launch(x, w, k, fg.PRO_NONE, None, r, 0.0, cfg)}
            for kind in want:
                res[f"{name}/{kind}/{str(dtype).split('.')[-1]}"] = {
                    "rel": rel(got[kind].float(), want[kind].float()),
                    "ok_shape": tuple(got[kind].shape) == (m, n) and got[kind].dtype == dtype}
    print(json.dumps(res))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_triton_interpreted(CHECK, json.dumps(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", ["rms", "res", "rmsglu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpreted_kernel_matches_the_composition(interpreted, name, kind, dtype):
    got = interpreted[f"{name}/{kind}/{dtype}"]
    assert got["ok_shape"]
    assert got["rel"] <= TOL[dtype], got


def test_off_cuda_the_functions_are_the_torch_compositions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, generator=g)
    w, nw, r = torch.randn(16, 32, generator=g), torch.randn(32, generator=g), torch.randn(2, 1, 16, generator=g)
    assert torch.equal(fg.rms_linear(x, nw, w, EPS), F.linear(rms_norm(x, nw, EPS), w))
    assert torch.equal(fg.residual_linear(x, w, r), r + F.linear(x, w))
    wi = fg.interleave_rows(w[:8], w[8:])
    both = F.linear(rms_norm(x, nw, EPS), torch.cat((w[:8], w[8:])))
    assert torch.allclose(fg.rms_glu_linear(x, nw, wi, EPS), F.silu(both[..., :8]) * both[..., 8:], atol=1e-6)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fused_decode_with_gemv_fusion_equals_the_unfused_decode(kv_heads):
    base = LlamaConfig.tiny()
    cfg = LlamaConfig(**{**base.__dict__, "num_kv_heads": kv_heads})
    from chatterbox.models.t3.llama import LlamaModel

    def model_():
        torch.manual_seed(0)
        model = LlamaModel(cfg)
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        return model.eval().requires_grad_(False)

    fused = FusedDecoder.pack(model_())
    packed_model = model_()
    before = {k: v.clone() for k, v in packed_model.state_dict().items()}
    fusion = FusedDecoder.pack(packed_model, gemv_fusion=True)
    after = packed_model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # packing keeps the module's values
    cache_a = allocate_stacked_cache(cfg, 2, 16, "cpu", torch.float32)
    cache_b = allocate_stacked_cache(cfg, 2, 16, "cpu", torch.float32)
    g = torch.Generator().manual_seed(4)
    for pos in range(7):
        x, position = torch.randn(2, 1, cfg.hidden_size, generator=g), torch.tensor([pos])
        want = fused.decode(x, position, KVCache(cache_a.k[:, :, :, :8], cache_a.v[:, :, :, :8]))
        got = fusion.decode(x, position, KVCache(cache_b.k[:, :, :, :8], cache_b.v[:, :, :, :8]))
        assert float((got - want).abs().max()) <= 2e-5
    assert float((cache_a.k - cache_b.k).abs().max()) <= 2e-5


def test_t3_gemv_fusion_needs_the_fused_decode():
    from chatterbox.opt import OptConfig

    with pytest.raises(ValueError, match="t3_gemv_fusion needs t3_fused_decode"):
        OptConfig.parse("reference+t3_gemv_fusion=1")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k", [(3072, 1024), (1024, 1024), (8192, 1024), (1024, 4096)])
def test_gpu_t3_shapes(n, k):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(2, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    nw = (1 + 0.3 * torch.randn(k, device="cuda", generator=g)).bfloat16()
    r = torch.randn(2, n, device="cuda", generator=g).bfloat16()
    both = F.linear(rms_norm(x, nw, EPS), w)
    pairs = [(fg.rms_linear(x, nw, w, EPS), both),
             (fg.rms_glu_linear(x, nw, w, EPS), F.silu(both[..., 0::2]) * both[..., 1::2]),
             (fg.residual_linear(x, w, r), r + F.linear(x, w))]
    for got, want in pairs:
        assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) <= TOL["bfloat16"]
