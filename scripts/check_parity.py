#!/usr/bin/env python3
"""Run every parity fixture found in a directory against our implementation.

    python scripts/check_parity.py --fixtures ../shared/parity/fixtures [--salt N] [--ckpt DIR]

The harness lives in ``tools/parity`` (outside the installed package). Every call parameter, the
synthetic-weights salt included, comes from each fixture's ``meta["params"]``; ``--salt`` overrides
the salt of every fixture.

Prints one line per compared tensor (``<fixture>/<tensor> max_abs=... tol=... ok|FAIL``), a
``skipped`` line for fixtures whose component is not implemented, and ends with
``parity: N passed, M failed``. Exit status 0 only when nothing failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the library (src/) and the repository root, where the harness package ``tools.parity`` lives
for _path in (ROOT / "src", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from tools.parity.runner import ComponentMissing, ParityContext, find_checker, load_fixture  # noqa: E402


def _parse_opt(spec: str):
    """``None`` for the reference configuration (nothing from ``chatterbox.optim`` is imported then),
    else the parsed ``OptConfig``."""
    if spec.strip() == "reference":
        return None
    from chatterbox.optim import OptConfig

    opt = OptConfig.parse(spec)
    return None if opt == OptConfig.reference() else opt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", required=True, type=Path, help="directory of *.safetensors / *.json fixtures")
    ap.add_argument("--salt", type=int, default=None,
                    help="synthetic-weights salt for every fixture (default: each fixture's meta['params']['salt'])")
    ap.add_argument("--ckpt", type=Path, default=None, help="load weights from this checkpoint directory instead")
    ap.add_argument("--opt", default="reference",
                    help="OptConfig preset or spec to run under, e.g. fast or 'reference+t3.dtype=bfloat16'; "
                         "other than reference, per-tensor deviations (max_abs, SNR) are reported instead of "
                         "verdicts and only errors fail the run")
    ap.add_argument("--only", default="", help="comma-separated fixture stems to run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    if not args.fixtures.is_dir():
        print(f"error: fixtures directory not found: {args.fixtures}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        opt = _parse_opt(args.opt)
    except (ImportError, TypeError, ValueError) as exc:
        print(f"error: --opt: {exc}", file=sys.stderr)
        return 2
    reference = opt is None
    spec = "reference" if reference else opt.to_spec()
    deviating = errors = 0
    only = {s for s in args.only.split(",") if s}
    paths = sorted(p for p in args.fixtures.iterdir() if p.suffix in (".safetensors", ".json"))
    paths = [p for p in paths if not only or p.stem in only]
    passed = failed = skipped = 0
    # One context: each checker binds it to its fixture (salt from meta['params'] unless --salt), and
    # the models it caches are keyed by their weights, so fixtures of different salts never share one.
    ctx = ParityContext(ckpt_dir=args.ckpt, salt=args.salt, opt=args.opt)
    for path in paths:
        checker = find_checker(path.stem)
        if checker is None:
            print(f"{path.stem}  skipped (no checker for this fixture)")
            skipped += 1
            continue
        fixture = load_fixture(path)
        t0 = time.perf_counter()
        try:
            results = checker(fixture, ctx)
        except ComponentMissing as exc:
            print(f"{path.stem}  skipped ({exc})")
            skipped += 1
            continue
        except Exception as exc:  # a crash is a failure of that fixture, not of the runner
            print(f"{path.stem}/*  error: {type(exc).__name__}: {exc}  FAIL")
            failed += 1
            errors += 1
            continue
        for r in results:
            print(f"{path.stem}/{r.line() if reference else r.deviation_line()}", flush=True)
            passed += r.ok
            failed += not r.ok
            deviating += not r.ok
        if not reference:
            snrs = [r.snr_db for r in results if r.snr_db is not None]
            worst = f"worst snr {min(snrs):.1f}dB" if snrs else "no float tensors"
            print(f"# {path.stem} [{spec}]: {worst}, {sum(not r.ok for r in results)} of {len(results)} "
                  f"beyond the reference tolerance")
        print(f"# {path.stem}: {len(results)} tensors in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if reference:
        print(f"parity: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
        return 0 if failed == 0 else 1
    print(f"parity[{spec}]: {passed} within tolerance, {deviating} deviate, {errors} errors"
          + (f", {skipped} skipped" if skipped else ""))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
