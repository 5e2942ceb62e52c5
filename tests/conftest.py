from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # the parity harness, ``tools.parity``, lives outside the package

FIXTURES = ROOT / "tests" / "fixtures"
DATA = ROOT / "tests" / "data"
SHARED_FIXTURES = ROOT.parent / "shared" / "parity" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def load_fixture(stem: str):
    from tools.parity.runner import load_fixture as _load

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


def make_tiny_tts(opt=None, device: str = "cpu", seed: int = 0):
    """The whole pipeline with tiny random models and the published vocabularies (``build_tiny_models``):
    runs end to end in seconds on a CPU. Its audio means nothing; it checks the machinery."""
    import tempfile

    from chatterbox import ChatterboxTTS
    from chatterbox.loader import build_tiny_models
    from chatterbox.text import EnTokenizer
    from chatterbox.text_vocab import write_tokenizer_json
    from chatterbox.voice import synthetic_reference

    models = build_tiny_models(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = EnTokenizer(write_tokenizer_json(Path(tmp) / "tokenizer.json"))
    tts = ChatterboxTTS(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt)
    tts.prepare_conditionals(synthetic_reference(), sample_rate=24000)
    return tts


@pytest.fixture(scope="session")
def tiny_tts():
    return make_tiny_tts()


def _needs_cuda(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", "")) + " ".join(str(a) for a in mark.args)
        if "cuda" in reason.lower():
            return True
    return item.name.startswith("test_gpu")


def pytest_collection_modifyitems(config, items):
    """Every test that needs CUDA carries the ``gpu`` marker (so ``pytest -m gpu`` runs them all on a
    GPU machine); a CUDA test without it is a collection error. Without CUDA, ``gpu`` tests skip."""
    unmarked = [item.nodeid for item in items if _needs_cuda(item) and item.get_closest_marker("gpu") is None]
    if unmarked:
        raise pytest.UsageError("tests that need CUDA must carry @pytest.mark.gpu: " + ", ".join(unmarked))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread and lose a lot on a shared CPU (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_tiny_t3(seed: int = 0):
    """T3 at ``T3Config.tiny()`` with N(0, 0.3) weights: logits spread enough that sampling varies."""
    from chatterbox.models.t3.t3 import T3, T3Config

    torch.manual_seed(seed)
    t3 = T3(T3Config.tiny())
    for p in t3.parameters():
        p.data.normal_(0, 0.3)
    return t3.eval().requires_grad_(False)


def make_tiny_turbo_tts(opt=None, device: str = "cpu", seed: int = 0):
    """The Turbo pipeline with tiny synthetic-recipe models (``build_tiny_turbo_models``)."""
    from chatterbox.loader_turbo import build_tiny_turbo_models
    from chatterbox.tts_turbo import ChatterboxTurboTTS
    from chatterbox.voice import synthetic_reference

    m = build_tiny_turbo_models(seed)
    tts = ChatterboxTurboTTS(m.t3, m.s3gen, m.ve, m.tokenizer, device, opt=opt)
    tts.prepare_conditionals(synthetic_reference(seconds=6.0), sample_rate=24000)
    return tts
