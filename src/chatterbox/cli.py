"""``chatterbox-tts``: speak text from the command line (Piper/Coqui-style flags)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("chatterbox.cli")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatterbox-tts", description="Chatterbox text-to-speech (chatterbox-fast).")
    ap.add_argument("text", help="text to speak, or - to read it from standard input")
    ap.add_argument("-o", "--output", type=Path, default=None, help="WAV file to write (default: out.wav)")
    ap.add_argument("--raw", action="store_true", help="write raw 16-bit little-endian mono PCM to stdout")
    ap.add_argument("--stream", action="store_true", help="synthesise incrementally (generate_stream)")
    ap.add_argument("--voice", type=Path, default=None, help="reference recording to clone")
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint directory (ve, t3_cfg, s3gen, tokenizer.json)")
    ap.add_argument("--pretrained", action="store_true", help="download the published checkpoint from the hub")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=1000)
    ap.add_argument("--exaggeration", type=float, default=0.5)
    ap.add_argument("--cfg-weight", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--chunk-size", default="25", help="tokens per streamed chunk, or a schedule like 10,25,50")
    ap.add_argument("--context-window", type=int, default=50)
    ap.add_argument("--opt", default="reference", help="optimisation preset or spec (reference, fast, ...)")
    ap.add_argument("--no-watermark", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def read_text(arg: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise SystemExit("error: no text to speak (empty input)")
    return text


def parse_chunk_size(spec: str) -> int | list[int]:
    try:
        sizes = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --chunk-size must be integers, got {spec!r}") from None
    if not sizes:
        raise SystemExit("error: --chunk-size is empty")
    return sizes[0] if len(sizes) == 1 else sizes


def load_tts(args: argparse.Namespace):
    import torch

    from .opt import OptConfig
    from .tts import ChatterboxTTS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opt = OptConfig.from_name(args.opt) if hasattr(OptConfig, "from_name") else OptConfig.reference()
    if args.ckpt is not None:
        tts = ChatterboxTTS.from_local(args.ckpt, device, opt=opt)
    elif args.pretrained:
        tts = ChatterboxTTS.from_pretrained(device, opt=opt)
    else:
        log.warning("no checkpoint given (--ckpt DIR or --pretrained): using the embedded SYNTHETIC checkpoint; "
                    "the output is NOT speech")
        tts = ChatterboxTTS.from_synthetic(device, opt=opt)
    if args.voice is not None:
        tts.prepare_conditionals(str(args.voice), exaggeration=args.exaggeration)
    elif tts.conds is None:
        raise SystemExit("error: this checkpoint has no built-in voice (conds.pt); pass --voice ref.wav")
    return tts


class AudioSink:
    """Where audio goes: a WAV file written as chunks arrive, or raw PCM on stdout."""

    def __init__(self, sample_rate: int, output: Path | None, raw: bool) -> None:
        self.raw = raw
        self.file = None
        if not raw:
            import soundfile as sf

            self.path = output or Path("out.wav")
            self.file = sf.SoundFile(str(self.path), mode="w", samplerate=sample_rate, channels=1, subtype="PCM_16")

    def write(self, audio: np.ndarray) -> None:
        if self.raw:
            pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
            sys.stdout.buffer.write(pcm.tobytes())
            sys.stdout.buffer.flush()
        else:
            self.file.write(audio)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def speak(tts, text: str, args: argparse.Namespace, sink) -> dict:
    """Synthesise into ``sink``; returns timing figures."""
    common = dict(exaggeration=args.exaggeration, cfg_weight=args.cfg_weight, temperature=args.temperature,
                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                  watermark=False if args.no_watermark else None)
    start = time.perf_counter()
    if not args.stream:
        wav = tts.generate(text, **common)
        sink.write(wav[0].numpy())
        elapsed = time.perf_counter() - start
        duration = wav.shape[1] / tts.sr
        return {"seconds": elapsed, "audio_seconds": duration, "rtf": elapsed / duration if duration else None}
    metrics = None
    for chunk, metrics in tts.generate_stream(text, chunk_size=parse_chunk_size(args.chunk_size),
                                              context_window=args.context_window, print_metrics=False, **common):
        sink.write(chunk[0].numpy())
    if metrics is None:
        return {"seconds": time.perf_counter() - start, "audio_seconds": 0.0, "rtf": None}
    return {"seconds": metrics.total_generation_time, "audio_seconds": metrics.total_audio_duration,
            "rtf": metrics.rtf, "first_audio_s": metrics.latency_to_first_chunk,
            "chunks": [(c.index, c.tokens, c.samples, c.t3_s, c.flow_s, c.vocoder_s) for c in metrics.chunks]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    text = read_text(args.text)
    tts = load_tts(args)
    sink = AudioSink(tts.sr, args.output, args.raw)
    try:
        stats = speak(tts, text, args, sink)
    finally:
        sink.close()
    if tts.synthetic:
        log.warning("reminder: synthetic checkpoint, the audio is not speech")
    where = "stdout" if args.raw else str(sink.path)
    first = f", first audio {stats['first_audio_s'] * 1000:.0f} ms" if stats.get("first_audio_s") else ""
    rtf = f", RTF {stats['rtf']:.3f}" if stats.get("rtf") else ""
    log.info("wrote %.2f s of audio to %s in %.2f s%s%s", stats["audio_seconds"], where, stats["seconds"], first, rtf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
