"""Voice encoder: parity with the `voice_encoder` fixture, partial slicing, shapes and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_fixture

from chatterbox.models.voice_encoder import (
    VoiceEncoder,
    VoiceEncoderConfig,
    cut_partials,
    partial_layout,
)
from chatterbox.synthetic import synthetic_module
from tools.parity.runner import compare

RTOL, ATOL = 1e-4, 1e-6  # FIXTURES.md accept tolerance for VE embeddings


@pytest.fixture(scope="module")
def fx():
    return load_fixture("voice_encoder")


@pytest.fixture(scope="module")
def published_ve():
    torch.set_num_threads(1)
    with torch.device("meta"):
        ve = VoiceEncoder(VoiceEncoderConfig.published())
    return synthetic_module(ve, prefix="", salt=0).eval()


def _ok(name, ours, ref):
    result = compare(name, ours, ref, rtol=RTOL, atol=ATOL)
    assert result.ok, result.line()


def test_state_dict_matches_manifest(published_ve):
    import json
    from conftest import DATA

    manifest = json.loads((DATA / "manifest.json").read_text())["files"]["ve.safetensors"]["entries"]
    want = {e["key"]: tuple(e["shape"]) for e in manifest}
    got = {k: tuple(v.shape) for k, v in published_ve.state_dict().items()}
    assert got == want


def test_parity_with_fixture(published_ve, fx):
    wav = fx["wav16"].numpy()
    with torch.inference_mode():
        embeds = published_ve.embeds_from_wavs([wav], 16000)
        partials, counts = published_ve.partial_embeds(published_ve.mels_from_wavs([wav], 16000))
        spk = published_ve.embeds_from_wavs([wav], 16000, as_spk=True)
    no_trim = published_ve.embeds_from_wavs([wav], 16000, trim_top_db=None)  # plain grad mode works too
    assert counts == [2]
    _ok("embeds", embeds, fx["embeds"])
    _ok("partial_embeds", partials, fx["partial_embeds"])
    _ok("embeds_as_spk", spk, fx["embeds_as_spk"])
    _ok("embeds_no_trim", no_trim, fx["embeds_no_trim"])


def test_batched_wavs_equal_single_calls(published_ve, fx):
    wav = fx["wav16"].numpy()
    short = wav[8000:8000 + 16000 * 1]  # about 1 s: a single zero-padded partial
    with torch.no_grad():
        both = published_ve.embeds_from_wavs([wav, short], 16000, trim_top_db=None)
        alone = published_ve.embeds_from_wavs([short], 16000, trim_top_db=None)
    assert both.shape == (2, 256)
    _ok("batched row 0", both[0:1], fx["embeds_no_trim"])
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)


def test_partial_layout_matches_upstream_rule():
    # (frames, expected partials, expected target length) with step 77, window 160, coverage 0.8
    assert partial_layout(1, 77, 160, 0.8) == (1, 160)
    assert partial_layout(160, 77, 160, 0.8) == (1, 160)
    assert partial_layout(266, 77, 160, 0.8) == (2, 237)  # trimmed fixture mel: truncated
    assert partial_layout(301, 77, 160, 0.8) == (3, 314)  # untrimmed fixture mel: zero-padded
    assert partial_layout(330, 77, 160, 0.8) == (3, 314)  # a fourth window would be only 62 % real
    with pytest.raises(ValueError, match="empty"):
        partial_layout(0, 77, 160, 0.8)


def test_cut_partials_pads_and_truncates():
    mel = torch.arange(100 * 3, dtype=torch.float32).view(100, 3)
    parts = cut_partials(mel, step=10, partial_frames=20, min_coverage=0.8)
    n, target = partial_layout(100, 10, 20, 0.8)
    assert parts.shape == (n, 20, 3)
    torch.testing.assert_close(parts[1], mel[10:30])
    short = cut_partials(mel[:5], step=10, partial_frames=20, min_coverage=0.8)
    assert short.shape == (1, 20, 3)
    torch.testing.assert_close(short[0, :5], mel[:5])
    assert bool((short[0, 5:] == 0).all())


def test_tiny_config_shapes_and_modes():
    torch.manual_seed(0)
    ve = VoiceEncoder(VoiceEncoderConfig.tiny()).eval()
    mels = torch.rand(3, 50, 40)
    out = ve(mels)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 40000)]
    with torch.inference_mode():
        utt = ve.embeds_from_wavs(wavs, 16000)
        spk = ve.embeds_from_wavs(wavs, 16000, as_spk=True)
    assert utt.shape == (2, 8) and spk.shape == (8,)
    # A non-16 kHz input is resampled first: 1 s at 24 kHz behaves like 1 s at 16 kHz.
    mels24 = ve.mels_from_wavs([rng.standard_normal(24000).astype(np.float32)], 24000, trim_top_db=None)
    assert mels24[0].shape == (101, 40)


def test_bad_arguments():
    ve = VoiceEncoder(VoiceEncoderConfig.tiny())
    with pytest.raises(TypeError, match="list of waveforms"):
        ve.embeds_from_wavs(np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="partial step"):
        ve.partial_embeds([torch.zeros(200, 40)], rate=0.5)
    with pytest.raises(ValueError, match="at least one"):
        ve.partial_embeds([])
    with pytest.raises(ValueError, match="min_coverage"):
        ve.partial_embeds([torch.zeros(200, 40)], min_coverage=0.0)
