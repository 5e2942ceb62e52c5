"""Where a T3 token's time goes: wall time per token against GPU kernel time per token.

    python -m eval.profile_t3 --device cuda --config fast [--tokens 200] [--out eval/results/NAME]

Runs T3 generation (synthetic weights, a short text, a fixed seed) through the engine's T3 runner
(``tts.engine.t3_runner``: the one the pipeline uses, eager or graphed as the config says) under
torch.profiler after a warm-up, and reports wall ms/token, summed CUDA kernel ms/token (GPU busy
time), the gap between them (host-side work the GPU waits for), and the kernels with the most total
time. On a CPU device only the wall time and the top host ops are meaningful.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from .ab import environment, resolve_config
from .stages import sync, t3_generate

log = logging.getLogger("eval.profile_t3")
ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there, this is a profile run."


def generate_ids(tts, tokens: int, seed: int) -> torch.Tensor:
    """One T3 generation of up to ``tokens`` tokens (the profile text, ``synthesize``'s default
    sampling) on the engine's T3 runner -> ids (1, N)."""
    return t3_generate(tts, TEXT, seed, tokens)[None]


def generate(tts, tokens: int, seed: int) -> int:
    return int(generate_ids(tts, tokens, seed).shape[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="fast")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "profile-t3"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from chatterbox import ChatterboxTTS

    device = torch.device(args.device)
    tts = ChatterboxTTS.from_synthetic(device, opt=resolve_config(args.config))
    generate(tts, args.tokens, 0)  # warm-up: captures, allocator, kernels
    sync(device)
    t0 = time.perf_counter()
    n = generate(tts, args.tokens, 1)
    sync(device)
    wall_plain = (time.perf_counter() - t0) / n
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        n = generate(tts, args.tokens, 1)
        sync(device)
        wall_prof = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    attr = "device_time_total" if kernels and hasattr(kernels[0], "device_time_total") else "cuda_time_total"
    gpu_us = sum(getattr(e, attr) for e in kernels)
    top = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)[:15]
    cpu_top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    result = {
        "schema": "chatterbox-fast/profile-t3/1",
        "environment": environment(device, args.commit),
        "config": args.config,
        "t3_runner": type(tts.engine.t3_runner).__name__,
        "tokens": n,
        "wall_ms_per_token": wall_plain * 1e3,
        "wall_ms_per_token_profiled": wall_prof * 1e3,
        "gpu_kernel_ms_per_token": gpu_us / 1e3 / n,
        "host_gap_ms_per_token": wall_prof * 1e3 - gpu_us / 1e3 / n,
        "top_kernels": [{"name": e.key[:120], "ms_total": getattr(e, attr) / 1e3, "calls": e.count} for e in top],
        "top_cpu_ops": [{"name": e.key[:120], "self_cpu_ms_total": e.self_cpu_time_total / 1e3, "calls": e.count}
                        for e in cpu_top],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    log.info("%s: %d tokens, wall %.2f ms/token, GPU kernels %.2f ms/token, host gap %.2f ms/token",
             args.config, n, result["wall_ms_per_token"], result["gpu_kernel_ms_per_token"],
             result["host_gap_ms_per_token"])
    for k in result["top_kernels"][:8]:
        log.info("  %8.2f ms  %6d  %s", k["ms_total"], k["calls"], k["name"][:90])
    for k in result["top_cpu_ops"][:8]:
        log.info("  cpu %8.2f ms  %6d  %s", k["self_cpu_ms_total"], k["calls"], k["name"][:90])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
