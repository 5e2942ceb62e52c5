"""Times pinned upstream Chatterbox-Turbo / Nano (PyPI ``chatterbox-tts==0.1.7``) for ``eval/upstream_turbo.py``.
Runs in upstream's side environment (``docs/turbo_parity.md``), never imports chatterbox-fast:

    /tmp/upvenv/bin/python eval/upstream_turbo_driver.py --ckpt DIR --model nano [--reference REF.wav]

It loads the checkpoint directory with upstream's ``ChatterboxTurboTTS.from_local`` (Nano: 0.1.7
lacks ``GPT2_small``; ``tools/parity/turbo_upstream.py`` registers it and loads ``t3_nano_v1``),
makes the voice with upstream's ``prepare_conditionals`` from the reference file (or keeps the
directory's ``conds.pt``), then answers one JSON request per stdin line with one
``UPSTREAM_RESULT {json}`` line on stdout.

A ``generate`` request runs the steps of upstream's ``ChatterboxTurboTTS.generate`` through its own
public pieces (``punc_norm``, the tokenizer, ``T3.inference_turbo``, ``S3Gen.inference`` with 2 CFM
steps), because ``generate`` itself takes no token budget and synthetic weights rarely sample the
stop token: ``inference_turbo``'s own ``max_gen_len`` bounds it instead (``max_gen_len = N - 1``
yields N tokens: one from the prefill, then N - 1 loop steps). The Perth watermark, which
``generate`` applies last, is left out (ours runs without it too). Upstream has no streaming API for
Turbo or Nano.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

MARK = "UPSTREAM_RESULT "
SILENCE_TOKEN = 4299  # S3GEN_SIL: upstream appends three after the last speech token
TRAILING_SILENCE = 3
FIRST_SPECIAL = 6561  # ids at or past the start token are dropped before S3Gen
MEANFLOW_STEPS = 2


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def load(ckpt: Path, model: str, device: str):
    """Upstream's Turbo object on ``device``, with Nano's T3 in place of Turbo's for ``model == "nano"``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
    from turbo_upstream import load_upstream  # noqa: E402  (side-environment helper of the parity kit)

    tts, nano = load_upstream(ckpt)  # on the CPU, as upstream's from_local(ckpt, "cpu")
    if model == "nano":
        tts.t3 = nano
    else:
        del nano
    for module in (tts.t3, tts.s3gen, tts.ve):
        module.to(device)
    tts.device = device
    return tts


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def generate(tts, text: str, max_new_tokens: int, seed: int, sampling: dict) -> dict:
    import torch
    from chatterbox.tts_turbo import punc_norm

    torch.manual_seed(seed)
    sync(tts.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = tts.tokenizer(punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids
        speech = tts.t3.inference_turbo(t3_cond=tts.conds.t3, text_tokens=ids.to(tts.device),
                                        max_gen_len=max_new_tokens - 1, **sampling)
        sync(tts.device)
        t1 = time.perf_counter()
        generated = int(speech.shape[-1])
        codes = speech[speech < FIRST_SPECIAL]
        codes = torch.cat([codes, torch.full((TRAILING_SILENCE,), SILENCE_TOKEN, dtype=codes.dtype,
                                             device=codes.device)])
        wav, _ = tts.s3gen.inference(speech_tokens=codes.to(tts.device), ref_dict=tts.conds.gen,
                                     n_cfm_timesteps=MEANFLOW_STEPS)
        sync(tts.device)
    t2 = time.perf_counter()
    samples = int(wav.shape[-1])
    return {"total_s": t2 - t0, "t3_s": t1 - t0, "s3gen_s": t2 - t1, "t3_tokens": generated,
            "codes": int(codes.numel()), "audio_s": samples / tts.sr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--model", choices=("turbo", "nano"), required=True)
    ap.add_argument("--reference", type=Path, default=None,
                    help="reference recording (> 5 s) of the voice (default: the checkpoint's conds.pt)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from importlib.metadata import version

        t0 = time.perf_counter()
        tts = load(args.ckpt, args.model, args.device)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.reference is not None:
            tts.prepare_conditionals(str(args.reference), exaggeration=0.0, norm_loudness=True)
        elif tts.conds is None:
            raise ValueError(f"{args.ckpt} has no conds.pt: pass --reference")
        emit({"status": "ok", "load_s": load_s, "prepare_conditionals_s": time.perf_counter() - t0,
              "versions": {n: version(n) for n in ("chatterbox-tts", "torch", "transformers")},
              "threads": torch.get_num_threads()})
    except Exception as exc:  # noqa: BLE001  (reported to the harness as one line)
        emit({"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            emit({"status": "ok", **generate(tts, req["text"], int(req["max_new_tokens"]), int(req["seed"]),
                                             req["sampling"])})
        except Exception as exc:  # noqa: BLE001
            emit({"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
