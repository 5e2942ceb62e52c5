"""``chatterbox-tts``: speak text from the command line (Piper/Coqui-style flags).

Everything that can be checked before the model loads is checked first (options, output directory,
reference voice, checkpoint directory, the text itself): a problem there prints one line
``error: ...`` and exits with status 2. A failure while loading or synthesising prints one line too
and exits with status 1 (2 when the input was at fault); ``--debug`` shows the traceback instead.
Audio goes to a temporary file beside the output, renamed into place only when synthesis succeeded.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("chatterbox.cli")

DEFAULT_OUTPUT = Path("out.wav")
MAX_SEED = 2**63 - 1
TOKENS_PER_SECOND = 25  # speech tokens per second of audio
MAX_NEW_TOKENS_HELP = (
    "most speech tokens per text SEGMENT, not per input (25 tokens = 1 s of audio): long text is cut "
    "into segments of whole sentences (up to 300 text tokens each), synthesised one after another, each "
    "ending at its own end of speech or after this many tokens")
SEED_HELP = ("random seed; every text segment is synthesised with this same seed, so a run is "
             "repeatable (default: a random seed, printed)")
_EPILOG = """\
examples:
  chatterbox-tts "Hello there." -o hello.wav --ckpt ~/chatterbox
  echo "Read from stdin." | chatterbox-tts - --raw --pretrained | aplay -f S16_LE -r 24000
  chatterbox-tts "Faster on a GPU." -o out.wav --pretrained --device cuda --opt "fast"
  chatterbox-tts "One toggle." -o out.wav --pretrained --opt "reference+t3.dtype=bf16"
  chatterbox-tts serve --pretrained --device cuda    (OpenAI-compatible HTTP server; serve --help)

Without --ckpt or --pretrained the embedded synthetic checkpoint is used: every model runs at full
size, but the output is NOT speech. Exit status: 0 on success, 2 for bad input (options, files,
text), 1 when loading or synthesis fails.
"""


class UsageError(Exception):
    """Bad input found by the CLI (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(prog: str = "chatterbox-tts", description: str | None = None,
                 demo: bool = False) -> argparse.ArgumentParser:
    """The CLI's options; ``demo=True`` adapts the output options to ``scripts/stream_demo.py``."""
    description = description or ("Chatterbox text-to-speech (chatterbox-fast): speak a text into an audio "
                                  "file, or as raw PCM on stdout.")
    ap = _Parser(prog=prog, description=textwrap.fill(description, 100), epilog=None if demo else _EPILOG,
                 formatter_class=_HelpFormatter)
    ap.add_argument("text", help="text to speak, or - to read it from standard input")
    if demo:
        ap.add_argument("-o", "--output", type=Path, default=None,
                        help="audio file to write as the chunks arrive (default: play on the speaker; "
                             "stream.wav when there is none)")
    else:
        ap.add_argument("-o", "--output", type=Path, default=None,
                        help=f"audio file to write; the extension picks the format (.wav, .flac, .ogg) "
                             f"(default: {DEFAULT_OUTPUT})")
    ap.add_argument("--raw", action="store_true",
                    help="write raw 16-bit little-endian mono PCM at 24 kHz to stdout instead of a file")
    ap.add_argument("--stream", action="store_true",
                    help=argparse.SUPPRESS if demo else
                    "synthesise incrementally (generate_stream): audio is written as the chunks arrive")
    ap.add_argument("--voice", type=Path, default=None,
                    help="reference recording of the voice to clone (default: the checkpoint's built-in "
                         "voice, conds.pt)")
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="checkpoint directory holding ve, t3_cfg, s3gen (.safetensors or .pt), "
                         "tokenizer.json and optionally conds.pt (default: the synthetic checkpoint)")
    ap.add_argument("--pretrained", action="store_true",
                    help="download the published checkpoint from the Hugging Face hub (or reuse its cache)")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    ap.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    ap.add_argument("--max-new-tokens", type=int, default=1000, help=MAX_NEW_TOKENS_HELP)
    ap.add_argument("--exaggeration", type=float, default=0.5,
                    help="emotion exaggeration of the voice, >= 0 (0.5 is neutral)")
    ap.add_argument("--cfg-weight", type=float, default=0.5,
                    help="classifier-free guidance weight, >= 0 (lower is slower, more deliberate speech)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, > 0")
    ap.add_argument("--chunk-size", default="25",
                    help="with --stream: speech tokens per streamed chunk, or a schedule like 10,25,50 "
                         "whose last value repeats")
    ap.add_argument("--context-window", type=int, default=50,
                    help="with --stream: tokens of left context the flow re-encodes per chunk, >= 0")
    ap.add_argument("--opt", default="reference",
                    help="optimisation preset (reference, fast, cpu) or spec such as "
                         "'reference+t3.dtype=bf16' (what OptConfig.parse accepts)")
    ap.add_argument("--no-watermark", action="store_true",
                    help="do not watermark the audio (default: watermark when resemble-perth is installed)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


# ---------------------------------------------------------------------------------------------
# Validation before the model loads.


def read_text(arg: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise UsageError("no text to speak (empty input)")
    return text


def parse_chunk_size(spec: str) -> int | list[int]:
    try:
        sizes = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--chunk-size must be positive integers separated by commas, got {spec!r}") from None
    if not sizes:
        raise UsageError("--chunk-size is empty")
    if any(s < 1 for s in sizes):
        raise UsageError(f"--chunk-size values must be >= 1, got {spec!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def output_format(path: Path) -> tuple[str, str]:
    """(soundfile format, subtype) for an output path, from its extension."""
    import soundfile as sf

    ext = path.suffix.lstrip(".").upper()
    fmt = {"AIF": "AIFF", "OGA": "OGG"}.get(ext, ext)
    writable = sorted(sf.available_formats())
    if not fmt or fmt not in writable or fmt == "RAW":
        raise UsageError(f"cannot tell an audio format from the name {str(path)!r}: use .wav, .flac or .ogg "
                         "(or --raw for PCM on stdout)")
    subtype = "PCM_16" if sf.check_format(fmt, "PCM_16") else sf.default_subtype(fmt)
    return fmt, subtype


def check_output(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"output {str(path)!r} is a directory; give a file name such as {path / 'out.wav'}")
    output_format(path)
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"output directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise UsageError(f"output directory {str(parent)!r} is not a directory")
    try:  # the one reliable test (read-only mounts, ACLs): create and remove a file there
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to output directory {str(parent)!r}: {exc.strerror or exc}") from None


def check_voice(path: Path) -> None:
    """The reference recording exists and holds usable audio (read as voice cloning will read it)."""
    import soundfile as sf

    if not path.exists():
        raise UsageError(f"--voice file not found: {path}")
    if not path.is_file():
        raise UsageError(f"--voice is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--voice file is not readable: {path}")
    try:
        info = sf.info(str(path))
    except Exception as exc:
        fmt = path.suffix.lstrip(".").upper()
        if fmt in sf.available_formats():  # a format libsndfile reads, yet it cannot: not audio
            raise UsageError(f"--voice {path} is not a readable audio file ({_one_line(exc)})") from None
        info = None  # maybe a compressed format only the audioread fallback reads; try it below
    if info is not None and info.frames == 0:
        raise UsageError(f"--voice {path} holds no audio samples")
    from .audio import load_reference

    with warnings.catch_warnings():  # librosa's fallback warns at length before it fails
        warnings.simplefilter("ignore")
        try:
            load_reference(path, None, 16000)
        except ValueError as exc:
            raise UsageError(f"--voice: {_one_line(exc)}") from None


def check_ckpt(args: argparse.Namespace) -> None:
    from .checkpoint import CONDS_FILE, TOKENIZER_FILE, CheckpointError, find_checkpoint_file

    ckpt = args.ckpt
    if not ckpt.exists():
        raise UsageError(f"checkpoint directory not found: --ckpt {ckpt}")
    if not ckpt.is_dir():
        raise UsageError(f"--ckpt {ckpt} is not a directory")
    try:
        for stem in ("ve", "t3_cfg", "s3gen"):
            find_checkpoint_file(ckpt, stem)
    except CheckpointError as exc:
        raise UsageError(f"checkpoint {_one_line(exc)}") from None
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise UsageError(f"checkpoint {ckpt}: {TOKENIZER_FILE} not found")
    if args.voice is None and not (ckpt / CONDS_FILE).is_file():
        raise UsageError(f"checkpoint {ckpt} has no built-in voice ({CONDS_FILE}); pass --voice ref.wav")


def _early_tokenizer(args: argparse.Namespace):
    """The text tokenizer, when it can be had without loading the model (not for --pretrained)."""
    from .checkpoint import TOKENIZER_FILE
    from .text import EnTokenizer

    if args.ckpt is not None:
        try:
            return EnTokenizer(args.ckpt / TOKENIZER_FILE)
        except Exception as exc:  # noqa: BLE001  (the tokenizers library raises plain Exception)
            raise UsageError(f"checkpoint {args.ckpt}: cannot read {TOKENIZER_FILE}: {_one_line(exc)}") from None
    if args.pretrained:
        return None
    from .text_vocab import write_tokenizer_json

    with tempfile.TemporaryDirectory() as tmp:
        return EnTokenizer(write_tokenizer_json(Path(tmp) / TOKENIZER_FILE))


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")


def prepare(args: argparse.Namespace) -> str:
    """Check everything that can be checked before the model loads; returns the text to speak.

    Raises ``UsageError`` naming the problem. Sets ``args.opt_config`` (the parsed ``--opt``) and
    ``args.device`` (resolved).
    """
    if args.raw and args.output is not None:
        raise UsageError("--raw writes to stdout: drop -o/--output, or drop --raw")
    if args.ckpt is not None and args.pretrained:
        raise UsageError("--ckpt and --pretrained both name a checkpoint: give one of them")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED} (2**63 - 1), got {args.seed}")
    from .models.t3.t3 import T3Config

    token_limit = T3Config.published().speech_pos_emb_len
    if not 1 <= args.max_new_tokens <= token_limit:
        raise UsageError(f"--max-new-tokens must be between 1 and {token_limit} (tokens per text segment), "
                         f"got {args.max_new_tokens}")
    for name, value in (("--exaggeration", args.exaggeration), ("--cfg-weight", args.cfg_weight),
                        ("--temperature", args.temperature)):
        _finite(name, value)
    if args.exaggeration < 0:
        raise UsageError(f"--exaggeration must be >= 0, got {args.exaggeration}")
    if args.cfg_weight < 0:
        raise UsageError(f"--cfg-weight must be >= 0, got {args.cfg_weight}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    parse_chunk_size(args.chunk_size)
    if args.context_window < 0:
        raise UsageError(f"--context-window must be >= 0, got {args.context_window}")

    from .opt import OptConfig

    try:
        args.opt_config = OptConfig.parse(args.opt)
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--opt {args.opt!r}: {_one_line(exc)}") from None

    import torch

    from .loader import resolve_device

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.device = str(resolve_device(device))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device}: {_one_line(exc)}") from None

    if not args.raw and args.output is not None:
        check_output(args.output)
    if args.voice is not None:
        check_voice(args.voice)
    if args.ckpt is not None:
        check_ckpt(args)

    text = read_text(args.text)
    tokenizer = _early_tokenizer(args)
    if tokenizer is not None:
        from .text import check_encodable

        try:
            text = check_encodable(text, tokenizer)
        except ValueError as exc:
            raise UsageError(_one_line(exc)) from None
    return text


# ---------------------------------------------------------------------------------------------
# Loading, synthesis, output.


def is_synthetic(tts, args: argparse.Namespace) -> bool:
    from .checkpoint import is_synthetic_checkpoint

    return bool(getattr(tts, "synthetic", False)) or (args.ckpt is not None and is_synthetic_checkpoint(args.ckpt))


def load_tts(args: argparse.Namespace):
    from .opt import OptConfig
    from .tts import ChatterboxTTS

    opt = getattr(args, "opt_config", None) or OptConfig.parse(args.opt)
    device = args.device or "cpu"
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
        raise UsageError("this checkpoint has no built-in voice (conds.pt); pass --voice ref.wav")
    return tts


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


# ---------------------------------------------------------------------------------------------
# Entry point.


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def run_guarded(args: argparse.Namespace, body) -> int:
    """``body(args)`` with every failure turned into one ``error: ...`` line on stderr, preceded by the
    traceback with ``--debug``: status 2 for bad input, 1 for failures while loading or synthesising."""
    debug = getattr(args, "debug", False)
    try:
        return body(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if debug:
            traceback.print_exc()
        print("error: the output pipe was closed", file=sys.stderr)
        try:  # keep Python from complaining again when it flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except Exception as exc:  # noqa: BLE001  (one line for the user; --debug adds the traceback)
        from .checkpoint import CheckpointError

        if isinstance(exc, UsageError):
            status, message = 2, _one_line(exc)
        elif isinstance(exc, CheckpointError):
            status, message = 1, _one_line(exc)
        elif isinstance(exc, (ValueError, TypeError)):
            status, message = 2, _one_line(exc)
        elif isinstance(exc, (RuntimeError, OSError)):
            status, message = 1, _one_line(exc)
        else:
            status, message = 1, f"unexpected {type(exc).__name__}: {_one_line(exc)}"
        if debug:
            traceback.print_exc()
        elif status == 1 and not isinstance(exc, (CheckpointError, OSError)):
            message += " (--debug shows the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return status


def configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)


def _synthesise(args: argparse.Namespace) -> int:
    if args.output is None and not args.raw:
        args.output = DEFAULT_OUTPUT
    text = prepare(args)
    tts = load_tts(args)
    from .text import check_encodable

    text = check_encodable(text, tts.tokenizer)  # a no-op when it was checked before loading
    with AudioSink(tts.sr, args.output, args.raw) as sink:
        stats = speak(tts, text, args, sink)
        if sink.samples == 0:
            raise RuntimeError("no audio was produced (the model ended every segment before any speech "
                               "token); nothing written")
    if is_synthetic(tts, args):
        log.warning("reminder: synthetic checkpoint, the audio is not speech")
    where = "stdout" if args.raw else str(sink.path)
    first = f", first audio {stats['first_audio_s'] * 1000:.0f} ms" if stats.get("first_audio_s") else ""
    rtf = f", RTF {stats['rtf']:.3f}" if stats.get("rtf") else ""
    segs = f" ({stats['segments']} segments)" if stats["segments"] > 1 else ""
    log.info("wrote %.2f s of audio to %s in %.2f s%s%s%s", stats["audio_seconds"], where, stats["seconds"],
             segs, first, rtf)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the HTTP server (speaking the text "serve": chatterbox-tts -- serve)
        from .serve.cli import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args)
    return run_guarded(args, _synthesise)


if __name__ == "__main__":
    sys.exit(main())
