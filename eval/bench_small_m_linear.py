"""GPU micro-benchmark: ``F.linear`` vs ``small_m_linear`` on T3's decode projections (M = 2 rows, bf16).

    python -m eval.bench_small_m_linear [--commit SHA] [--out eval/results/h100-small-m-linear.json]
        [--reps 30] [--calls 100] [--sweep] [--hot]

Needs only torch and triton (and this repository's ``src`` on the path, added if missing). Per shape
and implementation, one CUDA graph of ``--calls`` back-to-back calls is captured and replayed
``--reps`` times (after warm-up replays); the median replay time / calls is the reported us/call,
and (weight + x + y bytes) / that time the achieved GB/s.

The calls cycle through enough copies of the weight to exceed ``--rotate-mb`` (default 256 MB, a
multiple of an H100's 50 MB L2), so each call streams its weight from HBM as in decode, where a
layer's weights are long evicted by the other 29 layers. ``--hot`` reuses one weight (L2-resident
for the smaller shapes; an upper bound, not the decode situation).

``--sweep`` also times candidate ``SmallMConfig``s per shape through ``launch`` and prints the
fastest as a ``TUNED`` table for src/chatterbox/kernels/small_m_linear.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    from chatterbox.kernels import small_m_linear as sml
except ImportError:  # not installed: use the checkout's sources
    sys.path.insert(0, str(ROOT / "src"))
    from chatterbox.kernels import small_m_linear as sml

import triton

log = logging.getLogger("eval.bench_small_m_linear")

SHAPES = {"qkv": (3072, 1024), "o": (1024, 1024), "gate_up": (8192, 1024), "down": (1024, 4096)}
ROWS = 2
DTYPE = torch.bfloat16
WARMUP_REPLAYS = 3
MB = 1e6


def environment(commit: str | None) -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        head = None
    return {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": head or commit,
            "sms": torch.cuda.get_device_properties(0).multi_processor_count}


def graph_us_per_call(fn, weights: list, calls: int, reps: int) -> float:
    """Median over ``reps`` replays of a CUDA graph of ``calls`` calls ``fn(weights[i % len])``, in us/call
    (``weights``: whatever ``fn`` cycles through, e.g. weight tensors or layer indices)."""
    for w in weights[:2]:
        fn(w)  # compile / pick kernels outside capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(weights[i % len(weights)])
    for _ in range(WARMUP_REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def sweep_configs(n: int, k: int) -> list[sml.SmallMConfig]:
    """Candidate configs for one (N, K): fma with 2/4/8 warps (block_k one 16-byte vector per thread)
    at several block_n and split_k, and dot mode at a few tile/pipeline settings."""
    vec = sml.VECTOR_BYTES // DTYPE.itemsize
    out = []
    for warps in (2, 4, 8):
        block_k = vec * sml.WARP * warps
        if block_k > k:
            continue
        for block_n in (1, 2, 4, 8, 16):
            for split_k in (1, 2, 4):
                if k >= split_k * block_k and triton.cdiv(n, block_n) * split_k <= 16384:
                    out.append(sml.SmallMConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=warps))
    for block_n in (16, 32):
        for block_k in (128, 256):
            for stages in (3, 5):
                for split_k in (1, 2, 4):
                    if k >= split_k * block_k * 2:
                        out.append(sml.SmallMConfig(block_n=block_n, block_k=block_k, split_k=split_k,
                                                    num_stages=stages, mode="dot"))
    return out


def bench_shape(name: str, n: int, k: int, args) -> dict:
    w_bytes = n * k * DTYPE.itemsize
    copies = 1 if args.hot else max(2, int(args.rotate_mb * MB // w_bytes) + 1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) * k ** -0.5 for _ in range(copies)]
    x = torch.randn(ROWS, k, device="cuda", dtype=DTYPE, generator=gen)
    moved = w_bytes + (ROWS * k + ROWS * n) * DTYPE.itemsize
    ref = F.linear(x.float(), weights[0].float())
    scale = float(ref.abs().max())
    row = {"shape": [ROWS, n, k], "weight_mb": w_bytes / MB, "weight_copies": copies,
           "config": str(sml.config_for(ROWS, n, k, DTYPE, torch.cuda.get_device_properties(0).multi_processor_count)),
           "max_err_rel": {"F.linear": float((F.linear(x, weights[0]).float() - ref).abs().max()) / scale,
                           "small_m_linear": float((sml.small_m_linear(x, weights[0]).float() - ref).abs().max())
                           / scale}}
    for label, fn in (("F.linear", lambda w: F.linear(x, w)), ("small_m_linear", lambda w: sml.small_m_linear(x, w))):
        us = graph_us_per_call(fn, weights, args.calls, args.reps)
        row[label] = {"us": us, "gb_s": moved / (us * 1e-6) / 1e9}
    row["speedup"] = row["F.linear"]["us"] / row["small_m_linear"]["us"]
    log.info("%-8s F.linear %6.2f us %6.0f GB/s | small_m_linear %6.2f us %6.0f GB/s | x%.2f (%s)", name,
             row["F.linear"]["us"], row["F.linear"]["gb_s"], row["small_m_linear"]["us"],
             row["small_m_linear"]["gb_s"], row["speedup"], row["config"])
    if args.sweep:
        results = []
        for cfg in sweep_configs(n, k):
            try:
                if float((sml.launch(x, weights[0], cfg).float() - ref).abs().max()) > 1e-2 * scale:
                    raise RuntimeError("wrong result")
                us = graph_us_per_call(lambda w, c=cfg: sml.launch(x, w, c), weights, args.calls, args.reps)
            except Exception as exc:  # a config that fails to compile or run is reported, not fatal
                results.append({"config": str(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            results.append({"config": str(cfg), "us": us, "gb_s": moved / (us * 1e-6) / 1e9})
        ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
        row["sweep"] = ok + [r for r in results if "us" not in r]
        for r in ok[:5]:
            log.info("    sweep %6.2f us %6.0f GB/s  %s", r["us"], r["gb_s"], r["config"])
    del weights
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commit", default=None, help="git commit to record when the checkout has no .git")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--reps", type=int, default=30, help="timed graph replays per measurement")
    p.add_argument("--calls", type=int, default=100, help="calls captured in one graph")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="total weight bytes cycled through (MB)")
    p.add_argument("--hot", action="store_true", help="reuse one weight (L2-resident) instead of rotating")
    p.add_argument("--sweep", action="store_true", help="also time candidate configs and print a TUNED table")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    result = {"env": environment(args.commit), "rows": ROWS, "dtype": str(DTYPE), "calls_per_graph": args.calls,
              "reps": args.reps, "hot": args.hot, "shapes": {}}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        result["shapes"][name] = bench_shape(name, n, k, args)
    total = {lab: sum(r[lab]["us"] for r in result["shapes"].values()) for lab in ("F.linear", "small_m_linear")}
    result["sum_us"] = total
    log.info("sum over shapes: F.linear %.2f us, small_m_linear %.2f us (one layer's four projections)",
             total["F.linear"], total["small_m_linear"])
    if args.sweep:
        log.info("TUNED = {")
        for name, row in result["shapes"].items():
            if row["sweep"] and "us" in row["sweep"][0]:
                log.info("    (%d, %d): %s,  # %s %.2f us", row["shape"][1], row["shape"][2],
                         row["sweep"][0]["config"], name, row["sweep"][0]["us"])
        log.info("}")
    if args.out:
        out = Path(args.out if args.out.endswith(".json") else args.out + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", out)
    return result


if __name__ == "__main__":
    main()
