"""Times an upstream chatterbox(-streaming) checkout. Run by ``eval/upstream.py`` in a subprocess:

    python upstream_driver.py SPEC.json

It imports only the standard library, torch and the upstream package (never chatterbox-fast), and
prints exactly one line ``UPSTREAM_RESULT {json}``: status "ok", "skipped" (a package upstream needs
is missing) or "failed" (anything else), never a traceback as its only answer.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
import traceback

MARK = "UPSTREAM_RESULT "
# Modules upstream's ChatterboxTTS imports (directly or through its models), with their pip names.
UPSTREAM_MODULES = {
    "torch": "torch", "torchaudio": "torchaudio", "numpy": "numpy", "librosa": "librosa",
    "transformers": "transformers", "diffusers": "diffusers", "omegaconf": "omegaconf",
    "conformer": "conformer", "s3tokenizer": "s3tokenizer", "perth": "resemble-perth",
    "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "tokenizers": "tokenizers",
}


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def missing_modules() -> list[str]:
    out = []
    for module, package in UPSTREAM_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(module if module == package else f"{module} (pip: {package})")
    return out


class _NoWatermark:
    """Stands in for perth's watermarker when the comparison runs without watermarking (as ours
    does when resemble-perth is not installed): upstream imports perth unconditionally."""

    def apply_watermark(self, wav, sample_rate=None, **kwargs):
        return wav


def _stub_perth() -> None:
    import types

    module = types.ModuleType("perth")
    module.PerthImplicitWatermarker = _NoWatermark
    sys.modules["perth"] = module


def run(spec: dict) -> dict:
    src = os.path.realpath(spec["src"])
    sys.path.insert(0, src)
    if not spec.get("watermark", True):
        _stub_perth()
    missing = [m for m in missing_modules() if not (m.startswith("perth") and "perth" in sys.modules)]
    if missing:
        return {"status": "skipped", "reason": "missing " + ", ".join(missing)}
    import torch

    try:
        import chatterbox
        from chatterbox.tts import ChatterboxTTS
    except ModuleNotFoundError as exc:
        if exc.name == "chatterbox" or str(exc.name).startswith("chatterbox."):
            return {"status": "failed", "reason": f"upstream package not importable from {src}: {exc}"}
        return {"status": "skipped", "reason": f"missing {exc.name}"}
    if not os.path.realpath(chatterbox.__file__).startswith(src + os.sep):
        return {"status": "failed", "reason": f"'chatterbox' resolved to {chatterbox.__file__}, not under {src}"}
    if spec.get("check_only"):
        return {"status": "ok", "checked": "imports"}

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = clock()
    tts = ChatterboxTTS.from_local(spec["ckpt_dir"], spec["device"])
    load_s = clock() - t0
    bound = {"n": 1}
    acc = {"t3": 0.0, "s3gen": 0.0, "tokens": 0}

    # Upstream hard-codes max_new_tokens=1000; synthetic weights rarely stop, so cap it per call.
    t3_inference = tts.t3.inference
    s3gen_inference = tts.s3gen.inference
    inference_stream = tts.inference_stream

    def timed_t3(*args, **kwargs):
        kwargs["max_new_tokens"] = bound["n"]
        start = clock()
        out = t3_inference(*args, **kwargs)
        acc["t3"] += clock() - start
        acc["tokens"] += int(out.shape[-1])
        return out

    def timed_s3gen(*args, **kwargs):
        start = clock()
        out = s3gen_inference(*args, **kwargs)
        acc["s3gen"] += clock() - start
        return out

    def bounded_stream(*args, **kwargs):
        kwargs["max_new_tokens"] = bound["n"]
        return inference_stream(*args, **kwargs)

    if spec.get("mask_invalid_ids"):
        # Synthetic weights sample ids past S3Gen's code book, which upstream passes on to S3Gen's
        # embedding (a device assert); the same logit bias its audit harness used keeps them out.
        head = tts.t3.speech_head
        bias = torch.zeros(head.out_features, device=device)
        bias[spec["speech_codebook"]:] = -1e4
        head.register_forward_hook(lambda _m, _i, out: out + bias.to(out.dtype))
    tts.t3.inference = timed_t3
    tts.s3gen.inference = timed_s3gen
    tts.inference_stream = bounded_stream

    samples = []
    reps, warmup, seed = spec["reps"], spec["warmup"], spec["seed"]
    for rep in range(-warmup, reps):
        if rep == 0 and cuda:
            torch.cuda.reset_peak_memory_stats(device)  # the peak of the timed reps only
        for case in spec["texts"]:
            bound["n"] = case["max_new_tokens"]
            acc.update(t3=0.0, s3gen=0.0, tokens=0)
            torch.manual_seed(seed)
            start = clock()
            wav = tts.generate(case["text"])
            total = clock() - start
            synth = {"kind": "synth", "config": "upstream", "rep": rep, "text": case["name"], "total_s": total,
                     "audio_s": wav.shape[-1] / tts.sr, "t3_tokens": acc["tokens"], "t3_tokens_exact": True,
                     "t3_prefill_s": math.nan, "flow_encoder_s": math.nan,
                     "stages": {"t3": acc["t3"], "s3gen": acc["s3gen"],
                                "other": total - acc["t3"] - acc["s3gen"]}}
            torch.manual_seed(seed)
            first, n_samples, chunks = math.nan, 0, 0
            start = clock()
            for audio, _metrics in tts.generate_stream(case["text"], chunk_size=spec["chunk_size"],
                                                        context_window=spec["context_window"], print_metrics=False):
                if chunks == 0:
                    first = clock() - start
                chunks += 1
                n_samples += int(audio.shape[-1])
            total = clock() - start
            stream = {"kind": "stream", "config": "upstream", "rep": rep, "text": case["name"], "ttfa_s": first,
                      "total_s": total, "audio_s": n_samples / tts.sr, "chunks": chunks}
            if rep >= 0:
                samples += [synth, stream]
        saved = tts.conds
        start = clock()
        tts.prepare_conditionals(spec["reference_wav"])
        conds_s = clock() - start
        tts.conds = saved
        if rep >= 0:
            samples.append({"kind": "conds", "config": "upstream", "rep": rep, "prepare_conditionals_s": conds_s})
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    samples.append({"kind": "memory", "config": "upstream", "rep": reps - 1, "peak_mem_gb": peak})
    versions = {}
    for name in ("torch", "transformers", "diffusers"):
        try:
            versions[name] = sys.modules[name].__version__ if name in sys.modules else __import__(name).__version__
        except Exception:  # a version string is informative only
            versions[name] = None
    return {"status": "ok", "load_s": load_s, "versions": versions, "samples": samples,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        emit({"status": "failed", "reason": "usage: upstream_driver.py SPEC.json"})
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        result = run(spec)
    except Exception as exc:  # reported, not raised: the harness carries on without upstream figures
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
