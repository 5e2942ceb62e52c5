"""S3 speech tokenizer (S3TokenizerV2, "speech_tokenizer_v2_25hz"): 16 kHz audio -> 25 Hz token ids.

Each waveform gets its own log-mel (dynamic-range floor relative to that waveform's peak), the mels are
zero-padded into a batch with lengths, and the encoder + FSQ turn every 4 mel frames into one id in
0..6560. Inputs longer than 30 s are cut into overlapping 30 s windows whose ids are stitched back
together, dropping half of each overlap on both sides of every seam.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..dsp import periodic_hann, slaney_mel_filterbank
from ..nn.transfer import host_to_device
from .s3tokenizer_config import S3_HOP, S3TokenizerConfig
from .s3tokenizer_encoder import FSQuantizer, S3Encoder

log = logging.getLogger(__name__)

# Log-mel compression: log10 with a floor, clamp to a fixed dynamic range below the peak, then affine.
LOG_MEL_FLOOR = 1e-10
LOG_MEL_DYNAMIC_RANGE = 8.0
LOG_MEL_OFFSET = 4.0
LOG_MEL_SCALE = 4.0


def log_mel_spectrogram(wav: torch.Tensor, mel_filters: torch.Tensor, window: torch.Tensor,
                        hop_length: int = S3_HOP) -> torch.Tensor:
    """Tokenizer log-mel of 16 kHz audio: (B, L) -> (B, n_mels, L // hop_length).

    Centred STFT (reflect padding) with the last frame dropped, power spectrum, mel projection,
    log10, then each row is floored at its own peak minus the dynamic range. (The reference floors at
    the peak of the whole tensor it is given; it is only ever given one waveform at a time.)
    """
    if wav.dim() != 2:
        raise ValueError(f"expected wav of shape (B, L), got {tuple(wav.shape)}")
    n_fft = window.shape[0]
    if wav.shape[-1] <= n_fft // 2:
        raise ValueError(f"wav of {wav.shape[-1]} samples is too short: need more than {n_fft // 2}")
    spec = torch.stft(wav, n_fft, hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (B, n_fft // 2 + 1, 1 + L // hop)
    power = spec[..., :-1].abs() ** 2
    mel = mel_filters @ power  # (B, n_mels, T)
    logmel = torch.clamp(mel, min=LOG_MEL_FLOOR).log10()
    peak = logmel.amax(dim=(-2, -1), keepdim=True)
    logmel = torch.maximum(logmel, peak - LOG_MEL_DYNAMIC_RANGE)
    return (logmel + LOG_MEL_OFFSET) / LOG_MEL_SCALE


class S3Tokenizer(nn.Module):
    """16 kHz waveforms -> (ids int64 (B, T), lengths int64 (B,)); keys match ``tokenizer.*`` of S3Gen."""

    def __init__(self, cfg: S3TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Deterministic and rebuilt here, so a checkpoint that omits them still loads; built on the
        # host so that meta-device construction keeps real values for them.
        with torch.device("cpu"):
            filters = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, 0.0, cfg.mel_fmax)
            window = periodic_hann(cfg.n_fft)
        self.register_buffer("_mel_filters", filters)
        self.register_buffer("window", window)
        self.encoder = S3Encoder(cfg)
        self.quantizer = FSQuantizer(cfg)

    # -- input handling -------------------------------------------------------------------------

    def _rows(self, wavs: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Validate the inputs and return one 1-D waveform per batch item, on our device and dtype."""
        if isinstance(wavs, (torch.Tensor, np.ndarray)):
            wavs = torch.as_tensor(wavs)
            if wavs.dim() == 1:
                items = [wavs]
            elif wavs.dim() == 2:
                items = list(wavs.unbind(0))
            else:
                raise ValueError(f"expected a waveform (L,) or a batch (B, L), got shape {tuple(wavs.shape)}")
        elif isinstance(wavs, (list, tuple)):
            items = [torch.as_tensor(w) for w in wavs]
        else:
            raise TypeError(f"expected a tensor or a list of tensors, got {type(wavs).__name__}")
        if not items:
            raise ValueError("no waveforms given")
        ref = self._mel_filters
        rows = []
        for i, wav in enumerate(items):
            if wav.dim() == 2 and wav.shape[0] == 1:
                wav = wav[0]
            if wav.dim() != 1:
                raise ValueError(f"waveform {i}: expected shape (L,) or (1, L), got {tuple(wav.shape)}")
            if not wav.is_floating_point():
                raise TypeError(f"waveform {i}: expected floating-point samples in [-1, 1], got {wav.dtype}")
            if wav.shape[0] <= self.cfg.n_fft // 2:
                raise ValueError(f"waveform {i}: {wav.shape[0]} samples is too short "
                                 f"(need more than {self.cfg.n_fft // 2})")
            rows.append(host_to_device(wav, ref.device, ref.dtype))
        return rows

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, n_mels, L // hop) with this module's filterbank and window."""
        return log_mel_spectrogram(wav, self._mel_filters, self.window, self.cfg.hop_length)

    # -- tokenisation ---------------------------------------------------------------------------

    def forward(self, wavs: Sequence[torch.Tensor] | torch.Tensor,
                max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of 16 kHz float waveforms.

        wavs: a list of (L,) or (1, L) tensors, or one (L,) / (B, L) tensor.
        max_len: keep only the first ``mel_frames_per_token * max_len`` mel frames of each item
        (the mel is cut before the encoder, so the ids are not a prefix of the uncut ones).
        Returns ids (B, T) int64 and their valid lengths (B,) int64.
        """
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        mels = [self.log_mel(wav[None])[0] for wav in self._rows(wavs)]  # each (n_mels, T_i)
        if max_len is not None:
            mels = [mel[:, : self.cfg.mel_frames_per_token * max_len] for mel in mels]
        frames = [mel.shape[-1] for mel in mels]
        if max(frames) > self.cfg.window_frames:
            return self._tokenize_windowed(mels, frames)
        return self._tokenize_padded(mels, frames, max(frames))

    def encode_mels(self, mel: torch.Tensor, mel_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded log-mel batch (B, n_mels, T) + lengths (B,) -> (ids (B, T') int64, lengths (B,) int64)."""
        hidden, lens = self.encoder(mel, mel_lens)
        return self.quantizer(hidden), lens

    def _tokenize_padded(self, mels: list[torch.Tensor], frames: list[int],
                         size: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack([F.pad(mel, (0, size - n)) for mel, n in zip(mels, frames)])  # (B, n_mels, size)
        # Built on the host and copied asynchronously: the lengths are known there.
        lens = host_to_device(torch.tensor(frames, dtype=torch.long), batch.device)
        return self.encode_mels(batch, lens)

    def _tokenize_windowed(self, mels: list[torch.Tensor],
                           frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference long-audio path: every item (short ones too) becomes one or more segments of at
        most ``window_frames``, all padded to that size and encoded as one batch; a long item's
        segments start every ``window_stride_frames`` while the start is inside the item, and are
        stitched by dropping ``seam_drop_tokens`` on both sides of each seam. The result is padded
        with zeros (not with network output)."""
        cfg = self.cfg
        segments: list[torch.Tensor] = []
        seg_frames: list[int] = []
        owners: list[int] = []
        for item, (mel, n) in enumerate(zip(mels, frames)):
            starts = range(0, n, cfg.window_stride_frames) if n > cfg.window_frames else range(1)
            for start in starts:
                piece = mel[:, start: min(start + cfg.window_frames, n)]
                segments.append(piece)
                seg_frames.append(piece.shape[-1])
                owners.append(item)
        log.debug("s3 tokenizer: %d items over %d frames -> %d windowed segments",
                  len(mels), cfg.window_frames, len(segments))
        ids, _ = self._tokenize_padded(segments, seg_frames, cfg.window_frames)  # (S, window tokens)
        seg_tokens = [int(self.encoder.output_lengths(n)) for n in seg_frames]

        pieces: list[list[torch.Tensor]] = [[] for _ in mels]
        for seg, item in enumerate(owners):
            pieces[item].append(ids[seg, : seg_tokens[seg]])
        merged = []
        drop = cfg.seam_drop_tokens
        for item, parts in enumerate(pieces):
            if len(parts) == 1 and frames[item] <= cfg.window_frames:
                merged.append(parts[0])
                continue
            kept = []
            for j, part in enumerate(parts):
                left = 0 if j == 0 else drop
                # As upstream: a final segment shorter than `drop` ids contributes nothing, and the
                # segment before it still loses its last `drop` ids, so such tails are lost.
                right = part.shape[0] if j == len(parts) - 1 else part.shape[0] - drop
                kept.append(part[left:max(left, right)])
            merged.append(torch.cat(kept))
        lengths = [m.shape[0] for m in merged]
        width = max(lengths)
        tokens = torch.stack([F.pad(m, (0, width - m.shape[0])) for m in merged])
        return tokens, host_to_device(torch.tensor(lengths, dtype=torch.long), tokens.device)
