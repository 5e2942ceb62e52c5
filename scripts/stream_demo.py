#!/usr/bin/env python3
"""Streaming demo: speak a text with ``generate_stream``, then report time to first audio, RTF and
per-chunk timings (tokens, samples, T3 / flow / vocoder milliseconds).

    python scripts/stream_demo.py "Some text." [--ckpt DIR | --pretrained] [--voice ref.wav]
        [--device cuda] [--chunk-size 10,25,50] [-o out.wav | --raw]

Plays to the speaker as the chunks arrive when sounddevice and an output device exist; otherwise
writes them to a WAV (``-o``, default stream.wav), or raw 16-bit PCM to stdout (``--raw``). Without a
checkpoint it runs the embedded synthetic one, which does not produce speech. Options and errors
are those of ``chatterbox-tts --stream``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from chatterbox.cli import (AudioSink, build_parser, configure_logging, is_synthetic, load_tts,  # noqa: E402
                            prepare, run_guarded, speak)
from chatterbox.text import check_encodable  # noqa: E402

DESCRIPTION = (
    "Streaming demo of chatterbox-fast: speaks TEXT with generate_stream, playing each chunk on the "
    "speaker as it arrives (or writing a WAV / raw PCM), then prints time to first audio, the real-time "
    "factor and a per-chunk table of tokens, samples and T3 / flow / vocoder milliseconds. Without "
    "--ckpt or --pretrained it runs the embedded synthetic checkpoint, which is NOT speech.")


class SpeakerSink:
    def __init__(self, sample_rate: int) -> None:
        import sounddevice as sd

        sd.query_devices(kind="output")  # raises when there is no output device
        self.stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32")
        self.stream.start()
        self.samples = 0

    def write(self, audio: np.ndarray) -> None:
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        self.stream.write(audio[:, None])
        self.samples += audio.shape[0]

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()

    discard = close

    def __enter__(self) -> "SpeakerSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def open_sink(sample_rate: int, args):
    if args.output is None and not args.raw:
        try:
            return SpeakerSink(sample_rate), "speaker"
        except Exception as exc:  # no sounddevice, no PortAudio, or no output device
            print(f"(no audio output: {exc}; writing stream.wav)", file=sys.stderr)
            args.output = Path("stream.wav")
    sink = AudioSink(sample_rate, args.output, args.raw)
    return sink, "stdout" if args.raw else str(sink.path)


def demo(args) -> int:
    text = prepare(args)
    tts = load_tts(args)
    text = check_encodable(text, tts.tokenizer)
    sink, where = open_sink(tts.sr, args)
    with sink:
        stats = speak(tts, text, args, sink)
        if sink.samples == 0:
            raise RuntimeError("no audio was produced (the model ended every segment before any speech token)")
    out = sys.stderr
    label = " [SYNTHETIC checkpoint: not speech]" if is_synthetic(tts, args) else ""
    print(f"audio -> {where}{label}", file=out)
    if stats.get("first_audio_s") is not None:
        print(f"time to first audio: {stats['first_audio_s'] * 1000:.1f} ms", file=out)
    if stats.get("rtf") is not None:
        print(f"RTF: {stats['rtf']:.3f} ({stats['audio_seconds']:.2f} s of audio in {stats['seconds']:.2f} s)", file=out)
    print("chunk  tokens  samples   t3_ms  flow_ms  vocoder_ms", file=out)
    for index, tokens, samples, t3_s, flow_s, voc_s in stats.get("chunks", []):
        print(f"{index:5d}  {tokens:6d}  {samples:7d}  {t3_s * 1000:6.1f}  {flow_s * 1000:7.1f}  {voc_s * 1000:10.1f}",
              file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser(prog="stream_demo.py", description=DESCRIPTION, demo=True).parse_args(argv)
    args.stream = True
    configure_logging(args)
    return run_guarded(args, demo)


if __name__ == "__main__":
    sys.exit(main())
