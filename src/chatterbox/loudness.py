"""Integrated loudness (ITU-R BS.1770-4) and loudness normalisation of a reference recording.

Chatterbox-Turbo normalises its reference to -27 LUFS before anything else. Upstream measures with
pyloudnorm's default meter; this one computes the same quantity the same way, so the gain matches:

* K-weighting as two biquads designed with the audio-EQ-cookbook formulas at the signal's own rate:
  a high shelf (+4 dB, 1500 Hz, Q 1/sqrt(2)) then a high pass (38 Hz, Q 0.5), each run in float64
  and stored back in the input's dtype;
* mean squares over 400 ms blocks every 100 ms (block count round((T - 0.4) / 0.1) + 1, block bounds
  truncated to samples), block loudness -0.691 + 10 log10(z);
* gating: blocks at or above -70 LUFS, then blocks above both -70 LUFS and the gated mean - 10 LU.

Mono only (a reference is mono by the time it is measured).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_LOUDNESS_OFFSET_DB = -0.691


@dataclass(frozen=True)
class LoudnessConfig:
    block_seconds: float = 0.4
    overlap: float = 0.75
    absolute_gate_lufs: float = -70.0
    relative_gate_lu: float = -10.0
    shelf_gain_db: float = 4.0
    shelf_hz: float = 1500.0
    shelf_q: float = 1.0 / math.sqrt(2.0)
    highpass_hz: float = 38.0
    highpass_q: float = 0.5

    @classmethod
    def bs1770(cls) -> "LoudnessConfig":
        return cls()


def _high_shelf(gain_db: float, freq_hz: float, q: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * (freq_hz / rate)
    alpha = np.sin(w0) / (2.0 * q)
    cos_w0, root = np.cos(w0), 2 * np.sqrt(a) * alpha
    b = np.array([a * ((a + 1) + (a - 1) * cos_w0 + root),
                  -2 * a * ((a - 1) + (a + 1) * cos_w0),
                  a * ((a + 1) + (a - 1) * cos_w0 - root)])
    den = np.array([(a + 1) - (a - 1) * cos_w0 + root,
                    2 * ((a - 1) - (a + 1) * cos_w0),
                    (a + 1) - (a - 1) * cos_w0 - root])
    return b / den[0], den / den[0]


def _high_pass(freq_hz: float, q: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    w0 = 2.0 * np.pi * (freq_hz / rate)
    alpha = np.sin(w0) / (2.0 * q)
    cos_w0 = np.cos(w0)
    b = np.array([(1 + cos_w0) / 2, -(1 + cos_w0), (1 + cos_w0) / 2])
    den = np.array([1 + alpha, -2 * cos_w0, 1 - alpha])
    return b / den[0], den / den[0]


def k_weighting(wav: np.ndarray, sample_rate: float, cfg: LoudnessConfig = LoudnessConfig()) -> np.ndarray:
    """The K-weighted signal, in ``wav``'s dtype (each stage filtered in float64, then stored back)."""
    from scipy.signal import lfilter

    out = np.array(wav, copy=True)
    for b, a in (_high_shelf(cfg.shelf_gain_db, cfg.shelf_hz, cfg.shelf_q, sample_rate),
                 _high_pass(cfg.highpass_hz, cfg.highpass_q, sample_rate)):
        out[:] = lfilter(b, a, out)
    return out


def integrated_loudness(wav: np.ndarray, sample_rate: float, cfg: LoudnessConfig = LoudnessConfig()) -> float:
    """Gated integrated loudness of a mono floating-point signal in LUFS (``-inf`` for silence).

    Raises ``ValueError`` when the signal is not floating point or shorter than one block.
    """
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"integrated_loudness measures a mono (L,) signal, got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"integrated_loudness needs floating-point samples, got {wav.dtype}")
    block = cfg.block_seconds
    if wav.shape[0] < block * sample_rate:
        raise ValueError(f"signal of {wav.shape[0]} samples is shorter than one {block} s block")
    weighted = k_weighting(wav, sample_rate, cfg)
    step = 1.0 - cfg.overlap
    seconds = wav.shape[0] / sample_rate
    n_blocks = int(np.round((seconds - block) / (block * step))) + 1
    z = np.empty(n_blocks)
    for j in range(n_blocks):
        lo = int(block * (j * step) * sample_rate)
        hi = int(block * (j * step + 1) * sample_rate)
        z[j] = (1.0 / (block * sample_rate)) * np.sum(np.square(weighted[lo:hi]))
    with np.errstate(divide="ignore"):
        block_lufs = _LOUDNESS_OFFSET_DB + 10.0 * np.log10(z)
        above_absolute = block_lufs >= cfg.absolute_gate_lufs
        if not above_absolute.any():
            return float("-inf")
        relative = _LOUDNESS_OFFSET_DB + 10.0 * np.log10(np.mean(z[above_absolute])) + cfg.relative_gate_lu
        gated = (block_lufs > relative) & (block_lufs > cfg.absolute_gate_lufs)
        if not gated.any():
            return float("-inf")
        return float(_LOUDNESS_OFFSET_DB + 10.0 * np.log10(np.mean(z[gated])))


def normalize_loudness(wav: np.ndarray, sample_rate: float, target_lufs: float,
                       cfg: LoudnessConfig = LoudnessConfig()) -> np.ndarray:
    """``wav`` scaled to ``target_lufs`` (upstream's ``norm_loudness``); unchanged, with a warning,
    when it cannot be measured (shorter than a block, silent) or the gain is not finite and positive."""
    try:
        loudness = integrated_loudness(wav, sample_rate, cfg)
    except ValueError as exc:
        log.warning("loudness normalisation skipped: %s", exc)
        return wav
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    if not (math.isfinite(gain) and gain > 0.0):
        log.warning("loudness normalisation skipped: the signal measures %s LUFS", loudness)
        return wav
    return wav * gain
