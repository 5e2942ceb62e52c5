"""Small signal-processing helpers shared by the feature extractors and the synthetic weights."""
from __future__ import annotations

import numpy as np
import torch

# Slaney's auditory scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above it.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel_slaney(freq_hz: np.ndarray | float) -> np.ndarray:
    freq = np.asarray(freq_hz, dtype=np.float64)
    mel = freq / _SLANEY_HZ_PER_MEL
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
    above = freq >= _SLANEY_BREAK_HZ
    safe = np.where(above, freq, _SLANEY_BREAK_HZ)
    return np.where(above, break_mel + np.log(safe / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP, mel)


def mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
    linear = mel * _SLANEY_HZ_PER_MEL
    log_part = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - break_mel))
    return np.where(mel >= break_mel, log_part, linear)


def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin_hz: float = 0.0, fmax_hz: float | None = None
) -> torch.Tensor:
    """Area-normalised triangular filters, (n_mels, n_fft // 2 + 1) float32.

    Numerically the same construction as librosa's default ``filters.mel`` (slaney scale and norm),
    evaluated in float64 and rounded once at the end.
    """
    top_hz = sample_rate / 2.0 if fmax_hz is None else float(fmax_hz)
    bin_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges_mel = np.linspace(hz_to_mel_slaney(fmin_hz), hz_to_mel_slaney(top_hz), n_mels + 2)
    edges_hz = mel_to_hz_slaney(edges_mel)
    widths = np.diff(edges_hz)
    # distance of each band edge to each FFT bin centre, (n_mels + 2, n_bins)
    offsets = edges_hz[:, None] - bin_hz[None, :]
    bank = np.zeros((n_mels, bin_hz.shape[0]), dtype=np.float32)
    for band in range(n_mels):
        rising = -offsets[band] / widths[band]
        falling = offsets[band + 2] / widths[band + 1]
        bank[band] = np.maximum(0.0, np.minimum(rising, falling))
    area = 2.0 / (edges_hz[2 : n_mels + 2] - edges_hz[:n_mels])
    bank *= area[:, None]
    return torch.from_numpy(bank)


def periodic_hann(length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.hann_window(length, periodic=True, dtype=dtype)
