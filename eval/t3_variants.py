"""T3 decode speed of several OptConfig specs in one process (one model load), interleaved.

    python -m eval.t3_variants --device cuda --configs fast+t3_gemv=0,fast [--tokens 200]
        [--reps 3] [--profile SPEC] [--commit SHA] [--out eval/results/NAME]

Per config: ``set_opt`` (timed: a new engine, with its weight packing, compile set-up and, on the
graphed runner, the default graph captures), one untimed warm-up generation (the remaining captures,
compilation: timed separately as ``warmup_s``), then ``--reps`` timed generations of ``--tokens``
tokens each, all on the engine's T3 runner (``tts.engine.t3_runner``). Reports the
median ms/token and tokens/s, the ratio to the first config, how many tokens equal the first
config's for the same seed, and peak GPU memory. ``--profile SPEC`` adds a torch.profiler pass of
one config: GPU kernel ms/token and the top kernels. Configs run one after another (not
interleaved): switching configs builds a new engine (weights converted, graphs captured again).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from .ab import environment, resolve_config, switch_config
from .profile_t3 import TEXT, generate, generate_ids

log = logging.getLogger("eval.t3_variants")
ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(tts, tokens: int, seed: int) -> tuple[float, list[int]]:
    _sync(tts.device)
    t0 = time.perf_counter()
    out = generate_ids(tts, tokens, seed)
    _sync(tts.device)
    return time.perf_counter() - t0, out[0].tolist()


def profile_one(tts, tokens: int) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if tts.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        n = generate(tts, tokens, 1)
        _sync(tts.device)
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    attr = "device_time_total" if kernels and hasattr(kernels[0], "device_time_total") else "cuda_time_total"
    total = sum(getattr(e, attr) for e in kernels)
    top = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)[:20]
    return {"tokens": n, "gpu_kernel_ms_per_token": total / 1e3 / n,
            "kernel_launches_per_token": sum(e.count for e in kernels) / n,
            "top_kernels": [{"name": e.key[:120], "us_per_token": getattr(e, attr) / n, "calls_per_token": e.count / n}
                            for e in top]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="fast+t3_gemv=0,fast")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", default=None, help="a spec from --configs to profile")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "t3-variants"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from chatterbox import ChatterboxTTS

    device = torch.device(args.device)
    specs = [s.strip() for s in args.configs.split(",") if s.strip()]
    tts = ChatterboxTTS.from_synthetic(device)
    result_profile = None
    rows = {s: {"config": s, "spec": resolve_config(s).to_spec(), "samples_s": []} for s in specs}
    for spec in specs:  # one config at a time: switching re-converts weights and re-captures graphs
        rows[spec]["set_opt_s"] = switch_config(tts, resolve_config(spec))
        rows[spec]["t3_runner"] = type(tts.engine.t3_runner).__name__
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows[spec]["warmup_s"] = timed_generation(tts, args.tokens, 0)[0]
        for _ in range(args.reps):
            seconds, tokens = timed_generation(tts, args.tokens, 1)
            rows[spec]["samples_s"].append(seconds)
            rows[spec]["tokens"] = len(tokens)
            rows[spec]["token_ids"] = tokens
        if device.type == "cuda":
            rows[spec]["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        log.info("%s: set_opt %.2f s, warm-up %.2f s, %.3f ms/token", spec, rows[spec]["set_opt_s"],
                 rows[spec]["warmup_s"], statistics.median(rows[spec]["samples_s"]) * 1e3 / rows[spec]["tokens"])
        if args.profile == spec:
            result_profile = {"config": spec, **profile_one(tts, args.tokens)}
    base = rows[specs[0]]
    for spec in specs:
        r = rows[spec]
        med = statistics.median(r["samples_s"])
        r["ms_per_token"] = med * 1e3 / r["tokens"]
        r["tokens_per_s"] = r["tokens"] / med
        r["speedup_vs_first"] = (statistics.median(base["samples_s"]) / base["tokens"]) / (med / r["tokens"])
        n = min(len(r["token_ids"]), len(base["token_ids"]))
        r["token_agreement_vs_first"] = sum(a == b for a, b in zip(r["token_ids"], base["token_ids"])) / max(n, 1)
        log.info("%-60s %7.3f ms/token %7.1f tok/s x%.2f agree %.2f", spec, r["ms_per_token"], r["tokens_per_s"],
                 r["speedup_vs_first"], r["token_agreement_vs_first"])
    result = {"schema": "chatterbox-fast/t3-variants/1", "environment": environment(device, args.commit),
              "settings": {"tokens": args.tokens, "reps": args.reps, "text": TEXT,
                           "seed": 1, "batch": "1 (CFG pair of 2)"},
              "configs": [rows[s] for s in specs]}
    if args.profile in rows:
        result["profile"] = p = result_profile
        log.info("profile %s: GPU kernels %.3f ms/token, %.0f launches/token", args.profile,
                 p["gpu_kernel_ms_per_token"], p["kernel_launches_per_token"])
        for k in p["top_kernels"][:12]:
            log.info("  %7.1f us/token %5.1f calls  %s", k["us_per_token"], k["calls_per_token"], k["name"][:90])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
