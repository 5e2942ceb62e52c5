"""Kaldi-style log-mel filterbank (``compute-fbank-feats``) with prebuilt constants.

The front end of CAMPPlus, numerically the same as ``torchaudio.compliance.kaldi.fbank`` with the
settings below (torchaudio's defaults except 80 bins): the mel banks and the Povey window are built
once (the model keeps them as buffers) instead of on every call, and nothing here copies between
host and device, so a call on the GPU only queues kernels. The per-frame log energy that torchaudio
also computes is not part of these features and is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
# Imported here, never first under a meta-device context: the module makes tensors at import time.
from torchaudio.compliance.kaldi import get_mel_banks

from ...constants import S3_SR

_MS_PER_S = 1000.0


@dataclass(frozen=True)
class KaldiFbankConfig:
    sample_rate: int = S3_SR
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    n_mels: int = 80
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: offset from the Nyquist frequency (Kaldi's convention)
    preemphasis: float = 0.97
    povey_exponent: float = 0.85  # Povey window = symmetric Hann ** 0.85
    # Spectrum floor before the log: float32 machine epsilon, as Kaldi.
    log_floor: float = float(torch.finfo(torch.float32).eps)

    @classmethod
    def published(cls) -> "KaldiFbankConfig":
        return cls()

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / _MS_PER_S)

    @property
    def hop_samples(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / _MS_PER_S)

    @property
    def fft_size(self) -> int:
        """The frame is zero-padded to the next power of two before the FFT."""
        return 1 << (self.window_samples - 1).bit_length()

    def n_frames(self, n_samples: int) -> int:
        """Frames of a waveform (snip-edges framing: only frames that fit entirely)."""
        if n_samples < self.window_samples:
            return 0
        return 1 + (n_samples - self.window_samples) // self.hop_samples

    def mel_banks(self) -> torch.Tensor:
        """(n_mels, fft_size // 2 + 1) float32 triangular filters on Kaldi's mel scale; the Nyquist
        column is zero. Built on the host with torchaudio's own construction."""
        no_vtln_low, no_vtln_high, no_warp = 100.0, -500.0, 1.0  # VTLN off (warp factor 1)
        with torch.device("cpu"):
            banks, _ = get_mel_banks(self.n_mels, self.fft_size, float(self.sample_rate), self.low_freq,
                                     self.high_freq, no_vtln_low, no_vtln_high, no_warp)
            return F.pad(banks.to(torch.float32), (0, 1)).contiguous()

    def window(self) -> torch.Tensor:
        """(window_samples,) float32 Povey window, built on the host."""
        with torch.device("cpu"):
            return torch.hann_window(self.window_samples, periodic=False, dtype=torch.float32).pow(self.povey_exponent)


def kaldi_fbank(wav: torch.Tensor, cfg: KaldiFbankConfig | None = None, mel_banks: torch.Tensor | None = None,
                window: torch.Tensor | None = None) -> torch.Tensor:
    """Log-mel fbank of one waveform: (L,) -> (n_frames, n_mels).

    ``mel_banks`` and ``window`` come from ``cfg`` (built per call when not given, which costs a
    host-side construction and, on a GPU, a copy); they are cast to the waveform's device/dtype.
    Steps per frame, in Kaldi's order: remove the DC offset, pre-emphasis (the first sample is
    its own predecessor), Povey window, zero-pad to the FFT size, power spectrum, mel, log with
    a floor.
    """
    cfg = cfg or KaldiFbankConfig.published()
    if wav.dim() != 1:
        raise ValueError(f"kaldi_fbank expects a 1-D waveform (L,), got shape {tuple(wav.shape)}")
    if wav.shape[0] < cfg.window_samples:
        raise ValueError(f"waveform too short for a Kaldi fbank frame: {wav.shape[0]} samples, need at "
                         f"least {cfg.window_samples} ({cfg.frame_length_ms:g} ms at {cfg.sample_rate} Hz)")
    if mel_banks is None:
        mel_banks = cfg.mel_banks()
    if window is None:
        window = cfg.window()
    mel_banks = mel_banks.to(device=wav.device, dtype=wav.dtype)
    window = window.to(device=wav.device, dtype=wav.dtype)
    frames = wav.unfold(0, cfg.window_samples, cfg.hop_samples)  # (T, W) view
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - cfg.preemphasis * previous
    frames = frames * window.unsqueeze(0)
    frames = F.pad(frames, (0, cfg.fft_size - cfg.window_samples))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (T, fft_size // 2 + 1)
    mel = torch.mm(power, mel_banks.T)  # (T, n_mels)
    return mel.clamp_min(cfg.log_floor).log()
