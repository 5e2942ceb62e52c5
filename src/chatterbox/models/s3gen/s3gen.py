"""S3Gen: speech tokens -> 24 kHz waveform, plus the reference embedding that conditions it.

Composition of the published S3Gen checkpoint: ``tokenizer`` (S3 tokenizer), ``speaker_encoder``
(CAMPPlus), ``flow`` (token -> mel) and ``mel2wav`` (HiFT vocoder). The submodule names are the
checkpoint's key prefixes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Callable, ContextManager
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ...constants import S3_SR, S3GEN_SR
from ...audio import (S3GenMelConfig, resample_sinc, resample_torchaudio, s3gen_mel_spectrogram,
                      sinc_resample_kernel)
from ...nn.transfer import host_to_device
from ..s3tokenizer import S3Tokenizer, S3TokenizerConfig
from .cfm import CFMConfig
from .flow import FlowConditioning, FlowConfig, S3GenFlow
from .hift import HiFTConfig, HiFTGenerator
from .source import SourceNoise
from .xvector import CAMPPlus, CAMPPlusConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3GenConfig:
    tokenizer: S3TokenizerConfig = field(default_factory=S3TokenizerConfig.published)
    speaker_encoder: CAMPPlusConfig = field(default_factory=CAMPPlusConfig.published)
    flow: FlowConfig = field(default_factory=FlowConfig.published)
    hift: HiFTConfig = field(default_factory=HiFTConfig.published)
    mel: S3GenMelConfig = field(default_factory=S3GenMelConfig.published)
    sample_rate: int = S3GEN_SR
    tokenizer_sample_rate: int = S3_SR
    n_speech_codes: int = 6561
    mel_frames_per_token: int = 2
    samples_per_mel_frame: int = 480
    # The first 20 ms of every rendering are muted and the next 20 ms faded in (a raised cosine):
    # the flow tends to leak the end of the reference prompt into the first frames.
    trim_fade_samples: int = 480
    max_reference_seconds: float = 10.0
    # Length of the CFM start-noise table: frames beyond it cannot be rendered in one call.
    noise_frames: int = 15000

    @classmethod
    def published(cls) -> "S3GenConfig":
        return cls()

    @classmethod
    def published_meanflow(cls) -> "S3GenConfig":
        """``s3gen_meanflow.safetensors`` (Chatterbox-Turbo): the published S3Gen whose flow samples with
        the 2-step meanflow estimator (one extra key, ``flow.decoder.estimator.time_embed_mixer.weight``)."""
        return cls(flow=FlowConfig(cfm=CFMConfig.published_meanflow()))

    @classmethod
    def tiny_meanflow(cls) -> "S3GenConfig":
        """``tiny`` with a meanflow estimator (2 linear steps, no guidance): Turbo's S3Gen in miniature."""
        tiny = cls.tiny()
        cfm = CFMConfig(n_timesteps=2, t_scheduler="linear",
                        estimator=dataclasses.replace(tiny.flow.cfm.estimator, meanflow=True))
        return dataclasses.replace(tiny, flow=dataclasses.replace(tiny.flow, cfm=cfm))

    @classmethod
    def tiny(cls) -> "S3GenConfig":
        """Every part small, the published mel: a pipeline that composes end to end, for fast tests."""
        n_mels = S3GenMelConfig.published().n_mels
        return cls(tokenizer=S3TokenizerConfig.tiny(), speaker_encoder=CAMPPlusConfig.tiny(),
                   flow=FlowConfig.tiny(n_mels), hift=HiFTConfig.tiny(n_mels))


REF_KEYS = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")


@dataclass
class S3GenRef(MutableMapping):
    """Reference conditioning for S3Gen. Reads and writes like upstream's ``ref_dict`` too:
    ``ref["embedding"]``, ``ref["prompt_feat"] = ...``, ``dict(ref)``, with upstream's keys."""

    prompt_token: torch.Tensor  # (1, P) int64 speech tokens of the reference
    prompt_token_len: torch.Tensor  # (1,) int64
    prompt_feat: torch.Tensor  # (1, F, 80) reference mel; F may be 2P or 2P + 1
    embedding: torch.Tensor  # (1, 192) CAMPPlus x-vector
    prompt_feat_len: torch.Tensor | None = None

    # ------------------------------------------------------------ mapping view (upstream's ref_dict)
    def __getitem__(self, key: str):
        if key not in REF_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        if key not in REF_KEYS:
            raise KeyError(f"{key!r} is not an S3Gen reference key; known: {REF_KEYS}")
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("S3Gen reference keys cannot be deleted; assign a new value instead")

    def __iter__(self):
        return iter(REF_KEYS)

    def __len__(self) -> int:
        return len(REF_KEYS)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def to(self, device: torch.device | str) -> "S3GenRef":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.as_dict().items()}
        return S3GenRef.from_dict(moved)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in REF_KEYS}

    @classmethod
    def from_dict(cls, d: Mapping) -> "S3GenRef":
        def tensor(v):
            return torch.from_numpy(v) if isinstance(v, np.ndarray) else v

        missing = [k for k in ("prompt_token", "prompt_token_len", "prompt_feat", "embedding") if k not in d]
        if missing:
            raise ValueError(f"S3Gen reference is missing {missing}")
        return cls(prompt_token=tensor(d["prompt_token"]), prompt_token_len=tensor(d["prompt_token_len"]),
                   prompt_feat=tensor(d["prompt_feat"]), embedding=tensor(d["embedding"]),
                   prompt_feat_len=tensor(d.get("prompt_feat_len")))

    def clone(self) -> "S3GenRef":
        return S3GenRef.from_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.as_dict().items()})


def meanflow_start_noise(frame_noise: torch.Tensor, speech_noise: torch.Tensor) -> torch.Tensor:
    """Upstream's meanflow start noise from its two draws: ``frame_noise`` (1, 80, T) drawn over every
    CFM frame, whose last ``speech_noise.shape[-1]`` frames are replaced by ``speech_noise`` (1, 80, S),
    drawn first, for the new tokens (S = 2 per token). Out of place; (1, 80, T)."""
    split = frame_noise.shape[-1] - speech_noise.shape[-1]
    if split < 0:
        raise ValueError(f"speech noise ({speech_noise.shape[-1]} frames) is longer than the CFM input "
                         f"({frame_noise.shape[-1]} frames)")
    return torch.cat([frame_noise[..., :split], speech_noise.to(frame_noise.dtype)], dim=-1)


def _no_stage(name: str) -> ContextManager:
    return contextlib.nullcontext()


def trim_fade_window(cfg: S3GenConfig, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2n,) = n zeros, then a raised cosine rising from 0 to 1 over n samples."""
    n = cfg.trim_fade_samples
    rise = (torch.cos(torch.linspace(math.pi, 0.0, n, device=device, dtype=dtype)) + 1) / 2
    return torch.cat([torch.zeros(n, device=device, dtype=dtype), rise])


class S3Gen(nn.Module):
    def __init__(self, cfg: S3GenConfig | None = None):
        super().__init__()
        cfg = cfg or S3GenConfig.published()
        self.cfg = cfg
        self.tokenizer = S3Tokenizer(cfg.tokenizer)
        self.speaker_encoder = CAMPPlus(cfg.speaker_encoder)
        self.flow = S3GenFlow(cfg.flow)
        self.mel2wav = HiFTGenerator(cfg.hift)
        # created on the CPU explicitly, so a model built on the meta device still has its value
        self.register_buffer("trim_fade", trim_fade_window(cfg, device="cpu"), persistent=False)
        # Reference front end (embed_ref): the mel filterbank and window, and the 24 -> 16 kHz
        # resampling kernel, built once from the config instead of on every call.
        with torch.device("cpu"):
            self.register_buffer("ref_mel_basis", cfg.mel.mel_basis("cpu"), persistent=False)
            self.register_buffer("ref_mel_window", cfg.mel.window("cpu"), persistent=False)
            kernel, self.ref_resample_width = sinc_resample_kernel(cfg.sample_rate, cfg.tokenizer_sample_rate)
        self.register_buffer("ref_resample_kernel", kernel, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    # ---------------------------------------------------------------- reference
    def embed_ref(self, wav: torch.Tensor | np.ndarray, sample_rate: int,
                  stage: Callable[[str], ContextManager] | None = None) -> S3GenRef:
        """Reference mel, speech tokens and x-vector of a mono recording, as upstream's ``embed_ref``.

        When the mel has F != 2P frames, the tokens are cut to F // 2 and the mel is kept as is.
        A host waveform is copied to the device once, without a synchronisation; from there on
        the call only queues device work. ``stage(name)``: an optional context manager factory
        wrapped around each step (a profiler's per-stage timer).
        """
        stage = stage or _no_stage
        with stage("s3gen.h2d"):
            wav = host_to_device(wav, self.device, torch.float32)
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)  # (1, L)
        if wav.dim() != 2 or wav.shape[0] != 1:
            raise ValueError(f"embed_ref takes one mono waveform (L,) or (1, L), got shape {tuple(wav.shape)}")
        if wav.shape[1] > self.cfg.max_reference_seconds * sample_rate:
            log.warning("S3Gen reference is longer than %.0f s", self.cfg.max_reference_seconds)
        with stage("s3gen.mel"):
            prompt_feat = self.reference_mel(wav, sample_rate)  # (1, F, 80)
        with stage("s3gen.resample_16k"):
            wav_16k = self.resample_to_tokenizer_rate(wav, sample_rate)
        with stage("s3gen.tokenizer"):
            tokens, _ = self.tokenizer(wav_16k)  # (1, P)
        # CAMPPlus last: hundreds of short kernels, so little device work is left once queued
        with stage("campplus.fbank"):
            feats = self.speaker_encoder.features(wav_16k)
        with stage("campplus.net"):
            embedding = self.speaker_encoder(feats)  # (1, 192)
        n_frames = prompt_feat.shape[1]
        if n_frames != self.cfg.mel_frames_per_token * tokens.shape[1]:
            log.debug("reference mel has %d frames for %d tokens: tokens cut to %d",
                      n_frames, tokens.shape[1], n_frames // self.cfg.mel_frames_per_token)
            tokens = tokens[:, : n_frames // self.cfg.mel_frames_per_token]
        token_len = torch.full((1,), tokens.shape[1], dtype=torch.long, device=tokens.device)
        return S3GenRef(prompt_token=tokens, prompt_token_len=token_len, prompt_feat=prompt_feat,
                        embedding=embedding)

    def reference_mel(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """(1, L) waveform on this module's device -> (1, F, n_mels) prompt mel at the output rate."""
        if sample_rate != self.cfg.sample_rate:
            wav = resample_torchaudio(wav, sample_rate, self.cfg.sample_rate)
        mel = s3gen_mel_spectrogram(wav, self.cfg.mel, self.ref_mel_basis.to(wav.dtype),
                                    self.ref_mel_window.to(wav.dtype))
        return mel.transpose(1, 2)

    def resample_to_tokenizer_rate(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """torchaudio's sinc resampling to the tokenizer rate, as upstream's ``embed_ref``; from the
        output rate with the prebuilt kernel."""
        if sample_rate == self.cfg.sample_rate:
            return resample_sinc(wav, self.ref_resample_kernel, self.ref_resample_width, sample_rate,
                                 self.cfg.tokenizer_sample_rate)
        return resample_torchaudio(wav, sample_rate, self.cfg.tokenizer_sample_rate)

    # ---------------------------------------------------------------- rendering
    def draw_cfm_noise(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The CFM start-noise table (1, 80, noise_frames), drawn on the CPU generator, then moved.

        Calls use its first T frames, indexed by absolute frame (prompt frames first); drawing the
        whole table every time keeps a frame's noise independent of the utterance length, so a
        stream that slices the same table renders exactly what a one-shot call renders.
        """
        noise = torch.randn((1, self.cfg.flow.n_mels, self.cfg.noise_frames), generator=generator)
        return host_to_device(noise, self.device)

    def flow_inference(self, speech_tokens: torch.Tensor, ref: S3GenRef, cfm_noise: torch.Tensor | None = None,
                       finalize: bool = True, n_timesteps: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(1, N) or (N,) speech codes -> mel (1, 80, T) of the new tokens only."""
        tokens = self._check_tokens(speech_tokens)
        if cfm_noise is None:
            cfm_noise = self.draw_cfm_noise(generator)
        return self.flow(tokens, ref.prompt_token, ref.prompt_feat, ref.embedding, cfm_noise,
                         finalize=finalize, n_timesteps=n_timesteps)

    def flow_condition(self, speech_tokens: torch.Tensor, ref: S3GenRef, finalize: bool = True) -> FlowConditioning:
        """The CFM conditioning of ``flow_inference`` (encoder run, nothing sampled): for callers that
        decode several requests together (``S3GenFlow.decode_batch``)."""
        tokens = self._check_tokens(speech_tokens)
        return self.flow.prepare(tokens, ref.prompt_token, ref.prompt_feat, ref.embedding, finalize=finalize)

    def hift_inference(self, mel: torch.Tensor, noise: SourceNoise | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mel2wav(mel, noise=noise, generator=generator)

    def apply_trim_fade(self, wav: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The trim fade on ``wav``, whose first sample is sample ``offset`` of the rendering (a
        streamed piece passes how many samples came before it)."""
        fade = self.trim_fade
        if offset >= fade.shape[0] or wav.shape[-1] == 0:
            return wav
        n = min(fade.shape[0] - offset, wav.shape[-1])
        return torch.cat([wav[..., :n] * fade[offset:offset + n].to(wav.dtype), wav[..., n:]], dim=-1)

    def inference(self, speech_tokens: torch.Tensor, ref: S3GenRef, cfm_noise: torch.Tensor | None = None,
                  source_noise: SourceNoise | None = None, generator: torch.Generator | None = None,
                  finalize: bool = True, n_timesteps: int | None = None) -> torch.Tensor:
        """Speech codes -> waveform (1, L) at 24 kHz, L = 480 * mel frames, with the trim fade applied."""
        mel = self.flow_inference(speech_tokens, ref, cfm_noise, finalize, n_timesteps, generator)
        wav, _ = self.hift_inference(mel, source_noise, generator)
        return self.apply_trim_fade(wav)

    def _check_tokens(self, speech_tokens: torch.Tensor) -> torch.Tensor:
        if speech_tokens.dim() == 1:
            speech_tokens = speech_tokens.unsqueeze(0)
        if speech_tokens.dim() != 2 or speech_tokens.shape[0] != 1:
            raise ValueError(f"S3Gen renders one sequence (N,) or (1, N), got shape {tuple(speech_tokens.shape)}")
        if speech_tokens.shape[1] == 0:
            raise ValueError("S3Gen got no speech tokens to render")
        return speech_tokens.to(self.device)
