"""small_m_linear: the Triton small-M GEMV (``y = x @ W.T``), its custom op and the F.linear fallback.

CPU (CI): the kernel itself runs under the Triton interpreter in one subprocess (TRITON_INTERPRET=1
must be set before triton is imported, and an interpreted kernel cannot go through the custom op's
``wrap_triton``), through ``launch``; T3's four projection shapes run with their tuned configs on a
slice of the weight rows (same K, same compiled constants, four column blocks: the full shapes take
minutes in the interpreter), plus odd shapes (N, K not multiples of the blocks), M in {1, 2, 3}, split-K
and dot mode. In-process CPU tests cover the fallback, the dispatch rules, the op's fake impl and
graph (fake CUDA tensors) and torch.compile(fullgraph=True) with the eager/aot_eager backends.
GPU-marked tests run the full shapes, split-K determinism, and inductor + CUDA-graph capture.

Tolerances, on max|y - ref| / max|ref| with ref in float64: bfloat16 1e-2, float16 2e-3, float32 1e-4
(fp32 accumulation; bf16/fp16 are dominated by rounding the output). The same bound is asserted
against F.linear in the input dtype. Fallback paths must equal F.linear exactly.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatterbox.kernels import small_m_linear as sml

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-4}
T3_SHAPES = {"qkv": (3072, 1024), "o": (1024, 1024), "gate_up": (8192, 1024), "down": (1024, 4096)}
SLICE_BLOCKS = 4  # column blocks of the weight slice the interpreter runs for a T3 shape


def _cfg(**kw) -> dict:
    return kw


def interpreter_cases() -> dict[str, dict]:
    """id -> case for the interpreter subprocess: m, n, k, dtype, cfg (SmallMConfig kwargs or None =
    config_for the full shape ``cfg_nk``)."""
    cases: dict[str, dict] = {}
    for name, (n, k) in T3_SHAPES.items():
        for m in (1, 2, 3):
            block_n = sml.config_for(m, n, k, torch.bfloat16).block_n
            for extra in (0, -1):  # whole blocks, then a ragged last block
                rows = SLICE_BLOCKS * block_n + extra
                cases[f"t3-{name}-m{m}-n{rows}"] = dict(m=m, n=rows, k=k, dtype="bfloat16", cfg=None, cfg_nk=[n, k])
    cases["t3-down-split4"] = dict(m=2, n=16, k=4096, dtype="bfloat16", cfg=_cfg(block_n=8, block_k=1024, split_k=4))
    cases["t3-qkv-dot"] = dict(m=2, n=32, k=1024, dtype="float16",
                               cfg=_cfg(block_n=16, block_k=256, split_k=2, num_stages=3, mode="dot"))
    odd = [(1, 37, 100), (2, 50, 200), (3, 33, 90), (3, 19, 1000), (2, 7, 3000)]
    small = [(1, 13, 100), (3, 21, 90)]  # explicit configs: few programs (the interpreter's cost)
    for dtype in ("bfloat16", "float16", "float32"):
        for m, n, k in odd:
            cases[f"heuristic-{dtype}-{m}x{n}x{k}"] = dict(m=m, n=n, k=k, dtype=dtype, cfg=None, cfg_nk=None)
        for m, n, k in small:
            for i, cfg in enumerate((_cfg(block_n=4, block_k=32), _cfg(block_n=8, block_k=64, split_k=3),
                                     _cfg(block_n=2, block_k=16, num_warps=1), _cfg(block_n=1, block_k=32, split_k=2))):
                cases[f"fma{i}-{dtype}-{m}x{n}x{k}"] = dict(m=m, n=n, k=k, dtype=dtype, cfg=cfg)
            if dtype != "bfloat16":  # the interpreter's tl.dot multiplies bf16's raw uint16 storage (triton 3.5)
                for i, cfg in enumerate((_cfg(block_n=16, block_k=16, num_stages=2, mode="dot"),
                                         _cfg(block_n=32, block_k=32, split_k=2, num_stages=3, mode="dot"))):
                    cases[f"dot{i}-{dtype}-{m}x{n}x{k}"] = dict(m=m, n=n, k=k, dtype=dtype, cfg=cfg)
    return cases


INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from chatterbox.kernels import small_m_linear as sml

    torch.set_num_threads(1)
    out = {}
    for i, (cid, c) in enumerate(sorted(json.loads(sys.stdin.read()).items())):
        g = torch.Generator().manual_seed(i)
        dtype = getattr(torch, c["dtype"])
        x = torch.randn(c["m"], c["k"], generator=g).to(dtype)
        w = (torch.randn(c["n"], c["k"], generator=g) * c["k"] ** -0.5).to(dtype)
        if c["cfg"] is not None:
            cfg = sml.SmallMConfig(**c["cfg"])
        else:
            n, k = c["cfg_nk"] or (c["n"], c["k"])
            cfg = sml.config_for(c["m"], n, k, dtype)
        y = sml.launch(x, w, cfg)
        ref = x.double() @ w.double().T
        scale = max(float(ref.abs().max()), 1e-30)
        out[cid] = {"config": str(cfg), "shape": list(y.shape), "dtype": str(y.dtype).split(".")[-1],
                    "err_ref": float((y.double() - ref).abs().max()) / scale,
                    "err_linear": float((y.double() - F.linear(x, w).double()).abs().max()) / scale}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], input=json.dumps(interpreter_cases()),
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- interpreter
@pytest.mark.parametrize("case_id", sorted(interpreter_cases()))
def test_interpreted_kernel_matches_linear(interpreted, case_id):
    case, res = interpreter_cases()[case_id], interpreted[case_id]
    assert res["shape"] == [case["m"], case["n"]] and res["dtype"] == case["dtype"]
    tol = TOL[case["dtype"]]
    assert res["err_ref"] <= tol, res
    assert res["err_linear"] <= tol, res


def test_interpreter_cases_cover_the_tuned_t3_configs():
    cases = interpreter_cases()
    for name, (n, k) in T3_SHAPES.items():
        for m in (1, 2, 3):
            assert any(c["cfg_nk"] == [n, k] and c.get("m") == m for c in cases.values() if c["cfg"] is None)
    assert any(c["cfg"] and c["cfg"].get("split_k", 1) > 1 for c in cases.values())
    assert any(c["cfg"] and c["cfg"].get("mode") == "dot" for c in cases.values())


# ---------------------------------------------------------------------------------------- configs
def test_configs_for_t3_shapes_and_heuristic():
    for n, k in T3_SHAPES.values():
        cfg = sml.config_for(2, n, k, torch.bfloat16)
        assert cfg == sml.TUNED[(n, k)]
        # one 16-byte vector (8 bf16) per thread and W row per tile
        assert cfg.block_k == 8 * sml.WARP * cfg.num_warps and cfg.mode == "fma"
        assert sml.heuristic_config(2, n, k, 2, 132).mode == "fma"  # the untuned fallback stays valid
    fp32 = sml.config_for(2, 3072, 1024, torch.float32)
    assert fp32.block_k == 512 and fp32.num_warps == 4
    short = sml.heuristic_config(1, 37, 100, 2)
    assert short.block_k == 128 and short.num_warps == 1 and short.split_k == 1
    split = sml.heuristic_config(2, 64, 8192, 2, 132)
    assert split.block_n == sml.MIN_BLOCK_N and split.split_k == 8  # 32 column blocks x 8 slices of 1024
    big_m = sml.heuristic_config(8, 1 << 20, 1024, 2)
    assert big_m.block_n * 8 <= sml.MAX_ACC_ROWS


@pytest.mark.parametrize("kwargs", [dict(block_n=3, block_k=32), dict(block_n=4, block_k=48),
                                    dict(block_n=8, block_k=16, mode="dot"), dict(block_n=4, block_k=32, mode="x"),
                                    dict(block_n=4, block_k=32, split_k=0), dict(block_n=4, block_k=32, num_warps=3)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        sml.SmallMConfig(**kwargs)


# ---------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 64), (1, 1, 64), (3, 3, 64), (2, 1, 64)])
def test_cpu_falls_back_to_exact_linear(dtype, shape):
    x = torch.randn(*shape).to(dtype)
    w = torch.randn(48, 64).to(dtype)
    y = sml.small_m_linear(x, w)
    assert y.shape == (*shape[:-1], 48)
    assert torch.equal(y, F.linear(x, w))


def _fake_cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_supported_rules_on_fake_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = _fake_cuda(48, 64)
        assert sml.supported(_fake_cuda(2, 64), w)
        assert sml.supported(_fake_cuda(2, 1, 64), w)
        assert sml.supported(_fake_cuda(8, 64), w)
        assert not sml.supported(_fake_cuda(9, 64), w)  # M > 8
        assert not sml.supported(_fake_cuda(3, 3, 64), w)  # 9 rows in all
        assert not sml.supported(_fake_cuda(0, 64), w)
        assert not sml.supported(_fake_cuda(2, 64, dtype=torch.float16), w)  # mixed dtypes
        assert not sml.supported(_fake_cuda(2, 64, dtype=torch.float64), _fake_cuda(48, 64, dtype=torch.float64))
        assert not sml.supported(_fake_cuda(2, 64), _fake_cuda(64, 48).t())  # weight not contiguous
        assert not sml.supported(_fake_cuda(2, 63), w)  # K mismatch: F.linear raises its own error
        w_grad = _fake_cuda(48, 64).requires_grad_()
        assert not sml.supported(_fake_cuda(2, 64), w_grad)
        with torch.no_grad():
            assert sml.supported(_fake_cuda(2, 64), w_grad)
        y = sml.small_m_linear(_fake_cuda(2, 1, 64), w)  # the op's fake impl
        assert y.shape == (2, 1, 48) and y.dtype == torch.bfloat16 and y.device.type == "cuda"


def _op_graph(m: int, n: int, k: int):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    functional = pytest.importorskip("torch._subclasses.functional_tensor")  # private API (torch 2.9)
    dispatch_functionalize = functional.dispatch_functionalize

    with FakeTensorMode():
        x, w = _fake_cuda(m, k), _fake_cuda(n, k)
    # Without a GPU the HOP's mutation analysis cannot lower the kernel and warns; that is expected here.
    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = wrap_log.level
    wrap_log.setLevel(logging.ERROR)
    try:
        gm = make_fx(dispatch_functionalize(sml.small_m_linear_op), tracing_mode="fake")(x, w)
    finally:
        wrap_log.setLevel(level)
    return [node for node in gm.graph.nodes if "triton_kernel_wrapper" in str(node.target)]


def test_op_decomposes_into_the_triton_kernel():
    """What torch.compile sees: the triton_op traced (functionalised, fake CUDA tensors) is one call of
    the GEMV kernel with the tuned config's grid and constants."""
    calls = _op_graph(2, 1024, 4096)
    assert len(calls) == 1
    kwargs, grid = calls[0].kwargs["kwargs"], calls[0].kwargs["grid"]
    cfg = sml.TUNED[(1024, 4096)]
    assert tuple(grid[0]) == (1024 // cfg.block_n, 1, 1)
    assert (kwargs["M"], kwargs["N"], kwargs["K"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]) == (2, 1024, 4096, cfg.block_n, cfg.block_k)
    assert kwargs["EVEN_M"] and kwargs["EVEN_N"] and kwargs["EVEN_K"] and not kwargs["USE_DOT"]


def test_op_with_split_k_adds_the_reduction_kernel(monkeypatch):
    monkeypatch.setitem(sml.TUNED, (1024, 4096), sml.SmallMConfig(block_n=8, block_k=1024, split_k=4))
    calls = _op_graph(3, 1024, 4096)
    assert len(calls) == 2
    gemv, reduce = (c.kwargs for c in calls)
    assert tuple(gemv["grid"][0]) == (128, 4, 1) and gemv["kwargs"]["K_SLICE"] == 1024
    assert gemv["kwargs"]["M_PAD"] == 4 and not gemv["kwargs"]["EVEN_M"]
    assert reduce["kwargs"]["SPLIT_K"] == 4 and reduce["kwargs"]["MN"] == 3 * 1024


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_cpu(backend):
    torch._dynamo.reset()

    def f(x, w1, w2):
        return sml.small_m_linear(F.silu(sml.small_m_linear(x, w1)), w2)

    x, w1, w2 = torch.randn(2, 1, 64), torch.randn(96, 64), torch.randn(64, 96)
    out = torch.compile(f, fullgraph=True, dynamic=False, backend=backend)(x, w1, w2)
    ref = F.linear(F.silu(F.linear(x, w1)), w2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- GPU
def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


def _operands(m, n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(dtype)
    return x, w


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("name", list(T3_SHAPES))
def test_gpu_t3_shapes_match_linear(name, m):
    n, k = T3_SHAPES[name]
    x, w = _operands(m, n, k, torch.bfloat16)
    y = sml.small_m_linear(x, w)
    ref = x.double() @ w.double().T
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert _rel_err(y, ref) <= TOL["bfloat16"]
    assert _rel_err(y, F.linear(x, w).double()) <= TOL["bfloat16"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3072, 1024), (3, 1000, 4000), (1, 37, 100)])
def test_gpu_other_dtypes_and_odd_shapes(dtype, shape):
    x, w = _operands(*shape, dtype)
    ref = x.double() @ w.double().T
    assert _rel_err(sml.small_m_linear(x, w), ref) <= TOL[str(dtype).split(".")[-1]]


SWEEP_SAMPLE = [sml.SmallMConfig(block_n=8, block_k=1024, split_k=4), sml.SmallMConfig(block_n=4, block_k=2048, num_warps=8),
                sml.SmallMConfig(block_n=16, block_k=256, split_k=2, num_stages=3, mode="dot"),
                sml.SmallMConfig(block_n=32, block_k=128, num_stages=5, mode="dot")]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cfg", SWEEP_SAMPLE, ids=str)
def test_gpu_explicit_configs_and_deterministic_split_k(cfg, dtype):
    x, w = _operands(2, 1024, 4096, dtype)
    y = sml.launch(x, w, cfg)
    assert _rel_err(y, x.double() @ w.double().T) <= TOL[str(dtype).split(".")[-1]]
    assert torch.equal(y, sml.launch(x, w, cfg))  # no atomics: bitwise repeatable


@pytest.mark.gpu
@gpu
def test_gpu_fallbacks_are_exact_linear():
    x, w = _operands(9, 1024, 1024, torch.bfloat16)
    assert torch.equal(sml.small_m_linear(x, w), F.linear(x, w))  # M > 8
    wt = w.t().contiguous().t()
    assert torch.equal(sml.small_m_linear(x[:2], wt), F.linear(x[:2], wt))  # weight not contiguous


@pytest.mark.gpu
@gpu
def test_gpu_inductor_compile_and_cuda_graph():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()

    def f(x, w1, w2):
        return sml.small_m_linear(F.silu(sml.small_m_linear(x, w1)), w2)

    x, w1 = _operands(2, 8192, 1024, torch.bfloat16)
    _, w2 = _operands(2, 1024, 8192, torch.bfloat16, seed=1)
    x = x.view(2, 1, 1024)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    out, code = run_and_get_code(compiled, x, w1, w2)
    assert any("_small_m_kernel" in c for c in code)  # inductor launches our kernel, not a GEMM
    ref = f(x, w1, w2)
    assert _rel_err(out, ref.double()) <= TOL["bfloat16"]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled(x, w1, w2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = compiled(x, w1, w2)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, compiled(x, w1, w2))
