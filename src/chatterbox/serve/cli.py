"""``chatterbox-tts serve``: the OpenAI-compatible speech server.

Options are checked before the model loads (one ``error:`` line, exit status 2). ``--model`` may be
given several times: the server then loads every family and routes each request by its ``model``
field. The server starts listening at once and loads the models in the background: ``GET /health``
answers 503 until every engine is loaded and warmed up, 200 afterwards. If loading fails the server
stops with status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from ..family import DEFAULT_FAMILY, FAMILIES
from .config import API_KEYS_ENV, ModelSpec, ServerConfig, default_voices_dir, keys_from_env

log = logging.getLogger("chatterbox.serve")

_DEFAULTS = ServerConfig.published()
PORT_MAX = 65535
_EPILOG = f"""\
examples:
  chatterbox-tts serve --pretrained --device cuda --opt fast
  chatterbox-tts serve --ckpt ~/chatterbox --devices cuda:0,cuda:1 --api-key $KEY
  chatterbox-tts serve --pretrained --model original --model turbo    (requests pick one by "model":
       "chatterbox" or "chatterbox-turbo"; OpenAI's names such as tts-1 mean the first --model)
  chatterbox-tts serve --model original --model nano --ckpt original=~/chatterbox --ckpt nano=~/nano
  curl -s localhost:{_DEFAULTS.port}/v1/audio/speech -H 'Content-Type: application/json' \\
       -d '{{"model": "chatterbox", "input": "Hello.", "voice": "default", "response_format": "pcm"}}' \\
       | aplay -f S16_LE -r 24000 -c 1

Without --ckpt or --pretrained the synthetic checkpoint is served: every model runs at full size,
but the audio is NOT speech. API keys also come from ${API_KEYS_ENV} (comma separated).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    ap = _Parser(prog="chatterbox-tts serve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                 description=textwrap.fill("Serve Chatterbox over HTTP: OpenAI's /v1/audio/speech (streamed as it "
                                           "is generated), a voices API, /health and /metrics.", 100))
    ap.add_argument("--host", default=d.host, help=f"address to listen on (default: {d.host})")
    ap.add_argument("--port", type=int, default=d.port, help=f"port to listen on (default: {d.port})")
    ap.add_argument("--model", action="append", default=None, metavar="{" + ",".join(FAMILIES) + "}",
                    help="model family to serve; repeat (or separate with commas) to serve several, each under "
                         f"its own name: original as {d.model_name}, turbo as {d.family_model_name('turbo')}, nano as "
                         f"{d.family_model_name('nano')} (default: {DEFAULT_FAMILY})")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", action="append", default=None, metavar="[MODEL=]DIR",
                     help="checkpoint directory (original: ve, t3_cfg, s3gen, tokenizer.json; turbo/nano: "
                          "t3_turbo_v1 or t3_nano_v1, s3gen_meanflow, ve, GPT-2 tokenizer files); with several "
                          "--model, one MODEL=DIR each")
    src.add_argument("--pretrained", action="store_true", help="the published checkpoint from the Hugging Face hub")
    src.add_argument("--tiny", action="store_true", help="tiny random models (tests and smoke checks; not speech)")
    ap.add_argument("--device", default=None, help="one device: cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--devices", default=None,
                    help="several devices, one engine each, behind one endpoint: cuda:0,cuda:1 (requests go to "
                         "the least-loaded engine)")
    ap.add_argument("--opt", default="reference", help="OptConfig preset or spec: reference, fast, cpu, "
                                                         "'fast+cfm_steps=6' (default: reference)")
    ap.add_argument("--s3gen-batch", type=int, default=1,
                    help="with s3gen_scheduling in --opt: streamed chunks of up to this many requests share one "
                         "CFM call (default: 1)")
    ap.add_argument("--api-key", action="append", default=[],
                    help=f"accept this API key (repeatable; also {API_KEYS_ENV}); with keys set, every /v1 route "
                         "needs 'Authorization: Bearer <key>'")
    ap.add_argument("--voices-dir", type=Path, default=None,
                    help=f"where uploaded voices are stored (default: {default_voices_dir()})")
    ap.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                    help=f"requests synthesising at once per engine (default: {d.max_concurrent})")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help=f"requests waiting for a slot before new ones get 429 (default: {d.max_queue})")
    ap.add_argument("--max-input-chars", type=int, default=d.max_input_chars,
                    help=f"longest input text accepted (default: {d.max_input_chars})")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                    help=f"server-wide cap on speech tokens per text segment, 25 per second of audio "
                         f"(default: {d.max_new_tokens})")
    ap.add_argument("--chunk-size", default=",".join(map(str, d.chunk_size)),
                    help="speech tokens per streamed chunk, or a schedule such as 10,25,50 whose last value "
                         f"repeats (default: {','.join(map(str, d.chunk_size))})")
    ap.add_argument("--context-window", type=int, default=d.context_window,
                    help=f"tokens of left context the flow re-encodes per chunk (default: {d.context_window})")
    ap.add_argument("--no-watermark", action="store_true", help="do not watermark the audio")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


def _devices(args: argparse.Namespace) -> tuple[str, ...]:
    from ..cli_common import UsageError
    from ..loader import resolve_device

    if args.device and args.devices:
        raise UsageError("give --device or --devices, not both")
    if args.devices:
        names = [d.strip() for d in args.devices.split(",") if d.strip()]
        if not names:
            raise UsageError("--devices is empty")
    else:
        import torch

        names = [args.device or ("cuda" if torch.cuda.is_available() else "cpu")]
    out = []
    for name in names:
        try:
            out.append(str(resolve_device(name)))
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"device {name}: {exc}") from None
    return tuple(out)


def _check_voices_dir(path: Path) -> None:
    from ..cli_common import UsageError

    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--voices-dir {path}: cannot write there ({exc.strerror or exc})") from None


def _families(args: argparse.Namespace) -> tuple[str, ...]:
    from ..cli_common import UsageError

    names = [n.strip() for item in (args.model or [DEFAULT_FAMILY]) for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UsageError(f"--model {', '.join(unknown) or '(empty)'}: choose from {', '.join(FAMILIES)}")
    return tuple(dict.fromkeys(names))


def _checkpoints(args: argparse.Namespace, families: tuple[str, ...]) -> dict[str, Path]:
    """``--ckpt [MODEL=]DIR`` -> the directory of each family (all of them, or none)."""
    from ..cli_common import UsageError

    dirs: dict[str, Path] = {}
    for item in args.ckpt or []:
        name, sep, path = item.partition("=")
        if not sep or name not in FAMILIES:  # a bare directory (may itself contain "=")
            if len(families) > 1:
                raise UsageError(f"--ckpt {item}: with several --model, name each one's directory as MODEL=DIR")
            name, path = families[0], item
        if name not in families:
            raise UsageError(f"--ckpt {item}: {name} is not among the served models ({', '.join(families)})")
        if name in dirs:
            raise UsageError(f"--ckpt: two directories for {name}")
        dirs[name] = Path(path).expanduser()
    if dirs and set(dirs) != set(families):
        raise UsageError(f"--ckpt: no directory for {', '.join(f for f in families if f not in dirs)}")
    return dirs


def prepare(args: argparse.Namespace) -> tuple[ServerConfig, tuple[ModelSpec, ...]]:
    """Everything checked before the model loads; raises ``UsageError`` naming the problem."""
    from ..cli_common import UsageError, check_ckpt_files, parse_chunk_size
    from ..optim.config import OptConfig

    try:
        OptConfig.parse(args.opt)
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--opt {args.opt!r}: {exc}") from None
    chunk = parse_chunk_size(args.chunk_size)
    from ..models.t3.t3 import T3Config

    token_limit = T3Config.published().speech_pos_emb_len
    for option, value, low, high in (("--port", args.port, 0, PORT_MAX),
                                     ("--max-concurrent", args.max_concurrent, 1, None),
                                     ("--max-queue", args.max_queue, 0, None),
                                     ("--max-input-chars", args.max_input_chars, 1, None),
                                     ("--max-new-tokens", args.max_new_tokens, 1, token_limit),
                                     ("--context-window", args.context_window, 0, None),
                                     ("--s3gen-batch", args.s3gen_batch, 1, None)):
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise UsageError(f"{option} must be {bound}, got {value}")
    families = _families(args)
    ckpts = _checkpoints(args, families)
    for family, ckpt in ckpts.items():
        check_ckpt_files(ckpt, family)
    source = "local" if ckpts else "pretrained" if args.pretrained else "tiny" if args.tiny else "synthetic"
    voices_dir = args.voices_dir or default_voices_dir()
    _check_voices_dir(voices_dir)
    keys = tuple(dict.fromkeys([*(k.strip() for k in args.api_key if k.strip()), *keys_from_env()]))
    try:
        devices = _devices(args)
        specs = tuple(ModelSpec(source=source, ckpt=str(ckpts[f]) if ckpts else None, devices=devices, opt=args.opt,
                                family=f, s3gen_batch=args.s3gen_batch) for f in families)
        cfg = ServerConfig(host=args.host, port=args.port, api_keys=keys, voices_dir=str(voices_dir),
                           max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                           max_input_chars=args.max_input_chars, max_new_tokens=args.max_new_tokens,
                           chunk_size=tuple(chunk) if isinstance(chunk, list) else (chunk,),
                           context_window=args.context_window, watermark=False if args.no_watermark else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return cfg, specs


def serve(cfg: ServerConfig, specs: tuple[ModelSpec, ...]) -> int:
    """Run the server until interrupted; 1 if a model failed to load."""
    import uvicorn

    from .app import create_app
    from .loading import load_engines
    from .service import SpeechService

    if specs[0].source == "synthetic":
        log.warning("no checkpoint given (--ckpt DIR or --pretrained): serving the SYNTHETIC checkpoint; "
                    "the audio is NOT speech")
    service = SpeechService(cfg, loader=lambda: load_engines(specs), families=tuple(s.family for s in specs))
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def failed(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(service, on_load_failure=failed)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None,
                                           timeout_graceful_shutdown=cfg.shutdown_grace_s))
    log.info("listening on http://%s:%d (models %s loading; GET /health is 200 once ready); auth %s; voices in %s",
             cfg.host, cfg.port, ", ".join(cfg.family_model_name(s.family) for s in specs),
             "on" if cfg.auth_required else "off", cfg.voices_dir)
    server.run()
    if failures:
        raise RuntimeError(f"the model failed to load: {failures[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(f"error: the server needs the 'server' extra ({exc.name} is missing): "
              "pip install 'chatterbox-fast[server]'", file=sys.stderr)
        return 2
    from ..cli_common import run_guarded

    return run_guarded(args, lambda a: serve(*prepare(a)))


if __name__ == "__main__":
    sys.exit(main())
