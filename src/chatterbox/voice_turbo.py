"""A voice for Chatterbox-Turbo/Nano: upstream's ``ChatterboxTurboTTS.prepare_conditionals``.

Differences from the original model's (``voice.py``, whose front end this reuses): the reference
must be longer than 5 s; it is loudness-normalised to -27 LUFS at 24 kHz before anything is derived
from it (the 16 kHz copy included); T3's speech prompt comes from the first 15 s, up to 375 tokens.
S3Gen still sees the first 10 s, and the voice encoder the whole 16 kHz signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import ReferenceAudioError, load_reference
from .conditionals import Conditionals
from .constants import S3_SR, S3GEN_SR
from .loudness import normalize_loudness
from .models.s3gen.s3gen import S3Gen
from .models.voice_encoder import VoiceEncoder
from .timing import StageTimer
from .voice import VoiceConfig, prepare_conditionals


@dataclass(frozen=True)
class TurboVoiceConfig:
    s3gen_sample_rate: int = S3GEN_SR
    tokenizer_sample_rate: int = S3_SR
    min_reference_seconds: float = 5.0  # strictly longer than this
    target_lufs: float = -27.0
    s3gen_reference_seconds: float = 10.0
    t3_reference_seconds: float = 15.0
    t3_prompt_tokens: int = 375

    @classmethod
    def published(cls) -> "TurboVoiceConfig":
        return cls()

    def front_end(self) -> VoiceConfig:
        """The shared front end's settings (``voice.prepare_conditionals``)."""
        return VoiceConfig(s3gen_sample_rate=self.s3gen_sample_rate, tokenizer_sample_rate=self.tokenizer_sample_rate,
                           s3gen_reference_seconds=self.s3gen_reference_seconds,
                           t3_reference_seconds=self.t3_reference_seconds, t3_prompt_tokens=self.t3_prompt_tokens)


def prepare_turbo_conditionals(s3gen: S3Gen, ve: VoiceEncoder,
                               wav_or_path: str | Path | np.ndarray | torch.Tensor, exaggeration: float = 0.5,
                               sample_rate: int | None = None, norm_loudness: bool = True,
                               cfg: TurboVoiceConfig = TurboVoiceConfig(),
                               timer: StageTimer | None = None) -> Conditionals:
    """Reference audio (a file path, or an array or tensor with its ``sample_rate``) -> Turbo voice.

    ``exaggeration`` is stored as upstream stores it; Turbo's T3 does not read it. Raises
    ``ReferenceAudioError`` for a reference of 5 s or less.
    """
    timer = timer or StageTimer(enabled=False)
    with timer.stage("load"):
        ref_24k = load_reference(wav_or_path, sample_rate, cfg.s3gen_sample_rate)  # (L,) float32
    seconds = ref_24k.shape[0] / cfg.s3gen_sample_rate
    if not seconds > cfg.min_reference_seconds:
        raise ReferenceAudioError(f"the reference must be longer than {cfg.min_reference_seconds:g} s for "
                                  f"Chatterbox-Turbo, got {seconds:.2f} s")
    if norm_loudness:
        with timer.stage("loudness"):
            ref_24k = normalize_loudness(ref_24k, cfg.s3gen_sample_rate, cfg.target_lufs)
    return prepare_conditionals(s3gen, ve, ref_24k, exaggeration=exaggeration, sample_rate=cfg.s3gen_sample_rate,
                                cfg=cfg.front_end(), timer=timer)
