"""Pinned upstream Chatterbox-Turbo / Nano (PyPI ``chatterbox-tts==0.1.7`` in its side environment,
``docs/turbo_parity.md``) as a process that stays loaded and answers one ``generate`` per request
(``upstream_turbo_driver.py``), on a synthetic checkpoint directory that our side loads too.
Used by ``eval/cpu_turbo.py`` and by ``eval/ab.py --model turbo|nano --upstream ENV``."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("upstream_turbo_driver.py")
MARK = "UPSTREAM_RESULT "
DEFAULT_PYTHON = os.environ.get("CHATTERBOX_UPSTREAM_PYTHON", "/tmp/upvenv/bin/python")
# Turbo's published sampling (upstream's generate defaults), asked of upstream in every request.
SAMPLING = {"temperature": 0.8, "top_k": 1000, "top_p": 0.95, "repetition_penalty": 1.2}


def upstream_python(path: str | Path | None) -> str | None:
    """The side environment's interpreter: ``path`` itself, or ``path/bin/python`` for a virtual
    environment's directory; None when there is none."""
    if not path:
        return None
    path = Path(path)
    for cand in (path / "bin" / "python", path):
        if cand.is_file():
            return str(cand)
    return None


def checkpoint_dir(salt: int, cache: Path | None = None) -> Path:
    """The synthetic Turbo + Nano checkpoint of ``salt`` in the published layout (written once, about
    3.3 GB): both sides load these files."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatterbox-fast"
    out = cache / f"turbo-synthetic-salt{salt}"
    if not all((out / f"{stem}.safetensors").is_file() for stem in ("t3_turbo_v1", "t3_nano_v1", "s3gen_meanflow",
                                                                    "ve")):
        from chatterbox.synthetic_turbo import write_synthetic_turbo_checkpoint

        log.info("writing the synthetic Turbo + Nano checkpoint to %s (once)", out)
        write_synthetic_turbo_checkpoint(out, salt=salt)
    return out


def write_reference(path: Path, wav: np.ndarray, sample_rate: int) -> Path:
    import soundfile as sf

    sf.write(str(path), np.asarray(wav, dtype=np.float32), sample_rate, subtype="FLOAT")  # both read these samples
    return path


class UpstreamTurbo:
    """The upstream driver, loaded once (model and voice) and asked for one ``generate`` per call."""

    def __init__(self, python: str, ckpt: Path, model: str, reference: Path | None, threads: int | None = None,
                 log_path: Path | None = None, device: str = "cpu") -> None:
        """``reference``: the recording upstream makes its voice from (None: the checkpoint's conds.pt)."""
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"upstream-{model}.log"
        self.log = open(self.log_path, "w")
        cmd = [python, str(DRIVER), "--ckpt", str(ckpt), "--model", model, "--device", device]
        if reference is not None:
            cmd += ["--reference", str(reference)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONPATH": ""})
        self.ready = self._read()
        if self.ready.get("status") != "ok":
            self.close()
            raise RuntimeError(f"upstream failed to load: {self.ready.get('reason')} (log: {self.log_path})")

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        return {"status": "failed", "reason": f"the driver exited with status {self.proc.wait()}"}

    def generate(self, text: str, max_new_tokens: int, seed: int) -> dict:
        """Upstream's generate steps on ``text`` with ``max_new_tokens`` and ``seed``: total_s, t3_s,
        s3gen_s, t3_tokens, audio_s."""
        self.proc.stdin.write(json.dumps({"text": text, "max_new_tokens": max_new_tokens, "seed": seed,
                                          "sampling": SAMPLING}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if out.get("status") != "ok":
            raise RuntimeError(f"upstream generate failed: {out.get('reason')} (log: {self.log_path})")
        return {k: v for k, v in out.items() if k != "status"}

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> "UpstreamTurbo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
