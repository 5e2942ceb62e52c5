#!/usr/bin/env python3
"""Write a synthetic Chatterbox checkpoint directory (real layout, deterministic weights, NOT speech).

    python scripts/make_synthetic_checkpoint.py OUT_DIR [--salt 0] [--also-pt] [--no-conds]

Writes ve/t3_cfg/s3gen .safetensors (~3.2 GB), tokenizer.json (704 symbols, upstream special tokens)
and conds.pt (a built-in voice made from a synthetic reference signal).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatterbox.synthetic_checkpoint import write_synthetic_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--salt", type=int, default=0, help="recipe salt (0 = the parity fixtures' weights)")
    ap.add_argument("--also-pt", action="store_true", help="also write .pt files (what upstream's from_local reads)")
    ap.add_argument("--no-conds", action="store_true", help="skip the built-in voice conds.pt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    digests = write_synthetic_checkpoint(args.out_dir, salt=args.salt, also_pt=args.also_pt,
                                         with_conds=not args.no_conds)
    for stem, digest in digests.items():
        print(f"{stem}: sha256 {digest}")
    print(f"synthetic checkpoint written to {args.out_dir} (not speech)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
