"""Audio front ends: S3Gen and voice-encoder mels, silence trimming, resampling, reference loading.

Everything here mirrors what upstream feeds its models (numbers in ARCHITECTURE_FACTS §1-2). The
torch extractors build their filterbank and window from the config on every call (a few hundred
microseconds, and on a GPU a synchronising copy) unless the caller passes them in; the models keep
them as buffers built at construction, and nothing is cached at module level.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .constants import S3_SR, S3GEN_SR
from .dsp import periodic_hann, slaney_mel_filterbank

log = logging.getLogger(__name__)


# The S3Gen mel floors the magnitude under the square root and the mel before the log.
_S3GEN_MAG_EPS = 1e-9
_S3GEN_LOG_FLOOR = 1e-5

# librosa.effects.trim defaults that the voice encoder relies on.
TRIM_FRAME_LENGTH = 2048
TRIM_HOP_LENGTH = 512

# Reference-audio sanity limits.
MIN_REFERENCE_SECONDS = 0.5
SILENCE_PEAK = 1e-4
MAX_CHANNELS = 8
_INT_FULL_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}

AudioLike = Union[np.ndarray, torch.Tensor]
PathLike = Union[str, os.PathLike]


class ReferenceAudioError(ValueError):
    """The reference audio cannot be used for voice cloning (the message says why)."""


# ----------------------------------------------------------------------------------------------
# S3Gen mel (24 kHz, natural-log magnitude mel), the flow's prompt features.


@dataclass(frozen=True)
class S3GenMelConfig:
    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    n_mels: int
    fmin: float
    fmax: float

    @classmethod
    def published(cls) -> "S3GenMelConfig":
        return cls(sample_rate=S3GEN_SR, n_fft=1920, hop_length=480, win_length=1920, n_mels=80,
                   fmin=0.0, fmax=8000.0)

    @property
    def side_pad(self) -> int:
        # Matcha-style framing: reflect pad (n_fft - hop)/2 per side, then an uncentred STFT,
        # so a signal of L samples gives L // hop frames.
        return (self.n_fft - self.hop_length) // 2

    def mel_basis(self, device: torch.device | str | None = None) -> torch.Tensor:
        return slaney_mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax).to(device)

    def window(self, device: torch.device | str | None = None) -> torch.Tensor:
        return periodic_hann(self.win_length).to(device)


def s3gen_mel_spectrogram(
    wav: torch.Tensor,
    cfg: S3GenMelConfig | None = None,
    mel_basis: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-magnitude mel of a 24 kHz waveform: (B, L) or (L,) -> (B, n_mels, L // hop)."""
    cfg = cfg or S3GenMelConfig.published()
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"s3gen_mel_spectrogram expects (B, L) or (L,), got shape {tuple(wav.shape)}")
    if wav.shape[-1] <= cfg.side_pad:
        raise ValueError(f"waveform of {wav.shape[-1]} samples is too short for the S3Gen mel "
                         f"(needs more than {cfg.side_pad})")
    if mel_basis is None:
        mel_basis = cfg.mel_basis(wav.device).to(wav.dtype)
    if window is None:
        window = cfg.window(wav.device).to(wav.dtype)
    padded = F.pad(wav.unsqueeze(1), (cfg.side_pad, cfg.side_pad), mode="reflect").squeeze(1)  # (B, L + 2p)
    spec = torch.stft(padded, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=window, center=False, normalized=False, onesided=True,
                      return_complex=True)  # (B, F, T)
    ri = torch.view_as_real(spec)
    magnitude = torch.sqrt(ri.pow(2).sum(-1) + _S3GEN_MAG_EPS)  # (B, F, T)
    mel = torch.matmul(mel_basis, magnitude)  # (B, n_mels, T)
    return torch.log(torch.clamp(mel, min=_S3GEN_LOG_FLOOR))


# ----------------------------------------------------------------------------------------------
# Voice-encoder mel (16 kHz, power mel without log).


@dataclass(frozen=True)
class VEMelConfig:
    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    n_mels: int
    fmin: float
    fmax: float
    power: float

    @classmethod
    def published(cls) -> "VEMelConfig":
        return cls(sample_rate=S3_SR, n_fft=400, hop_length=160, win_length=400, n_mels=40,
                   fmin=0.0, fmax=8000.0, power=2.0)

    def mel_basis(self, device: torch.device | str | None = None) -> torch.Tensor:
        return slaney_mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax).to(device)

    def window(self, device: torch.device | str | None = None) -> torch.Tensor:
        return periodic_hann(self.win_length).to(device)


def _as_float_tensor(wav: AudioLike) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(wav)) if isinstance(wav, np.ndarray) else wav
    return t if t.is_floating_point() else t.float()


def ve_mel_spectrogram(
    wav: AudioLike,
    cfg: VEMelConfig | None = None,
    mel_basis: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Power mel of a 16 kHz mono waveform, (L,) -> (n_mels, 1 + L // hop), float32 like librosa's.

    ``mel_basis`` / ``window`` (built from ``cfg`` when not given) must already be on the
    waveform's device; the voice encoder keeps them as buffers.
    """
    cfg = cfg or VEMelConfig.published()
    x = _as_float_tensor(wav)
    if x.dim() != 1:
        raise ValueError(f"ve_mel_spectrogram expects a 1-D waveform, got shape {tuple(x.shape)}")
    if x.shape[0] <= cfg.n_fft // 2:
        # librosa's centred STFT reflect-pads n_fft // 2, which needs more samples than that.
        raise ValueError(f"waveform of {x.shape[0]} samples is too short for the voice-encoder mel "
                         f"(needs more than {cfg.n_fft // 2})")
    if mel_basis is None:
        mel_basis = cfg.mel_basis(x.device)
    window = periodic_hann(cfg.win_length, dtype=x.dtype).to(x.device) if window is None else window.to(x.dtype)
    spec = torch.stft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
                      center=True, pad_mode="reflect", normalized=False, onesided=True,
                      return_complex=True)  # (F, T)
    power = spec.abs().float().pow(cfg.power)
    return torch.matmul(mel_basis.float(), power)  # (n_mels, T)


# ----------------------------------------------------------------------------------------------
# Trimming and resampling.


def _to_numpy_1d(wav: AudioLike) -> np.ndarray:
    arr = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {arr.shape}")
    return arr


def trim_silence(wav: AudioLike, top_db: float = 20.0) -> tuple[int, int]:
    """[start, end) of the non-silent part, equal to ``librosa.effects.trim(wav, top_db)[1]``.

    Frames of ``TRIM_FRAME_LENGTH`` (zero-padded, centred) every ``TRIM_HOP_LENGTH`` samples; a frame
    is silent when its mean power is more than ``top_db`` below the loudest frame's. Written with the
    same numpy reductions librosa uses (frames along axis 0), so the threshold decisions agree.
    """
    y = _to_numpy_1d(wav)
    half = TRIM_FRAME_LENGTH // 2
    padded = np.pad(y, (half, half), mode="constant")
    if padded.shape[0] < TRIM_FRAME_LENGTH:
        return 0, 0
    frames = np.lib.stride_tricks.sliding_window_view(padded, TRIM_FRAME_LENGTH)[::TRIM_HOP_LENGTH].T
    power = np.mean(np.abs(frames) ** 2, axis=0)  # (n_frames,)
    mse = np.sqrt(power) ** 2
    floor = 1e-10
    db = 10.0 * np.log10(np.maximum(floor, mse)) - 10.0 * np.log10(np.maximum(floor, mse.max()))
    loud = np.flatnonzero(db > -top_db)
    if loud.size == 0:
        return 0, 0
    return int(loud[0] * TRIM_HOP_LENGTH), int(min(y.shape[-1], (loud[-1] + 1) * TRIM_HOP_LENGTH))


def resample_torchaudio(wav: torch.Tensor, src_sr: int, dst_sr: int) -> torch.Tensor:
    """torchaudio's default windowed-sinc resampler, as ``S3Gen.embed_ref`` applies it.

    A fresh ``transforms.Resample`` is built per call: it derives its kernel in float64 and rounds
    it to float32 once, which the functional form does not, and that rounding is what upstream's
    numbers carry.
    """
    import torchaudio

    if src_sr == dst_sr:
        return wav
    resampler = torchaudio.transforms.Resample(int(src_sr), int(dst_sr)).to(device=wav.device, dtype=wav.dtype)
    return resampler(wav)


def sinc_resample_kernel(src_sr: int, dst_sr: int) -> tuple[torch.Tensor, int]:
    """(kernel, width) of torchaudio's default ``transforms.Resample(src_sr, dst_sr)``, built on the host.

    The kernel is (dst / g, 1, 2 * width + src / g) float32 with g = gcd(src, dst), derived in
    float64 and rounded once, exactly as the transform caches it; a module keeps it as a buffer
    and applies it with ``resample_sinc``.
    """
    with torch.device("cpu"):  # also around the import: torchaudio makes tensors when first imported
        import torchaudio

        transform = torchaudio.transforms.Resample(int(src_sr), int(dst_sr))
    return transform.kernel.detach().clone(), int(transform.width)


def resample_sinc(wav: torch.Tensor, kernel: torch.Tensor, width: int, src_sr: int, dst_sr: int) -> torch.Tensor:
    """Apply a ``sinc_resample_kernel``: (..., L) -> (..., ceil(L * dst / src)).

    The same zero padding, strided convolution and interleaving of the output phases as
    torchaudio's resampler, so the result equals ``resample_torchaudio`` (bit for bit on the CPU).
    """
    g = math.gcd(int(src_sr), int(dst_sr))
    src_step, dst_step = int(src_sr) // g, int(dst_sr) // g
    if kernel.shape[0] != dst_step or kernel.shape[-1] != 2 * width + src_step:
        raise ValueError(f"kernel of shape {tuple(kernel.shape)} (width {width}) is not a "
                         f"{src_sr} -> {dst_sr} Hz kernel")
    lead = wav.shape[:-1]
    rows = wav.reshape(-1, wav.shape[-1])
    length = rows.shape[-1]
    padded = F.pad(rows, (width, width + src_step))
    phases = F.conv1d(padded[:, None], kernel.to(device=rows.device, dtype=rows.dtype), stride=src_step)
    out = phases.transpose(1, 2).reshape(rows.shape[0], -1)  # (B, frames * dst_step), phases interleaved
    out_len = -(-dst_step * length // src_step)
    return out[:, :out_len].reshape(*lead, out_len)


def resample_soxr(wav: np.ndarray, src_sr: int, dst_sr: int) -> np.ndarray:
    """soxr's high-quality resampler, as ``librosa.resample`` (default soxr_hq) applies it in
    ``prepare_conditionals`` and ``librosa.load``: output length ceil(L * dst / src)."""
    import soxr

    if src_sr == dst_sr:
        return wav
    y = np.asarray(wav)
    out = soxr.resample(y, int(src_sr), int(dst_sr), quality="soxr_hq")
    n_out = int(np.ceil(y.shape[-1] * float(dst_sr) / float(src_sr)))
    if out.shape[-1] < n_out:
        out = np.pad(out, (0, n_out - out.shape[-1]))
    return np.ascontiguousarray(out[:n_out], dtype=y.dtype)


# ----------------------------------------------------------------------------------------------
# Reference loading.


def _read_reference_file(path: Path, target_sr: int) -> np.ndarray:
    """Read like ``librosa.load(path, sr=target_sr, mono=True)``: float samples, channel mean, soxr_hq."""
    if not path.exists():
        raise ReferenceAudioError(f"reference audio file not found: {path}")
    if not path.is_file():
        raise ReferenceAudioError(f"reference audio path is not a file: {path}")
    import soundfile as sf

    try:
        data, native_sr = sf.read(str(path), dtype="float32", always_2d=True)  # (L, C)
        wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    except Exception:
        # formats libsndfile cannot read (e.g. some compressed ones): librosa's audioread fallback
        try:
            import librosa

            wav, native_sr = librosa.load(str(path), sr=None, mono=True)
        except Exception as exc:  # soundfile/audioread raise a zoo of types for bad files
            raise ReferenceAudioError(f"cannot read reference audio file {path}: {type(exc).__name__}: {exc}") from exc
    return resample_soxr(np.ascontiguousarray(wav, dtype=np.float32), int(native_sr), target_sr)


def _to_float_samples(arr: np.ndarray) -> np.ndarray:
    if arr.dtype in _INT_FULL_SCALE:
        return arr.astype(np.float32) / np.float32(_INT_FULL_SCALE[arr.dtype])
    if not np.issubdtype(arr.dtype, np.floating):
        raise ReferenceAudioError(f"reference audio has unsupported sample type {arr.dtype} "
                                  "(use float samples in [-1, 1], int16 or int32)")
    return arr.astype(np.float32, copy=False)


def _downmix(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 1:
        return arr
    if arr.ndim != 2:
        raise ReferenceAudioError(f"reference audio must be 1-D (L,) or 2-D (C, L) / (L, C), got shape {arr.shape}")
    rows, cols = arr.shape
    if rows <= MAX_CHANNELS and rows <= cols:
        channel_axis = 0
    elif cols <= MAX_CHANNELS:
        channel_axis = 1
    else:
        raise ReferenceAudioError(f"reference audio of shape {arr.shape} has no channel axis of at most "
                                  f"{MAX_CHANNELS} channels")
    n_channels = arr.shape[channel_axis]
    if n_channels > 1:
        log.warning("reference audio has %d channels; downmixing to mono", n_channels)
    return arr.mean(axis=channel_axis, dtype=np.float32)


def load_reference(
    wav_or_path: PathLike | AudioLike,
    sample_rate: int | None,
    target_sr: int,
    min_seconds: float = MIN_REFERENCE_SECONDS,
) -> np.ndarray:
    """A validated mono float32 reference waveform at ``target_sr``.

    A path is read with ``librosa.load(sr=target_sr)`` as upstream does (``sample_rate`` is then
    ignored). An array or tensor needs its ``sample_rate``; (C, L) and (L, C) layouts with at most
    8 channels are downmixed by averaging, and int16/int32 samples are scaled to [-1, 1).
    Raises ``ReferenceAudioError`` (a ValueError) naming the problem.
    """
    if int(target_sr) != target_sr or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive integer, got {target_sr!r}")
    if isinstance(wav_or_path, (str, os.PathLike)):
        wav = _read_reference_file(Path(wav_or_path), int(target_sr))
        src_sr = int(target_sr)
        what = f"reference audio {os.fspath(wav_or_path)}"
    else:
        if sample_rate is None:
            raise ReferenceAudioError("reference audio given as an array needs its sample_rate")
        if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ReferenceAudioError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if isinstance(wav_or_path, torch.Tensor):
            t = wav_or_path.detach()
            # numpy has no bfloat16; half precision is widened before leaving torch.
            arr = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy()
        elif isinstance(wav_or_path, np.ndarray):
            arr = wav_or_path
        else:
            raise ReferenceAudioError(f"reference audio must be a path, numpy array or torch tensor, "
                                      f"got {type(wav_or_path).__name__}")
        wav = _downmix(_to_float_samples(arr))
        src_sr = int(sample_rate)
        what = "reference audio"
    if wav.size == 0:
        raise ReferenceAudioError(f"{what} is empty")
    if not np.isfinite(wav).all():
        raise ReferenceAudioError(f"{what} contains NaN or Inf samples")
    peak = float(np.abs(wav).max())
    if peak == 0.0:
        raise ReferenceAudioError(f"{what} is all zeros")
    if peak < SILENCE_PEAK:
        raise ReferenceAudioError(f"{what} is silent (peak {peak:.2e} < {SILENCE_PEAK:.0e})")
    seconds = wav.shape[0] / src_sr
    if seconds < min_seconds:
        raise ReferenceAudioError(f"{what} is too short: {seconds:.3f} s (need at least {min_seconds} s)")
    wav = resample_soxr(wav, src_sr, int(target_sr))
    return np.ascontiguousarray(wav, dtype=np.float32)
