"""Our BS.1770 meter against pyloudnorm (what upstream Turbo normalises its reference with)."""
from __future__ import annotations

import numpy as np
import pytest

from chatterbox.loudness import integrated_loudness, normalize_loudness

pyloudnorm = pytest.importorskip("pyloudnorm")


def signal(rate: int, seconds: float, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    if kind == "tone":
        wav = 0.3 * np.sin(2 * np.pi * 997 * t)
    elif kind == "speechlike":
        f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        env = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 2  # syllables with silent gaps (gating)
        wav = env * sum(np.sin(k * phase) / k for k in range(1, 15)) * 0.2
    elif kind == "bursts":  # loud and very quiet parts: both gates matter
        wav = 0.001 * rng.standard_normal(t.shape)
        wav[: len(t) // 3] += 0.5 * rng.standard_normal(len(t) // 3)
    else:
        wav = 0.1 * rng.standard_normal(t.shape)
    return wav.astype(np.float32)


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("kind", ["tone", "speechlike", "bursts", "noise"])
def test_matches_pyloudnorm(rate, kind):
    for seconds in (0.4, 1.23, 5.07):
        wav = signal(rate, seconds, seed=rate + len(kind), kind=kind)
        want = pyloudnorm.Meter(rate).integrated_loudness(wav)
        got = integrated_loudness(wav, rate)
        assert got == pytest.approx(want, abs=1e-9), (rate, kind, seconds)


def test_float64_input_matches_too():
    wav = signal(24000, 3.3, 1, "speechlike").astype(np.float64)
    assert integrated_loudness(wav, 24000) == pytest.approx(pyloudnorm.Meter(24000).integrated_loudness(wav), abs=1e-9)


def test_silence_and_short_signals():
    assert integrated_loudness(np.zeros(24000, np.float32), 24000) == float("-inf")
    with pytest.raises(ValueError, match="shorter than one"):
        integrated_loudness(np.ones(100, np.float32), 24000)
    with pytest.raises(ValueError, match="floating"):
        integrated_loudness(np.ones(24000, np.int16), 24000)
    with pytest.raises(ValueError, match="mono"):
        integrated_loudness(np.ones((2, 24000), np.float32), 24000)


def test_normalize_to_target():
    wav = signal(24000, 6.0, 3, "speechlike")
    out = normalize_loudness(wav, 24000, -27.0)
    assert out.dtype == np.float32
    assert integrated_loudness(out, 24000) == pytest.approx(-27.0, abs=1e-3)
    gain = 10 ** ((-27.0 - pyloudnorm.Meter(24000).integrated_loudness(wav)) / 20)
    np.testing.assert_allclose(out, wav * gain, rtol=1e-6)


def test_normalize_skips_what_it_cannot_measure(caplog):
    silent = np.zeros(24000, np.float32)
    short = np.full(10, 0.1, np.float32)
    assert normalize_loudness(silent, 24000, -27.0) is silent
    assert normalize_loudness(short, 24000, -27.0) is short
    assert "skipped" in caplog.text
