#!/usr/bin/env python3
"""Speak a text with streaming and report time to first audio, RTF and per-chunk timings.

    python scripts/stream_demo.py "Some text." [--ckpt DIR | --pretrained] [--voice ref.wav]
        [--device cuda] [--chunk-size 10,25,50] [-o out.wav | --raw]

Plays to the speaker when sounddevice and an output device exist; otherwise writes a WAV as the
chunks arrive (``-o``, default stream.wav), or raw 16-bit PCM to stdout (``--raw``). Without a
checkpoint it runs the embedded synthetic one, which does not produce speech.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from chatterbox.cli import AudioSink, build_parser, load_tts, read_text, speak  # noqa: E402


class SpeakerSink:
    def __init__(self, sample_rate: int) -> None:
        import sounddevice as sd

        sd.query_devices(kind="output")  # raises when there is no output device
        self.stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32")
        self.stream.start()

    def write(self, audio: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(audio, dtype=np.float32)[:, None])

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


def open_sink(sample_rate: int, args):
    if args.output is None and not args.raw:
        try:
            return SpeakerSink(sample_rate), "speaker"
        except Exception as exc:  # no sounddevice, no PortAudio, or no output device
            print(f"(no audio output: {exc}; writing stream.wav)", file=sys.stderr)
            args.output = Path("stream.wav")
    sink = AudioSink(sample_rate, args.output, args.raw)
    return sink, "stdout" if args.raw else str(sink.path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "stream_demo.py"
    args = parser.parse_args(argv)
    args.stream = True
    text = read_text(args.text)
    tts = load_tts(args)
    sink, where = open_sink(tts.sr, args)
    try:
        stats = speak(tts, text, args, sink)
    finally:
        sink.close()
    out = sys.stderr
    label = " [SYNTHETIC checkpoint: not speech]" if tts.synthetic else ""
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


if __name__ == "__main__":
    sys.exit(main())
