"""Where ``prepare_conditionals`` (making a voice from a 10 s reference) spends its time.

    PYTHONPATH=src python -m eval.profile_conds --device cuda --opt fast [--reps 30] \\
        [--commit SHA] [--out eval/results/NAME.json]

Loads the pipeline on synthetic weights (``ChatterboxTTS.from_synthetic``), applies ``--opt`` with
``set_opt``, builds the synthetic 10 s, 24 kHz reference (as ``eval.ab`` does), warms up, then:

* ``tts_total``: ``tts.prepare_conditionals`` timed as ``eval.ab`` times it (device synchronised
  before and after; includes the copy the pipeline keeps), median over ``--reps``;
* ``voice_total``: the library call ``voice.prepare_conditionals`` alone (on the engine's modules,
  ``tts.s3gen`` and ``tts.ve``, with the engine's voice settings), and ``voice_host``: how
  long it takes to return before the final synchronisation (the host's share: when it is close to
  ``voice_total`` the call is bound by host work and kernel launches, not by the device);
* ``stages``: one timed call per rep with a timer that synchronises the device around every stage
  (CUDA only) and reads the wall clock; the stages are the ones ``prepare_conditionals`` and
  ``S3Gen.embed_ref`` mark. The synchronisations stop host and device from overlapping, so the
  stage sum exceeds ``voice_total``; ``breakdown_output_equal`` checks that the timed call gave
  the same voice as an untimed one;
* ``frontend_max_abs_diff_vs_per_call``: each front end with prebuilt constants (reference mel,
  24 -> 16 kHz resampling, CAMPPlus fbank, voice-encoder mel) against the per-call computation it
  replaced (torchaudio's resampler and fbank, filterbanks built per call), on the same device;
* on CUDA, ``syncs``: the device synchronisations one call makes (``torch.cuda`` sync debug
  mode, with the source line of each), and ``kernels``: the GPU kernel time and launch count of
  one call under ``torch.profiler``.

Writes a JSON (schema ``chatterbox-fast/profile-conds/1``) and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .ab import environment, resolve_config
from .stages import engine_context
from .texts import REFERENCE_SECONDS, reference_audio

log = logging.getLogger("eval.profile_conds")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "chatterbox-fast/profile-conds/1"
MS = 1e3
TOP_OPS = 15


class SyncStageTimer:
    """``StageTimer``-compatible: wall time per stage, the device synchronised on entry and exit."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.times: dict[str, float] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _voice_tensors(conds) -> dict[str, torch.Tensor]:
    out = {f"t3.{k}": v for k, v in conds.t3.as_dict().items() if torch.is_tensor(v)}
    out.update({f"gen.{k}": v for k, v in conds.gen.as_dict().items() if torch.is_tensor(v)})
    return out


def _summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * MS, "min_ms": ordered[0] * MS, "max_ms": ordered[-1] * MS,
            "n": len(ordered)}


def time_tts_total(tts, wav, sr: int, reps: int) -> list[float]:
    """``eval.stages.prepare_conditionals_seconds``: the pipeline call, synchronised both ends."""
    saved, out = tts.conds, []
    try:
        for _ in range(reps):
            _sync(tts.device)
            t0 = time.perf_counter()
            tts.prepare_conditionals(wav, sample_rate=sr)
            _sync(tts.device)
            out.append(time.perf_counter() - t0)
    finally:
        tts.conds = saved
    return out


def time_voice_call(tts, wav, sr: int, reps: int, autograd) -> tuple[list[float], list[float]]:
    """The library call: (seconds until it returns, seconds until the device has finished)."""
    from chatterbox.voice import prepare_conditionals

    host, total = [], []
    for _ in range(reps):
        _sync(tts.device)
        t0 = time.perf_counter()
        with autograd():
            prepare_conditionals(tts.s3gen, tts.ve, wav, sample_rate=sr, cfg=tts.engine.cfg.voice)
        t1 = time.perf_counter()
        _sync(tts.device)
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return host, total


def time_stages(tts, wav, sr: int, reps: int, autograd) -> tuple[dict[str, list[float]], bool, float]:
    """Per-stage seconds over ``reps`` synchronised calls; whether the last one's voice equals an
    untimed call's, and the largest absolute difference."""
    from chatterbox.voice import prepare_conditionals

    per_stage: dict[str, list[float]] = {}
    conds = None
    for _ in range(reps):
        timer = SyncStageTimer(tts.device)
        with autograd():
            conds = prepare_conditionals(tts.s3gen, tts.ve, wav, sample_rate=sr, cfg=tts.engine.cfg.voice, timer=timer)
        for name, seconds in timer.times.items():
            per_stage.setdefault(name, []).append(seconds)
    with autograd():
        plain = prepare_conditionals(tts.s3gen, tts.ve, wav, sample_rate=sr, cfg=tts.engine.cfg.voice)
    a, b = _voice_tensors(conds), _voice_tensors(plain)
    equal = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a
                if k in b and a[k].shape == b[k].shape and a[k].numel()), default=0.0)
    return per_stage, equal, diff


def frontend_check(tts, wav, sr: int) -> dict:
    """Each prebuilt-constant front end against the per-call computation it replaced, on the
    pipeline's device: max |difference| (0.0 = equal). On the CPU all are exactly equal; on CUDA
    the fbank's Povey window is now computed on the host (torchaudio computed it on the device)."""
    import numpy as np
    import torchaudio.compliance.kaldi as ta_kaldi

    from chatterbox.audio import resample_soxr, resample_torchaudio, s3gen_mel_spectrogram, ve_mel_spectrogram

    s3gen, ve, device = tts.s3gen, tts.ve, tts.device
    wav24 = torch.from_numpy(np.ascontiguousarray(wav[: int(tts.engine.cfg.voice.s3gen_reference_seconds * sr)]))
    wav24 = wav24.to(device)[None]
    wav16 = torch.from_numpy(resample_soxr(wav, sr, tts.engine.cfg.voice.tokenizer_sample_rate)).to(device)
    pairs = {}
    with torch.inference_mode():
        pairs["s3gen_mel"] = (s3gen.reference_mel(wav24, sr),
                              s3gen_mel_spectrogram(wav24, s3gen.cfg.mel).transpose(1, 2))
        new16 = s3gen.resample_to_tokenizer_rate(wav24, sr)
        old16 = resample_torchaudio(wav24, sr, s3gen.cfg.tokenizer_sample_rate)
        pairs["resample_16k"] = (new16, old16)
        fb = ta_kaldi.fbank(old16, num_mel_bins=s3gen.cfg.speaker_encoder.feat_dim,
                            sample_frequency=float(s3gen.cfg.tokenizer_sample_rate))
        pairs["campplus_fbank"] = (s3gen.speaker_encoder.features(old16), (fb - fb.mean(dim=0, keepdim=True))[None])
        pairs["ve_mel"] = (ve.mel(wav16), ve_mel_spectrogram(wav16, ve.cfg.mel).transpose(0, 1))
    return {name: (new - old).abs().max().item() if new.shape == old.shape else float("nan")
            for name, (new, old) in pairs.items()}


def _call_site() -> str:
    """The innermost frame of this repository's code on the current stack (file:line function)."""
    import traceback

    ours = [f for f in traceback.extract_stack() if "chatterbox" in f.filename and "profile_conds" not in f.filename]
    if not ours:
        return "?"
    f = ours[-1]
    return f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}"


def count_syncs(tts, wav, sr: int, autograd) -> dict:
    """Device synchronisations of one call, from CUDA sync debug mode (a warning per sync), each
    attributed to the innermost line of our code that led to it."""
    from chatterbox.voice import prepare_conditionals

    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0][:80]
        if "synchroniz" not in text:  # sync debug mode says "called a synchronizing CUDA operation"
            return
        key = f"{_call_site()} <- {Path(filename).name}:{lineno}: {text}"
        sites[key] = sites.get(key, 0) + 1

    _sync(tts.device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with autograd():
                prepare_conditionals(tts.s3gen, tts.ve, wav, sample_rate=sr, cfg=tts.engine.cfg.voice)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return {"count": sum(sites.values()), "sites": sites}


def kernel_profile(tts, wav, sr: int, autograd) -> dict:
    """GPU kernel time, kernel launches and the top host ops of one call under torch.profiler."""
    from chatterbox.voice import prepare_conditionals

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    _sync(tts.device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        with autograd():
            prepare_conditionals(tts.s3gen, tts.ve, wav, sample_rate=sr, cfg=tts.engine.cfg.voice)
        _sync(tts.device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    attr = "device_time_total" if kernels and hasattr(kernels[0], "device_time_total") else "cuda_time_total"
    gpu_us = sum(getattr(e, attr) for e in kernels)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    memcpy = {e.key: e.count for e in events if "Memcpy" in e.key or "memcpy" in e.key.lower()}
    top_cpu = sorted((e for e in events if e.device_type != torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    top_gpu = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)[:TOP_OPS]
    return {
        "wall_ms_profiled": wall * MS,
        "gpu_kernel_ms": gpu_us / 1e3,
        "kernel_launches": launches,
        "memcpy_calls": memcpy,
        "top_cpu_ops": [{"name": e.key[:100], "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                        for e in top_cpu],
        "top_kernels": [{"name": e.key[:100], "ms": getattr(e, attr) / 1e3, "calls": e.count} for e in top_gpu],
    }


def print_table(result: dict) -> None:
    stages = result["stages"]
    total = sum(s["median_ms"] for s in stages.values())
    print(f"\nprepare_conditionals on {result['env']['device_name']} ({result['env']['device']}), "
          f"opt={result['settings']['opt']}, {result['settings']['reference_seconds']:g} s reference, "
          f"{result['settings']['reps']} reps (medians)")
    print(f"  {'stage':24s} {'ms':>9s} {'min':>9s} {'share':>6s}")
    for name, s in stages.items():
        print(f"  {name:24s} {s['median_ms']:9.2f} {s['min_ms']:9.2f} {100 * s['median_ms'] / total:5.1f}%")
    print(f"  {'sum of stages (synced)':24s} {total:9.2f}")
    for key in ("voice_host", "voice_total", "tts_total"):
        print(f"  {key:24s} {result['totals'][key]['median_ms']:9.2f} {result['totals'][key]['min_ms']:9.2f}")
    print(f"  breakdown output equal to an untimed call: {result['breakdown_output_equal']}")
    if "frontend_max_abs_diff_vs_per_call" in result:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in result["frontend_max_abs_diff_vs_per_call"].items())
        print(f"  front ends vs the per-call computation (max |diff|): {diffs}")
    if "syncs" in result:
        print(f"  device syncs per call: {result['syncs']['count']}")
        for site, n in result["syncs"]["sites"].items():
            print(f"    {n} x {site}")
    if "kernels" in result:
        k = result["kernels"]
        print(f"  GPU kernel time {k['gpu_kernel_ms']:.2f} ms in {k['kernel_launches']} launches "
              f"(profiled wall {k['wall_ms_profiled']:.2f} ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--opt", default="reference", help="OptConfig preset or spec applied with set_opt (e.g. fast)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=REFERENCE_SECONDS, help="reference length")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-kernel-profile", action="store_true", help="skip the torch.profiler pass (CUDA)")
    ap.add_argument("--commit", default=None, help="commit to record when the tree has no .git")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default eval/results/profile-conds-DEVICE-OPT.json)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from chatterbox import ChatterboxTTS

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opt = resolve_config(args.opt)
    tts = ChatterboxTTS.from_synthetic(device)
    tts.set_opt(opt)

    def autograd():  # the engine's autograd mode and attention backend, as Engine.prepare_conditionals enters them
        return engine_context(tts)

    wav, sr = reference_audio(None, seconds=args.seconds)
    log.info("warm-up: %d calls", args.warmup)
    time_tts_total(tts, wav, sr, args.warmup)
    time_voice_call(tts, wav, sr, args.warmup, autograd)
    time_stages(tts, wav, sr, 1, autograd)

    tts_total = time_tts_total(tts, wav, sr, args.reps)
    voice_host, voice_total = time_voice_call(tts, wav, sr, args.reps, autograd)
    per_stage, equal, diff = time_stages(tts, wav, sr, args.reps, autograd)
    result = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m eval.profile_conds", *(argv if argv is not None else sys.argv[1:])]),
        "env": environment(device, args.commit),
        "settings": {"opt": args.opt, "opt_spec": opt.to_spec(), "reps": args.reps, "warmup": args.warmup,
                     "reference_seconds": len(wav) / sr, "reference_sample_rate": sr,
                     "reference_audio": "synthetic", "checkpoint": "synthetic"},
        "totals": {"tts_total": _summary(tts_total), "voice_total": _summary(voice_total),
                   "voice_host": _summary(voice_host)},
        "stages": {name: _summary(v) for name, v in per_stage.items()},
        "breakdown_output_equal": equal,
        "breakdown_output_max_abs_diff": diff,
    }
    result["stages_sum_ms"] = sum(s["median_ms"] for s in result["stages"].values())
    result["frontend_max_abs_diff_vs_per_call"] = frontend_check(tts, wav, sr)
    if device.type == "cuda":
        result["syncs"] = count_syncs(tts, wav, sr, autograd)
        if not args.no_kernel_profile:
            result["kernels"] = kernel_profile(tts, wav, sr, autograd)
    out = args.out or ROOT / "eval" / "results" / f"profile-conds-{device.type}-{args.opt.replace('+', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
