"""Voice encoder: a 3-layer LSTM speaker embedder over 160-frame power-mel partials (T3's speaker_emb).

An utterance is trimmed, turned into a (T, 40) mel, cut into overlapping 160-frame partials
(step 77 frames at the default rate 1.3), each partial is embedded and L2-normalised, and the
partial embeddings are averaged and normalised again (ARCHITECTURE_FACTS §3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dtype import as_float32, cast_floating
from ..audio import VEMelConfig, resample_soxr, trim_silence, ve_mel_spectrogram
from ..nn.transfer import host_to_device

# Fixed initial values of the (unused at inference) cosine-similarity scaling parameters.
_SIMILARITY_WEIGHT_INIT = 10.0
_SIMILARITY_BIAS_INIT = -5.0
# Upstream call defaults: trim 20 dB below peak, 1.3 partials per second, keep a last partial
# that is at least 80 % real frames.
DEFAULT_TRIM_TOP_DB = 20.0
DEFAULT_PARTIAL_RATE = 1.3
DEFAULT_MIN_COVERAGE = 0.8
# Guards the L2 normalisation against an all-zero ReLU output (upstream would produce NaN there).
_NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class VoiceEncoderConfig:
    n_mels: int
    hidden_size: int
    num_layers: int
    embed_size: int
    partial_frames: int
    final_relu: bool
    mel: VEMelConfig = field(default_factory=VEMelConfig.published)

    @classmethod
    def published(cls) -> "VoiceEncoderConfig":
        return cls(n_mels=40, hidden_size=256, num_layers=3, embed_size=256, partial_frames=160,
                   final_relu=True)

    @classmethod
    def tiny(cls) -> "VoiceEncoderConfig":
        """Same front end and partials, a small network: for fast shape tests."""
        return cls(n_mels=40, hidden_size=16, num_layers=2, embed_size=8, partial_frames=160,
                   final_relu=True)

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate

    def frame_step(self, rate: float) -> int:
        """Frames between partial starts for ``rate`` partials per second (77 at 1.3)."""
        # Upstream divides samples-per-partial-period by the partial length (not by the hop);
        # both are 160 in the published model, and this keeps its rounding for other configs.
        step = int(np.round((self.sample_rate / rate) / self.partial_frames))
        if not 0 < step <= self.partial_frames:
            raise ValueError(f"rate {rate} gives a partial step of {step} frames; "
                             f"it must lie in 1..{self.partial_frames}")
        return step


def partial_layout(n_frames: int, step: int, partial_frames: int, min_coverage: float) -> tuple[int, int]:
    """(number of partials, mel length they span) for a mel of ``n_frames`` frames.

    The last window is kept when at least ``min_coverage`` of it would hold real frames; the mel is
    then zero-padded or truncated to the returned length.
    """
    if n_frames <= 0:
        raise ValueError("cannot cut partials from an empty mel")
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must lie in (0, 1], got {min_coverage}")
    n_wins, remainder = divmod(max(n_frames - partial_frames + step, 0), step)
    if n_wins == 0 or (remainder + (partial_frames - step)) / partial_frames >= min_coverage:
        n_wins += 1
    return n_wins, partial_frames + step * (n_wins - 1)


def cut_partials(mel: torch.Tensor, step: int, partial_frames: int, min_coverage: float) -> torch.Tensor:
    """(T, M) mel -> (N, partial_frames, M) overlapping windows, ``step`` frames apart."""
    n_partials, target = partial_layout(mel.shape[0], step, partial_frames, min_coverage)
    if target > mel.shape[0]:
        mel = F.pad(mel, (0, 0, 0, target - mel.shape[0]))
    else:
        mel = mel[:target]
    return mel.unfold(0, partial_frames, step)[:n_partials].transpose(1, 2)  # (N, P, M)


def pool_partial_embeds(embeds: torch.Tensor, counts: list[int], as_spk: bool = False) -> torch.Tensor:
    """Partial embeddings (sum N_i, E) -> (N, E) utterance embeddings, or one (E,) speaker embedding."""
    utt = torch.stack([chunk.mean(dim=0) for chunk in torch.split(embeds, counts, dim=0)])  # (N, E)
    utt = utt / torch.linalg.norm(utt, dim=1, keepdim=True).clamp_min(_NORM_FLOOR)
    if not as_spk:
        return utt
    spk = utt.mean(dim=0)
    return spk / torch.linalg.norm(spk).clamp_min(_NORM_FLOOR)


class VoiceEncoder(nn.Module):
    def __init__(self, cfg: VoiceEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.n_mels, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.embed_size)
        self.similarity_weight = nn.Parameter(torch.tensor([_SIMILARITY_WEIGHT_INIT]))
        self.similarity_bias = nn.Parameter(torch.tensor([_SIMILARITY_BIAS_INIT]))
        # Mel front-end constants, built once on the host (also under a meta-device construction)
        # and moved with the module; not checkpoint entries. The mel is computed in float32 even
        # if a dtype pass lowers these with the weights.
        with torch.device("cpu"):
            self.register_buffer("mel_filters", cfg.mel.mel_basis("cpu"), persistent=False)
            self.register_buffer("mel_window", cfg.mel.window("cpu"), persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        # After a move, cuDNN wants the LSTM weights in one buffer again; otherwise it compacts
        # them on every call. A no-op off CUDA; the values are unchanged.
        self.lstm.flatten_parameters()
        return out

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) partial mels -> (B, embed_size) L2-normalised embeddings."""
        _, (hidden, _) = self.lstm(cast_floating(mels, self.proj.weight.dtype))  # hidden: (layers, B, H)
        raw = self.proj(hidden[-1])
        if self.cfg.final_relu:
            raw = F.relu(raw)
        return as_float32(raw / torch.linalg.norm(raw, dim=1, keepdim=True).clamp_min(_NORM_FLOOR))

    def _device(self) -> torch.device:
        return self.proj.weight.device

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(L,) 16 kHz waveform (already trimmed) -> (T, n_mels) power mel, on the waveform's device."""
        return ve_mel_spectrogram(wav, self.cfg.mel, self.mel_filters.float(), self.mel_window.float()).transpose(0, 1)

    def mels_from_wavs(
        self, wavs: Sequence[np.ndarray | torch.Tensor], sample_rate: int,
        trim_top_db: float | None = DEFAULT_TRIM_TOP_DB,
    ) -> list[torch.Tensor]:
        """One (T_i, n_mels) mel per waveform: resampled to 16 kHz, silence-trimmed, on this module's device.

        Resampling and trimming run on the host (numpy, as upstream); each trimmed waveform is then
        copied to the device once, without a synchronisation. A device tensor with trimming on is
        read back to the host first.
        """
        mel_cfg = self.cfg.mel
        device = self._device()
        mels = []
        for wav in wavs:
            if isinstance(wav, torch.Tensor) and wav.device == device and not trim_top_db \
                    and sample_rate == mel_cfg.sample_rate:
                mels.append(self.mel(wav.float()))  # nothing to do on the host
                continue
            arr = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
            arr = arr.astype(np.float32, copy=False)
            if sample_rate != mel_cfg.sample_rate:
                # Upstream uses librosa's kaiser_fast here (it needs resampy); the pipeline always
                # passes 16 kHz audio, so the default soxr resampler stands in.
                arr = resample_soxr(arr, sample_rate, mel_cfg.sample_rate)
            if trim_top_db:
                start, end = trim_silence(arr, top_db=trim_top_db)
                arr = arr[start:end]
            mels.append(self.mel(host_to_device(arr, device, torch.float32)))  # (T, M)
        return mels

    def partial_mels(
        self, mels: Sequence[torch.Tensor], rate: float = DEFAULT_PARTIAL_RATE,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> tuple[torch.Tensor, list[int]]:
        """Every partial of every mel as one batch for ``forward``: ((sum N_i, partial_frames, n_mels), [N_i])."""
        cfg = self.cfg
        if len(mels) == 0:
            raise ValueError("need at least one mel")
        step = cfg.frame_step(rate)
        partials = [cut_partials(m, step, cfg.partial_frames, min_coverage) for m in mels]
        return torch.cat(partials, dim=0), [p.shape[0] for p in partials]

    def partial_embeds(
        self, mels: Sequence[torch.Tensor], rate: float = DEFAULT_PARTIAL_RATE,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> tuple[torch.Tensor, list[int]]:
        """Embeddings of every partial of every mel, run as one LSTM batch: ((sum N_i, E), [N_i])."""
        partials, counts = self.partial_mels(mels, rate, min_coverage)
        return self(partials), counts

    def embeds_from_mels(
        self,
        mels: Sequence[torch.Tensor],
        as_spk: bool = False,
        rate: float = DEFAULT_PARTIAL_RATE,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> torch.Tensor:
        """(N, E) utterance embeddings, or one (E,) speaker embedding when ``as_spk``."""
        embeds, counts = self.partial_embeds(mels, rate, min_coverage)
        return pool_partial_embeds(embeds, counts, as_spk)

    def embeds_from_wavs(
        self,
        wavs: Sequence[np.ndarray | torch.Tensor],
        sample_rate: int,
        as_spk: bool = False,
        trim_top_db: float | None = DEFAULT_TRIM_TOP_DB,
        rate: float = DEFAULT_PARTIAL_RATE,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> torch.Tensor:
        """Upstream ``embeds_from_wavs``: (N, E) per-waveform embeddings, or (E,) when ``as_spk``.

        ``rate`` is partials per second (1.3 gives a 77-frame step); ``trim_top_db=None`` skips trimming.
        """
        if isinstance(wavs, (np.ndarray, torch.Tensor)):
            raise TypeError("embeds_from_wavs takes a list of waveforms, not a single array")
        mels = self.mels_from_wavs(wavs, sample_rate, trim_top_db)
        return self.embeds_from_mels(mels, as_spk=as_spk, rate=rate, min_coverage=min_coverage)
