"""``--upstream PATH``: time an upstream chatterbox-streaming checkout beside ours.

Upstream runs in a subprocess whose import path holds the checkout's ``src`` (both projects call
their package ``chatterbox``), on the same weights, texts, seed and device. It needs packages that
are not our dependencies (transformers, diffusers, omegaconf, conformer, s3tokenizer, resemble-perth);
when one is missing the result is ``{"status": "skipped", "reason": "missing ..."}``, never a crash.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .texts import TextCase

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("upstream_driver.py")
MARK = "UPSTREAM_RESULT "
PT_FILES = ("ve.pt", "t3_cfg.pt", "s3gen.pt", "tokenizer.json")
DEFAULT_TIMEOUT_S = 1800
SPEECH_CODEBOOK = 6561  # S3Gen renders ids below this; T3's head also scores start/stop and unused ids


def upstream_src(path: str | Path) -> Path | None:
    """The folder holding upstream's ``chatterbox`` package (``PATH/src`` or ``PATH``), or None."""
    path = Path(path).resolve()  # the driver runs in a temporary folder: no relative paths
    for cand in (path / "src", path):
        if (cand / "chatterbox" / "tts.py").is_file():
            return cand
    return None


def synthetic_pt_dir(salt: int, cache: Path | None = None) -> tuple[Path | None, str | None]:
    """A synthetic checkpoint with the ``.pt`` files upstream's ``from_local`` reads (written once,
    about 6.5 GB with the safetensors copies). Returns (dir, None) or (None, why not)."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatterbox-fast"
    out = cache / f"upstream-synthetic-salt{salt}"
    if all((out / f).is_file() for f in PT_FILES):
        return out, None
    try:
        from chatterbox.synthetic_checkpoint import write_synthetic_checkpoint
    except ImportError:
        return None, ("no synthetic .pt writer in this checkout: run scripts/make_synthetic_checkpoint.py "
                      "--also-pt DIR and pass --upstream-ckpt DIR")
    log.info("writing the synthetic checkpoint with .pt files to %s (once)", out)
    write_synthetic_checkpoint(out, salt=salt, also_pt=True)
    return out, None


def probe_upstream(path: str | Path, python: str | None = None, extra_path: str | None = None,
                   watermark: bool = False, timeout_s: float = 300) -> dict:
    """Whether the checkout imports in the upstream interpreter: status "ok", or "skipped" with the
    missing packages (cheap; run before writing a multi-GB checkpoint for it)."""
    src = upstream_src(path)
    if src is None:
        return {"status": "skipped", "reason": f"no chatterbox/tts.py under {path} or {path}/src"}
    spec = {"src": str(src), "check_only": True, "watermark": watermark}
    return _drive(spec, None, python, extra_path, timeout_s)


def run_upstream(path: str | Path, ckpt_dir: str | Path, device: str, cases: list[TextCase], *, seed: int,
                 reps: int, warmup: int, chunk_size, context_window: int, reference_wav: np.ndarray,
                 reference_sr: int, watermark: bool = False, synthetic: bool = True, python: str | None = None,
                 extra_path: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Run the upstream driver; always returns a dict with ``status`` ("ok", "skipped", "failed").

    ``watermark`` False replaces upstream's (unconditional) Perth watermarker by a pass-through, so
    both sides run without it; ``extra_path`` is prepended to the subprocess's PYTHONPATH (where
    upstream's own packages live, e.g. pinned transformers). ``synthetic`` masks the speech logits
    past the code book (upstream would hand those ids to S3Gen)."""
    src = upstream_src(path)
    if src is None:
        return {"status": "skipped", "reason": f"no chatterbox/tts.py under {path} or {path}/src"}
    ckpt_dir = Path(ckpt_dir).resolve()
    absent = [f for f in PT_FILES if not (ckpt_dir / f).is_file()]
    if absent:
        return {"status": "skipped", "reason": f"{ckpt_dir} lacks {', '.join(absent)} (upstream reads .pt files)"}
    if isinstance(chunk_size, (list, tuple)):
        return {"status": "skipped", "reason": "upstream takes one integer chunk_size, not a schedule"}
    spec = {"src": str(src), "ckpt_dir": str(ckpt_dir), "device": device, "seed": seed, "reps": reps,
            "warmup": warmup, "chunk_size": chunk_size, "context_window": context_window,
            "texts": [asdict(c) for c in cases], "watermark": watermark, "mask_invalid_ids": synthetic,
            "speech_codebook": SPEECH_CODEBOOK}
    return _drive(spec, (reference_wav, reference_sr), python, extra_path, timeout_s)


def _drive(spec: dict, reference: tuple[np.ndarray, int] | None, python: str | None, extra_path: str | None,
           timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="ab-upstream-") as tmp:
        tmp = Path(tmp)
        if reference is not None:
            import soundfile

            spec["reference_wav"] = str(tmp / "reference.wav")  # upstream's prepare_conditionals reads a file
            soundfile.write(spec["reference_wav"], reference[0], reference[1])
        (tmp / "spec.json").write_text(json.dumps(spec))
        # A copy outside this repository, so the driver's own folder puts nothing of ours on sys.path.
        driver = shutil.copy(DRIVER, tmp / "driver.py")
        env = dict(os.environ)
        extra = [str(Path(p).resolve()) for p in (extra_path or "").split(os.pathsep) if p]
        paths = extra + _foreign_paths(env.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            proc = subprocess.run([python or sys.executable, str(driver), str(tmp / "spec.json")], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
        except OSError as exc:
            return {"status": "failed", "reason": f"could not start {python or sys.executable}: {exc}"}
    return parse_driver_output(proc.stdout, proc.stderr, proc.returncode)


def _foreign_paths(pythonpath: str) -> list[str]:
    """PYTHONPATH entries minus this repository (its ``chatterbox`` would shadow upstream's)."""
    ours = Path(__file__).resolve().parents[1]
    keep = []
    for entry in filter(None, pythonpath.split(os.pathsep)):
        p = Path(entry).resolve()
        if p != ours and ours not in p.parents:
            keep.append(entry)
    return keep


def parse_driver_output(stdout: str, stderr: str, returncode: int) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"status": "failed", "reason": f"driver exited {returncode} without a result: {' | '.join(tail)}"}
    result = json.loads(lines[-1][len(MARK):])
    if result.get("status") != "ok":
        log.warning("upstream: %s (%s)", result.get("status"), result.get("reason"))
    return result
