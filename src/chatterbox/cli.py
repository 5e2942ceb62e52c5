"""``chatterbox-tts``: speak text from the command line (Piper/Coqui-style flags).

Everything that can be checked before the model loads is checked first (options, output directory,
reference voice, checkpoint directory, the text itself): a problem there prints one line
``error: ...`` and exits with status 2. A failure while loading or synthesising prints one line too
and exits with status 1 (2 when the input was at fault); ``--debug`` shows the traceback instead.
Audio goes to a temporary file beside the output, renamed into place only when synthesis succeeded.
``chatterbox-tts serve ...`` starts the OpenAI-compatible server (``chatterbox.serve``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from .cli_common import (DEFAULT_OUTPUT, UsageError, _HelpFormatter, _Parser, _finite, _one_line, check_ckpt, check_output,
                         check_voice, configure_logging, parse_chunk_size, read_text, run_guarded)
from .cli_output import AudioSink, speak
from .engine.request import MAX_SEED
from . import family

log = logging.getLogger("chatterbox.cli")

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
  chatterbox-tts "Low latency [chuckle]." -o out.wav --model turbo --pretrained --voice ref.wav
  chatterbox-tts "On a laptop." -o out.wav --model nano --pretrained --opt cpu --stream
  chatterbox-tts serve --pretrained --device cuda    (OpenAI-compatible HTTP server; serve --help)

Without --ckpt or --pretrained the embedded synthetic checkpoint is used: every model runs at full
size, but the output is NOT speech. Exit status: 0 on success, 2 for bad input (options, files,
text), 1 when loading or synthesis fails.
"""


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
    ap.add_argument("--model", default=family.DEFAULT_FAMILY, choices=family.FAMILIES,
                    help="model family: original Chatterbox, Chatterbox-Turbo (low latency, paralinguistic tags "
                         "such as [laugh]) or Chatterbox-Nano (Turbo's small sibling, for CPUs)")
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="checkpoint directory holding ve, t3_cfg, s3gen (.safetensors or .pt), "
                         "tokenizer.json and optionally conds.pt; for turbo: t3_turbo_v1, s3gen_meanflow, ve and "
                         "the GPT-2 tokenizer files (nano: t3_nano_v1) (default: the synthetic checkpoint)")
    ap.add_argument("--pretrained", action="store_true",
                    help="download the published checkpoint of --model from the Hugging Face hub (or reuse its "
                         "cache)")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    ap.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    ap.add_argument("--max-new-tokens", type=int, default=1000, help=MAX_NEW_TOKENS_HELP)
    ap.add_argument("--exaggeration", type=float, default=None,
                    help="emotion exaggeration of the voice, >= 0 (0.5 is neutral) (default: 0.5; turbo and nano "
                         "ignore it)")
    ap.add_argument("--cfg-weight", type=float, default=None,
                    help="classifier-free guidance weight, >= 0 (lower is slower, more deliberate speech) "
                         "(default: 0.5; turbo and nano have no guidance)")
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


def _early_tokenizer(args: argparse.Namespace):
    """``--model``'s text tokenizer, when it can be had without loading the model (not for --pretrained)."""
    if args.pretrained:
        return None
    try:
        return family.tokenizer(args.model, args.ckpt)
    except Exception as exc:  # noqa: BLE001  (the tokenizers library raises plain Exception)
        raise UsageError(f"checkpoint {args.ckpt}: cannot read the tokenizer: {_one_line(exc)}") from None


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
    _model_defaults(args)
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
        check_voice(args.voice, args.model)
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


def _model_defaults(args: argparse.Namespace) -> None:
    """Fill in the sampling defaults of ``--model``; Turbo and Nano ignore exaggeration and guidance."""
    turbo = family.is_turbo(args.model)
    for name, option in (("exaggeration", "--exaggeration"), ("cfg_weight", "--cfg-weight")):
        given = getattr(args, name)
        if given is None:
            setattr(args, name, 0.0 if turbo else 0.5)
        elif turbo and given != 0:
            log.warning("%s is ignored by --model %s", option, args.model)


# ---------------------------------------------------------------------------------------------
# Loading and the entry point.


def is_synthetic(tts, args: argparse.Namespace) -> bool:
    from .checkpoint import is_synthetic_checkpoint

    return bool(getattr(tts, "synthetic", False)) or (args.ckpt is not None and is_synthetic_checkpoint(args.ckpt))


def load_tts(args: argparse.Namespace):
    """The ``--model`` family from ``--ckpt``, ``--pretrained`` or synthetic weights, with its voice."""
    from .opt import OptConfig

    opt = getattr(args, "opt_config", None) or OptConfig.parse(args.opt)
    device = args.device or "cpu"
    if args.ckpt is None and not args.pretrained:
        log.warning("no checkpoint given (--ckpt DIR or --pretrained): using the embedded SYNTHETIC checkpoint; "
                    "the output is NOT speech")
    tts = family.load(args.model, device, opt=opt, ckpt=args.ckpt, pretrained=args.pretrained)
    if args.voice is not None:
        tts.prepare_conditionals(str(args.voice), exaggeration=args.exaggeration)
    elif tts.conds is None:
        raise UsageError("this checkpoint has no built-in voice (conds.pt); pass --voice ref.wav")
    return tts


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
