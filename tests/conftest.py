from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FIXTURES = ROOT / "tests" / "fixtures"
DATA = ROOT / "tests" / "data"
SHARED_FIXTURES = ROOT.parent / "shared" / "parity" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def load_fixture(stem: str):
    from chatterbox.parity.runner import load_fixture as _load

    suffix = ".json" if stem == "text_and_token_utils" else ".safetensors"
    return _load(FIXTURES / f"{stem}{suffix}")


def run_triton_interpreted(script: str, payload: str, timeout: int = 900) -> dict:
    """Run ``script`` (python -c) with TRITON_INTERPRET=1 set before triton loads, ``payload`` as its
    first argument; return the JSON object on its last stdout line (Triton kernels on the CPU)."""
    import json
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script, payload], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"interpreter run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def synthetic_tts():
    """The full-size pipeline on synthetic weights, built once per test session (~35 s on CPU).

    Two CFM steps instead of ten: what these tests check (API, modes, reproducibility, shapes) does
    not depend on the step count, and the flow dominates CPU time. Parity tests use ten.
    """
    from chatterbox import ChatterboxTTS, OptConfig

    torch.set_num_threads(2)
    return ChatterboxTTS.from_synthetic("cpu", opt=OptConfig.reference().replace(cfm_steps=2))
