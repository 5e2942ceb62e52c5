"""What the command-line entry points share: usage errors, option checks that need no model, and the
guard that turns every failure into one ``error: ...`` line (status 2 for bad input, 1 otherwise)."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path


DEFAULT_OUTPUT = Path("out.wav")


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


def check_voice(path: Path, model: str = "original") -> None:
    """The reference recording exists and holds usable audio (read as voice cloning will read it), long
    enough for ``model``'s voices (Turbo and Nano need more than 5 s)."""
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
            wav = load_reference(path, None, 16000)
        except ValueError as exc:
            raise UsageError(f"--voice: {_one_line(exc)}") from None
    from .family import min_reference_seconds

    shortest = min_reference_seconds(model)
    if shortest is not None and not wav.shape[0] / 16000 > shortest:
        raise UsageError(f"--voice {path} is {wav.shape[0] / 16000:.2f} s long; --model {model} needs a reference "
                         f"longer than {shortest:g} s")


def check_ckpt_files(ckpt: Path, model: str) -> None:
    """``ckpt`` is a directory with the weights and tokenizer files of ``model``'s family."""
    from .checkpoint import CheckpointError, find_checkpoint_file
    from .family import checkpoint_stems, missing_tokenizer

    if not ckpt.exists():
        raise UsageError(f"checkpoint directory not found: --ckpt {ckpt}")
    if not ckpt.is_dir():
        raise UsageError(f"--ckpt {ckpt} is not a directory")
    try:
        for stem in checkpoint_stems(model):
            find_checkpoint_file(ckpt, stem)
    except CheckpointError as exc:
        raise UsageError(f"checkpoint (--model {model}) {_one_line(exc)}") from None
    missing = missing_tokenizer(model, ckpt)
    if missing is not None:
        raise UsageError(f"checkpoint {ckpt}: {missing} not found")


def check_ckpt(args: argparse.Namespace) -> None:
    """``--ckpt`` holds the weights and tokenizer files of ``--model`` (and a voice, unless ``--voice``)."""
    from .checkpoint import CONDS_FILE

    ckpt, model = args.ckpt, getattr(args, "model", "original")
    check_ckpt_files(ckpt, model)
    if args.voice is None and not (ckpt / CONDS_FILE).is_file():
        raise UsageError(f"checkpoint {ckpt} has no built-in voice ({CONDS_FILE}); pass --voice ref.wav")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")


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


