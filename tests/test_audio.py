"""Feature extractors, trimming, resampling and reference loading against the `mels` fixture."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import load_fixture

from chatterbox.audio import (
    ReferenceAudioError,
    S3GenMelConfig,
    VEMelConfig,
    load_reference,
    resample_soxr,
    resample_torchaudio,
    s3gen_mel_spectrogram,
    trim_silence,
    ve_mel_spectrogram,
)
from tools.parity.runner import compare

RTOL, ATOL = 1e-4, 1e-5  # FIXTURES.md accept tolerance for `mels.*`


@pytest.fixture(scope="module")
def mels():
    torch.set_num_threads(1)
    return load_fixture("mels")


def _assert_close(name, ours, ref):
    result = compare(name, ours, ref, rtol=RTOL, atol=ATOL)
    assert result.ok, result.line()


def test_filterbanks_match_librosa(mels):
    _assert_close("mel_basis_s3gen_24k", S3GenMelConfig.published().mel_basis(), mels["mel_basis_s3gen_24k"])
    _assert_close("mel_basis_ve_16k", VEMelConfig.published().mel_basis(), mels["mel_basis_ve_16k"])


def test_s3gen_mel_parity_and_shapes(mels):
    wav24 = mels["wav24"]
    _assert_close("s3gen_mel_24k", s3gen_mel_spectrogram(wav24[None]), mels["s3gen_mel_24k"])
    # 1-D input is treated as a batch of one; frames = L // hop for any length.
    assert s3gen_mel_spectrogram(wav24[:24001]).shape == (1, 80, 50)
    batch = torch.stack([wav24, wav24.flip(0)])
    out = s3gen_mel_spectrogram(batch)
    assert out.shape == (2, 80, 150)
    # a batch of two takes other FFT code paths on some CPUs: equal to FIXTURES.md's feature tolerance
    torch.testing.assert_close(out[0], mels["s3gen_mel_24k"][0], rtol=1e-4, atol=1e-5)


def test_s3gen_mel_accepts_prebuilt_basis_and_works_in_inference_mode(mels):
    cfg = S3GenMelConfig.published()
    with torch.inference_mode():
        out = s3gen_mel_spectrogram(mels["wav24"][None], cfg, cfg.mel_basis(), cfg.window())
    _assert_close("s3gen_mel_24k", out, mels["s3gen_mel_24k"])


def test_s3gen_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="expects"):
        s3gen_mel_spectrogram(torch.zeros(1, 1, 4800))
    with pytest.raises(ValueError, match="too short"):
        s3gen_mel_spectrogram(torch.zeros(1, 500))


def test_ve_mel_parity_numpy_and_tensor(mels):
    wav16 = mels["wav16"]
    ours = ve_mel_spectrogram(wav16.numpy())
    assert ours.shape == (40, 1 + wav16.shape[0] // 160) and ours.dtype == torch.float32
    _assert_close("ve_mel_untrimmed", ours, mels["ve_mel_untrimmed"])
    _assert_close("ve_mel_untrimmed", ve_mel_spectrogram(wav16), mels["ve_mel_untrimmed"])
    with pytest.raises(ValueError, match="1-D"):
        ve_mel_spectrogram(wav16[None])


def test_trim_index_exact_and_trimmed_mel(mels):
    wav16 = mels["wav16"]
    start, end = trim_silence(wav16.numpy(), top_db=20)
    assert [start, end] == mels["ve_trim_index"].tolist()
    assert trim_silence(wav16) == (start, end)
    _assert_close("ve_mel_trimmed", ve_mel_spectrogram(wav16[start:end]), mels["ve_mel_trimmed"])


def test_resamplers(mels):
    wav24 = mels["wav24"]
    _assert_close("resample_24k_to_16k_torchaudio", resample_torchaudio(wav24[None], 24000, 16000),
                  mels["resample_24k_to_16k_torchaudio"])
    soxr = resample_soxr(wav24.numpy(), 24000, 16000)
    assert isinstance(soxr, np.ndarray) and soxr.dtype == np.float32
    _assert_close("resample_24k_to_16k_librosa", torch.from_numpy(soxr), mels["resample_24k_to_16k_librosa"])
    assert resample_torchaudio(wav24, 24000, 24000) is wav24


# ---------------------------------------------------------------------------------------------
# load_reference


def _tone(sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


def test_load_reference_from_path_resamples(tmp_path, mels):
    path = tmp_path / "ref.wav"
    sf.write(path, mels["wav24"].numpy(), 24000, subtype="FLOAT")
    same = load_reference(path, None, 24000)
    np.testing.assert_array_equal(same, mels["wav24"].numpy())
    as_str = load_reference(str(path), None, 16000)
    assert as_str.dtype == np.float32 and as_str.shape == (48000,)
    _assert_close("resample_24k_to_16k_librosa", torch.from_numpy(as_str), mels["resample_24k_to_16k_librosa"])


def test_load_reference_array_and_tensor():
    wav = _tone(16000, 1.0)
    out = load_reference(wav, 16000, 16000)
    np.testing.assert_array_equal(out, wav)
    out24 = load_reference(torch.from_numpy(wav).double(), 16000, 24000)
    assert out24.dtype == np.float32 and out24.shape == (24000,)
    half = load_reference(torch.from_numpy(wav).bfloat16(), 16000, 16000)
    np.testing.assert_allclose(half, wav, atol=4e-3)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_load_reference_downmixes_stereo(layout, caplog):
    left, right = _tone(16000, 1.0, 0.4), _tone(16000, 1.0, 0.2)
    stereo = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    with caplog.at_level(logging.WARNING, logger="chatterbox.audio"):
        out = load_reference(stereo, 16000, 16000)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)
    assert "downmixing" in caplog.text


def test_load_reference_int16():
    wav = _tone(16000, 1.0)
    pcm = np.round(wav * 32767).astype(np.int16)
    out = load_reference(pcm, 16000, 16000)
    np.testing.assert_allclose(out, wav, atol=1e-4)


@pytest.mark.parametrize(
    "wav, sr, match",
    [
        (_tone(16000, 1.0), None, "needs its sample_rate"),
        (_tone(16000, 1.0), 0, "positive integer"),
        (_tone(16000, 1.0), -16000, "positive integer"),
        (_tone(16000, 1.0), 16000.5, "positive integer"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.where(np.arange(16000) == 5, np.nan, _tone(16000, 1.0)).astype(np.float32), 16000, "NaN or Inf"),
        (np.where(np.arange(16000) == 5, np.inf, _tone(16000, 1.0)).astype(np.float32), 16000, "NaN or Inf"),
        (np.zeros(16000, np.float32), 16000, "all zeros"),
        (_tone(16000, 1.0, amp=5e-5), 16000, "silent"),
        (_tone(16000, 0.4), 16000, "too short"),
        (np.zeros((3, 4, 16000), np.float32), 16000, "1-D"),
        (np.zeros((100, 16000), np.float32), 16000, "channel axis"),
        (np.ones(16000, np.uint8), 16000, "unsupported sample type"),
    ],
)
def test_load_reference_rejects_bad_arrays(wav, sr, match):
    with pytest.raises(ReferenceAudioError, match=match):
        load_reference(wav, sr, 16000)


def test_load_reference_errors_are_value_errors_and_name_the_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(ValueError, match="not found.*nope.wav"):
        load_reference(missing, None, 16000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(ReferenceAudioError, match="garbage.wav"):
        load_reference(garbage, None, 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(ReferenceAudioError, match="silent.wav is all zeros"):
        load_reference(silent, None, 16000)
    with pytest.raises(ReferenceAudioError, match="not a file"):
        load_reference(tmp_path, None, 16000)
    with pytest.raises(ReferenceAudioError, match="numpy array or torch tensor"):
        load_reference([0.1, 0.2], 16000, 16000)
