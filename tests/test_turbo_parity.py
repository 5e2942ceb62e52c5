"""Chatterbox-Turbo/Nano parity with pinned upstream (tests/fixtures/turbo, synthetic weights, full size).

One parity context for the module, so each model (Turbo T3, Nano T3, meanflow S3Gen, VE) is built
once and shared by the fixtures that need it.
"""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import FIXTURES

TURBO_FIXTURES = FIXTURES / "turbo"
STEMS = ("turbo_t3_forward", "turbo_nano_t3_forward", "turbo_t3_inference_steps", "turbo_nano_t3_inference_steps",
         "turbo_meanflow_flow", "turbo_s3gen_e2e", "turbo_prepare_conditionals", "turbo_text")


@pytest.fixture(scope="module")
def parity_context():
    from tools.parity.runner import ParityContext

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    ctx = ParityContext()
    yield ctx
    ctx.cache.clear()
    gc.collect()
    torch.set_num_threads(before)


def test_every_fixture_has_a_checker():
    from tools.parity.runner import find_checker

    present = sorted(p.stem for p in TURBO_FIXTURES.iterdir() if p.suffix in (".safetensors", ".json"))
    assert present == sorted(STEMS)
    assert all(find_checker(stem) is not None for stem in STEMS)


@pytest.mark.full_size
@pytest.mark.parametrize("stem", STEMS)
def test_turbo_parity(stem, parity_context):
    from tools.parity.runner import find_checker, load_fixture

    suffix = ".json" if stem == "turbo_text" else ".safetensors"
    fx = load_fixture(TURBO_FIXTURES / f"{stem}{suffix}")
    results = find_checker(stem)(fx, parity_context)
    assert results
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


def test_fixtures_record_their_parameters():
    """Every call parameter a checker reads is in meta['params'], the salt and seed included."""
    from tools.parity.runner import load_fixture

    for path in TURBO_FIXTURES.iterdir():
        params = load_fixture(path).params
        assert {"salt", "seed"} <= set(params), path.name
