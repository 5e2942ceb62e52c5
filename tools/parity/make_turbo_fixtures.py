#!/usr/bin/env python3
"""Make the Chatterbox-Turbo/Nano parity fixtures by running pinned upstream on synthetic weights.

    .venv/bin/python tools/parity/make_turbo_fixtures.py --salt 0 --seed 0 --out tests/fixtures/turbo \\
        [--python /tmp/upvenv/bin/python] [--kit ../shared/parity] [--keep-weights DIR]

Two interpreters, because upstream's package and ours are both called ``chatterbox``:

1. this one (the project's environment) writes a synthetic Turbo+Nano checkpoint of ``--salt`` into a
   temporary directory, in the published layout (``t3_turbo_v1``, ``t3_nano_v1``, ``s3gen_meanflow``,
   ``ve`` safetensors, GPT-2 tokenizer files; about 3.3 GB, never committed);
2. ``--python`` (a side environment with PyPI ``chatterbox-tts==0.1.7`` and its dependencies, see
   ``docs/turbo_parity.md``) runs ``turbo_upstream.py``: it checks every tensor against the parity
   kit's ``synth_weights`` when ``--kit`` is found, loads the directory with upstream's own
   ``ChatterboxTurboTTS.from_local`` (strict loading), and writes the fixtures.

Fixtures (every call parameter in ``meta["params"]``, the salt and seed included):
``turbo_t3_forward`` / ``turbo_nano_t3_forward`` (teacher-forced logits), ``turbo_t3_inference_steps``
/ ``turbo_nano_t3_inference_steps`` (per-step logits and probabilities, forced tokens),
``turbo_meanflow_flow`` (both noise draws injected, final and non-final), ``turbo_s3gen_e2e``,
``turbo_prepare_conditionals`` (loudness normalisation), ``turbo_text.json`` (punc_norm and the
tokenizer on the synthetic vocabulary with the tags). ``scripts/check_parity.py --fixtures DIR``
checks them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = os.environ.get("CHATTERBOX_UPSTREAM_PYTHON", "/tmp/upvenv/bin/python")
DEFAULT_KIT = ROOT.parent / "shared" / "parity"
UPSTREAM_SIDE = Path(__file__).resolve().parent / "turbo_upstream.py"
# The second tokenizer layout the text fixture reads (added tokens listed in tokenizer_config.json).
DECODER_LAYOUT_DIR = "tokenizer_added_tokens_decoder"


def write_checkpoint(directory: Path, salt: int) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from chatterbox.synthetic_turbo import write_synthetic_turbo_checkpoint
    from chatterbox.text_vocab_turbo import write_turbo_tokenizer_files

    t0 = time.perf_counter()
    write_synthetic_turbo_checkpoint(directory, salt=salt)
    write_turbo_tokenizer_files(directory / DECODER_LAYOUT_DIR, added_tokens_decoder=True)
    print(f"synthetic checkpoint (salt {salt}) in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--salt", type=int, default=0, help="synthetic-weights salt (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and noise draws (default 0)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the fixtures")
    ap.add_argument("--python", default=DEFAULT_PYTHON,
                    help="interpreter of the side environment with upstream (default $CHATTERBOX_UPSTREAM_PYTHON "
                         "or /tmp/upvenv/bin/python)")
    ap.add_argument("--kit", type=Path, default=DEFAULT_KIT,
                    help="parity kit with synth_weights.py, to check the weights (skipped when absent)")
    ap.add_argument("--keep-weights", type=Path, default=None,
                    help="write the synthetic checkpoint here and keep it (default: a temporary directory)")
    args = ap.parse_args(argv)
    if not Path(args.python).is_file():
        print(f"error: --python {args.python} not found (install upstream in a side environment, see "
              "docs/turbo_parity.md)", file=sys.stderr)
        return 2
    out = args.out.resolve()  # the upstream side runs in another directory
    with tempfile.TemporaryDirectory(prefix="turbo_ckpt_") as tmp:
        ckpt = (args.keep_weights or Path(tmp)).resolve()
        write_checkpoint(ckpt, args.salt)
        cmd = [args.python, str(UPSTREAM_SIDE), "--ckpt", str(ckpt), "--out", str(out),
               "--salt", str(args.salt), "--seed", str(args.seed)]
        if (args.kit / "synth_weights.py").is_file():
            cmd += ["--kit", str(args.kit)]
        else:
            print(f"note: no parity kit at {args.kit}; the weights are not cross-checked", flush=True)
        # the side environment must not see this project's package (same name as upstream's)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir())
        print(f"upstream side: exit {done.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
