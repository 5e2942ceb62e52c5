"""Turning a reference recording into a voice (``Conditionals``) the way upstream's
``ChatterboxTTS.prepare_conditionals`` does."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .constants import S3_SR, S3GEN_SR
from .audio import load_reference, resample_soxr, trim_silence
from .conditionals import Conditionals
from .models.s3gen.s3gen import S3Gen
from .models.t3.cond import T3Cond
from .models.voice_encoder import DEFAULT_TRIM_TOP_DB, VoiceEncoder, pool_partial_embeds
from .timing import StageTimer
from .nn.transfer import host_to_device


@dataclass(frozen=True)
class VoiceConfig:
    s3gen_sample_rate: int = S3GEN_SR
    tokenizer_sample_rate: int = S3_SR
    # S3Gen sees at most 10 s of reference; T3's speech prompt comes from the first 6 s.
    s3gen_reference_seconds: float = 10.0
    t3_reference_seconds: float = 6.0
    t3_prompt_tokens: int = 150

    @classmethod
    def published(cls) -> "VoiceConfig":
        return cls()


def prepare_conditionals(s3gen: S3Gen, ve: VoiceEncoder, wav_or_path: str | Path | np.ndarray | torch.Tensor,
                         exaggeration: float = 0.5, sample_rate: int | None = None,
                         cfg: VoiceConfig = VoiceConfig(), timer: StageTimer | None = None) -> Conditionals:
    """Reference audio (a file path, or a 1-D/2-D array or tensor with its ``sample_rate``) -> voice.

    The 24 kHz signal is read (and resampled) as librosa does; the 16 kHz copy for T3's prompt
    tokens and the voice encoder is made with soxr, while S3Gen's reference embedding resamples
    with torchaudio's sinc kernel, both as upstream (the two 16 kHz signals differ on purpose).

    Order of work (the results do not depend on it): the host work first (loading, soxr, the
    voice encoder's silence trim), then the 16 kHz audio goes to the device once and serves the
    voice encoder (trimmed) and T3's prompt (first 6 s), then S3Gen's reference (10 s at 24 kHz).
    The voice encoder's LSTM (a long sequential chain on the device) is queued first so that it
    runs while the host is still launching the many short kernels behind it. Copies are
    asynchronous and nothing reads a device value back, so the host never waits for the device.
    ``timer``: optional per-stage timer (``StageTimer`` interface), for profiling.
    """
    timer = timer or StageTimer(enabled=False)
    device = s3gen.device
    with timer.stage("load"):
        ref_24k = load_reference(wav_or_path, sample_rate, cfg.s3gen_sample_rate)  # (L,) float32
    with timer.stage("resample_16k_soxr"):
        ref_16k = resample_soxr(ref_24k, cfg.s3gen_sample_rate, cfg.tokenizer_sample_rate)
    with timer.stage("ve.trim"):
        # the voice encoder's own trimming (as in embeds_from_wavs), on the host copy
        start, end = trim_silence(ref_16k, top_db=DEFAULT_TRIM_TOP_DB)
    with timer.stage("h2d_16k"):
        wav_16k = host_to_device(ref_16k, device, torch.float32)
    with timer.stage("ve.mel"):
        # as ve.embeds_from_wavs([ref_16k], 16 kHz): trim, mel, partial embeddings, averaged
        ve_mel = ve.mel(wav_16k[start:end].to(ve.mel_filters.device))
    with timer.stage("ve.net"):
        partials, counts = ve.partial_mels([ve_mel])
        speaker = pool_partial_embeds(ve(partials), counts).mean(0, keepdim=True)
    with timer.stage("t3.tokenizer"):
        t3_prompt = wav_16k[: int(cfg.t3_reference_seconds * cfg.tokenizer_sample_rate)]
        prompt_tokens, _ = s3gen.tokenizer([t3_prompt], max_len=cfg.t3_prompt_tokens)  # (1, <=150)
    s3gen_ref = s3gen.embed_ref(ref_24k[: int(cfg.s3gen_reference_seconds * cfg.s3gen_sample_rate)],
                                cfg.s3gen_sample_rate, stage=timer.stage)
    with timer.stage("assemble"):
        t3_cond = T3Cond(
            speaker_emb=speaker.to(device),
            cond_prompt_speech_tokens=prompt_tokens,
            emotion_adv=torch.full((1, 1, 1), float(exaggeration), device=device),
        )
        conds = Conditionals(t3_cond, s3gen_ref).with_exaggeration(exaggeration)
    return conds


def synthetic_reference(seconds: float = 4.0, sample_rate: int = S3GEN_SR, seed: int = 0) -> np.ndarray:
    """A deterministic, voice-like test signal (gliding harmonics, syllable-rate envelope, breath noise).

    It stands in for a reference recording where none exists (the built-in voice of the synthetic
    checkpoint, tests); it is not speech.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120.0 + 30.0 * np.sin(2 * np.pi * 0.4 * t) + 10.0 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    wav = envelope * voiced + 0.02 * rng.standard_normal(t.shape)
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)
