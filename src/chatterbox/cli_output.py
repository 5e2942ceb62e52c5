"""Where the command line's audio goes (a file written as chunks arrive, or raw PCM on stdout), its
progress display on long inputs, and the synthesis loop over text segments."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .cli_common import DEFAULT_OUTPUT, output_format, parse_chunk_size

log = logging.getLogger("chatterbox.cli")

class AudioSink:
    """Where audio goes: raw PCM on stdout, or an audio file written as chunks arrive.

    The file is written under a temporary name in the output's directory and renamed into place by
    ``close()``; ``discard()`` (or leaving a ``with`` block by an exception) deletes it, so a failed
    run never leaves a partial or empty file behind.
    """

    def __init__(self, sample_rate: int, output: Path | None, raw: bool) -> None:
        self.raw = raw
        self.file = None
        self.tmp: Path | None = None
        self.samples = 0
        self.path = None if raw else Path(output or DEFAULT_OUTPUT)
        if not raw:
            import soundfile as sf

            fmt, subtype = output_format(self.path)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
            os.close(fd)
            self.tmp = Path(tmp)
            try:
                self.file = sf.SoundFile(tmp, mode="w", samplerate=sample_rate, channels=1, format=fmt,
                                         subtype=subtype)
            except BaseException:
                self.tmp.unlink(missing_ok=True)
                raise

    def write(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if self.raw:
            pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
            sys.stdout.buffer.write(pcm.tobytes())
            sys.stdout.buffer.flush()
        else:
            self.file.write(audio)
        self.samples += audio.shape[0]

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self.file is None:
            return
        self.file.close()
        self.file = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp made it private; give it an ordinary file's mode
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        """Drop the unfinished file (nothing is left at the output path)."""
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001  (the file is deleted anyway)
                pass
            self.file = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def __enter__(self) -> "AudioSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Segment i/n and the audio seconds so far, on stderr: a bar redrawn in place when stderr is a
    terminal, one log line per finished segment otherwise. Silent for a single segment."""

    WIDTH = 24

    def __init__(self, total: int, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = enabled and total > 1
        self.tty = self.enabled and _isatty(self.stream)
        self.start = time.perf_counter()
        self.drawn = False

    def update(self, segment: int, audio_seconds: float, finished: bool = False) -> None:
        """``segment``: the 1-based segment being synthesised (or just finished)."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            done = segment if finished else segment - 1
            filled = round(self.WIDTH * done / self.total)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] segment {segment}/{self.total}, {audio_seconds:.1f} s of audio, "
                              f"{elapsed:.0f} s elapsed\x1b[K")
            self.stream.flush()
            self.drawn = True
        elif finished:
            log.info("segment %d/%d done: %.1f s of audio so far, %.1f s elapsed", segment, self.total,
                     audio_seconds, elapsed)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def speak(tts, text: str, args: argparse.Namespace, sink, progress: bool | None = None) -> dict:
    """Synthesise ``text`` into ``sink``, one text segment per call; returns timing figures.

    Each segment is one ``tts.generate`` (or ``generate_stream``) call with the same seed, so the
    run is repeatable; ``max_new_tokens`` bounds each segment. ``progress``: show segment i/n
    (default: unless ``--quiet``).
    """
    seed = args.seed
    if seed is None:
        import torch

        seed = int(torch.randint(0, 2**62, (1,)))
        log.info("seed %d (pass --seed %d to repeat this run)", seed, seed)
    common = dict(exaggeration=args.exaggeration, cfg_weight=args.cfg_weight, temperature=args.temperature,
                  max_new_tokens=args.max_new_tokens, seed=seed,
                  watermark=False if args.no_watermark else None)
    segments = tts.text_segments(text)
    bar = Progress(len(segments), enabled=not args.quiet if progress is None else progress)
    start = time.perf_counter()
    samples = 0
    first_audio = None
    chunks = []
    try:
        for i, segment in enumerate(segments, 1):
            bar.update(i, samples / tts.sr)
            if not args.stream:
                wav = tts.generate(segment, **common)
                if wav.shape[1]:
                    sink.write(wav[0].numpy())
                    samples += wav.shape[1]
                    first_audio = first_audio or time.perf_counter() - start
            else:
                metrics = None
                for chunk, metrics in tts.generate_stream(segment, chunk_size=parse_chunk_size(args.chunk_size),
                                                          context_window=args.context_window,
                                                          print_metrics=False, **common):
                    sink.write(chunk[0].numpy())
                    samples += chunk.shape[1]
                    first_audio = first_audio or time.perf_counter() - start
                    bar.update(i, samples / tts.sr)
                for c in (metrics.chunks if metrics is not None else []):
                    chunks.append((len(chunks), c.tokens, c.samples, c.t3_s, c.flow_s, c.vocoder_s))
            bar.update(i, samples / tts.sr, finished=True)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    duration = samples / tts.sr
    stats = {"seconds": elapsed, "audio_seconds": duration, "rtf": elapsed / duration if duration else None,
             "segments": len(segments), "seed": seed}
    if args.stream:
        stats["first_audio_s"] = first_audio
        stats["chunks"] = chunks
    return stats
