"""What a lower-precision S3 tokenizer costs in prompt tokens, and what it saves in time and memory.

    python -m eval.tokenizer_dtype --device cuda [--base fast] [--dtypes float16,bfloat16] [--out eval/results/NAME.json]

For ``--base`` and ``--base+s3tokenizer.dtype=D`` per D: prepares the voice from the synthetic 10 s
reference, compares both prompt-token sequences (T3's 150-token prompt and S3Gen's) with the
float32 tokenizer's (fraction of equal positions), times ``prepare_conditionals`` (median of
``--reps`` back-to-back calls after two warm-ups) and records the tokenizer's resident weight bytes.
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

log = logging.getLogger("eval.tokenizer_dtype")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--base", default="fast")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from chatterbox import ChatterboxTTS
    from chatterbox.voice import synthetic_reference

    device = torch.device(args.device)
    tts = ChatterboxTTS.from_synthetic(device)
    wav = synthetic_reference(seconds=10.0)
    res = {"schema": "chatterbox-fast/tokenizer-dtype/1", "environment": environment(device, args.commit),
           "settings": {"base": args.base, "reps": args.reps, "reference": "synthetic 10 s at 24 kHz"}, "rows": []}
    ref = None
    for dtype in ["float32"] + [d for d in args.dtypes.split(",") if d]:
        spec = args.base if dtype == "float32" else f"{args.base}+s3tokenizer.dtype={dtype}"
        tts.set_opt(resolve_config(spec))
        for _ in range(2):
            conds = tts.prepare_conditionals(wav, sample_rate=24000)
        times = []
        for _ in range(args.reps):
            _sync(device)
            t0 = time.perf_counter()
            conds = tts.prepare_conditionals(wav, sample_rate=24000)
            _sync(device)
            times.append(time.perf_counter() - t0)
        t3_tokens = conds.t3.cond_prompt_speech_tokens.cpu()
        gen_tokens = conds.gen.prompt_token.cpu()
        if ref is None:
            ref = (t3_tokens, gen_tokens)
        weights = sum(p.numel() * p.element_size() for p in tts.s3gen.tokenizer.parameters())
        row = {"config": spec, "tokenizer_dtype": dtype,
               "t3_prompt_agreement": float((t3_tokens == ref[0]).float().mean()),
               "s3gen_prompt_agreement": float((gen_tokens == ref[1]).float().mean()),
               "tokens": [int(t3_tokens.numel()), int(gen_tokens.numel())],
               "prepare_conditionals_ms": statistics.median(times) * 1e3, "tokenizer_weights_gb": weights / 1e9}
        res["rows"].append(row)
        log.info("%-40s t3 prompt %.3f, s3gen prompt %.3f agree; conds %.1f ms; tokenizer %.3f GB", spec,
                 row["t3_prompt_agreement"], row["s3gen_prompt_agreement"], row["prepare_conditionals_ms"],
                 row["tokenizer_weights_gb"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
