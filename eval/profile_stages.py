"""Where the non-decode time and the GPU memory go, for one OptConfig.

    python -m eval.profile_stages --device cuda --config fast [--commit SHA] [--out eval/results/NAME]

Times (median of ``--reps``, after warm-up) T3's conditioning, prompt embeddings and eager prefill,
the start of a request on the engine's T3 runner (prompt + prefill as the pipeline runs it: a
captured prefill on the graphed runner), one CFM estimator call (the engine's estimator, graph-wrapped
when the config has CUDA graphs) and the flow encoder at the frame counts of a streaming chunk and of
a 250-token one-shot call, HiFT on a chunk, and a first streaming chunk end to end
(``generate_stream`` with a small first chunk); profiles one estimator call (top kernels); and
records allocated/peak GPU memory after loading, after ``set_opt``, after preparing a voice, and the
peak of a 250-token generation. Everything runs on the engine's modules, inside its autograd mode
and attention backend.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from .ab import environment, resolve_config
from .stages import engine_context, start_t3

log = logging.getLogger("eval.profile_stages")
ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def top_kernels(fn, device: torch.device, n: int = 15) -> dict:
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync(device)
    ks = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    attr = "device_time_total" if ks and hasattr(ks[0], "device_time_total") else "cuda_time_total"
    return {"gpu_ms": sum(getattr(e, attr) for e in ks) / 1e3, "kernels": sum(e.count for e in ks),
            "top": [{"name": e.key[:110], "ms": getattr(e, attr) / 1e3, "calls": e.count}
                    for e in sorted(ks, key=lambda e: getattr(e, attr), reverse=True)[:n]]}


def mem_gb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "reserved_gb": torch.cuda.memory_reserved(device) / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="fast")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--first-chunk", type=int, default=8)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "profile-stages"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from chatterbox import ChatterboxTTS
    from chatterbox.models.t3.t3 import CFG_BATCH
    from chatterbox.voice import synthetic_reference

    device = torch.device(args.device)
    res: dict = {"schema": "chatterbox-fast/profile-stages/1", "environment": environment(device, args.commit),
                 "config": args.config, "memory": {}, "ms": {}}
    tts = ChatterboxTTS.from_synthetic(device)
    res["memory"]["loaded"] = mem_gb(device)
    tts.set_opt(resolve_config(args.config))
    res["memory"]["after_set_opt"] = mem_gb(device)
    wav, sr = synthetic_reference(seconds=10.0), 24000
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        tts.prepare_conditionals(wav, sample_rate=sr)
    res["memory"]["after_prepare_conditionals"] = mem_gb(device)
    conds, s3, t3 = tts.conds, tts.s3gen, tts.t3
    segment = "Hello, this is a quick test of streaming speech."
    text = t3.check_text(tts.text_tokens(segment))
    ms = res["ms"]

    def runner_start():
        start_t3(tts, segment, 0, 8).close()  # prompt embeddings + prefill on the engine's T3 runner

    with engine_context(tts):
        ms["t3_prepare_conditioning"] = median_ms(lambda: t3.prepare_conditioning(conds.t3), device, args.reps)
        embeds = t3.prompt_embeds(conds.t3, text)
        ms["t3_prompt_embeds"] = median_ms(lambda: t3.prompt_embeds(conds.t3, text), device, args.reps)
        cache = t3.init_cache(CFG_BATCH, embeds.shape[1] + 8, device, embeds.dtype)
        ms["t3_prefill"] = median_ms(lambda: t3.prefill(embeds, cache), device, args.reps)
        res["prefill_positions"] = int(embeds.shape[1])
        ms["t3_runner_start"] = median_ms(runner_start, device, args.reps)
        res["t3_runner"] = type(tts.engine.t3_runner).__name__
        noise = tts.engine.cfm_noise(torch.Generator().manual_seed(0))
        est = s3.flow.decoder.estimator  # the engine's: graph-wrapped (BucketedEstimator) with CUDA graphs
        res["cfm_estimator"] = type(est).__name__
        for name, n_tokens in (("chunk_first", 5), ("chunk_window", 75), ("oneshot_250", 250)):
            toks = torch.randint(0, 6561, (1, n_tokens), device=device)
            c = s3.flow.prepare(toks, conds.gen.prompt_token, conds.gen.prompt_feat, conds.gen.embedding)
            frames = c.total_frames
            x = noise[:, :, :frames].to(device).expand(2, -1, -1).contiguous()
            mu, cond = c.mu.expand(2, -1, -1).contiguous(), c.cond.expand(2, -1, -1).contiguous()
            spks = c.spks.expand(2, -1).contiguous()
            mask = c.mask.expand(2, -1, -1).contiguous()
            t = torch.full((2,), 0.5, device=device)
            ms[f"flow_encoder_{name}"] = median_ms(
                lambda: s3.flow.prepare(toks, conds.gen.prompt_token, conds.gen.prompt_feat, conds.gen.embedding),
                device, args.reps)
            ms[f"cfm_estimator_call_{name}"] = median_ms(lambda: est(x, mask, mu, t, spks, cond), device, args.reps)
            ms[f"flow_inference_{name}"] = median_ms(
                lambda: s3.flow_inference(toks[0], conds.gen, cfm_noise=noise, n_timesteps=tts.opt.cfm_steps),
                device, args.reps)
            res[f"frames_{name}"] = frames
            if name == "chunk_window" and device.type == "cuda":
                res["estimator_profile_chunk_window"] = top_kernels(lambda: est(x, mask, mu, t, spks, cond), device)
        mel = torch.randn(1, 80, 50, device=device)
        ms["hift_50_frames"] = median_ms(lambda: s3.hift_inference(mel), device, args.reps)

    def first_chunk():
        stream = tts.generate_stream("Hello, this is a quick test of streaming speech.", chunk_size=[args.first_chunk, 25],
                                     max_new_tokens=60, seed=0, print_metrics=False, watermark=False)
        next(stream)
        stream.close()

    ms["stream_first_chunk_e2e"] = median_ms(first_chunk, device, args.reps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with engine_context(tts):
        tts.synthesize("Streaming speech synthesis has to start talking almost at once.", max_new_tokens=250,
                       seed=0, watermark=False)
    res["memory"]["generate_250"] = mem_gb(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    for k, v in ms.items():
        log.info("%-40s %8.2f ms", k, v)
    for k, v in res["memory"].items():
        log.info("mem %-30s %s", k, {a: round(b, 3) for a, b in v.items()})
    prof = res.get("estimator_profile_chunk_window")
    if prof:
        log.info("estimator call (chunk window, %d frames): %.2f ms GPU, %d kernels", res["frames_chunk_window"],
                 prof["gpu_ms"], prof["kernels"])
        for k in prof["top"][:12]:
            log.info("  %7.3f ms %4d  %s", k["ms"], k["calls"], k["name"][:90])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
