"""``ChatterboxTurboTTS``: Chatterbox-Turbo (GPT-2 medium T3) and Chatterbox-Nano (GPT-2 small), drop-in
for upstream's class, on the same engine as the original model (``engine/turbo.py``): concurrent
requests, exact-state streaming (which upstream does not have for these models), scheduling, serving.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch

from .constants import S3GEN_SR
from .engine import SynthesisRequest, SynthesisResult
from .engine.turbo import TurboEngine
from .loader import Models, resolve_device
from .loader_turbo import download_turbo_checkpoint, load_turbo_models
from .optim.config import OptConfig
from .streaming import StreamingMetrics
from .synthetic import NOT_SPEECH_WARNING
from .tts import ChatterboxTTS
from .voice import synthetic_reference

log = logging.getLogger(__name__)

# Turbo's references must be longer than 5 s; the built-in synthetic voice is made from this much.
SYNTHETIC_REFERENCE_SECONDS = 8.0


class ChatterboxTurboTTS(ChatterboxTTS):
    engine_class = TurboEngine
    family = "turbo"  # "nano" on objects loaded with nano=True

    @classmethod
    def from_local(cls, ckpt_dir: str | Path, device: str | torch.device = "cpu", opt: OptConfig | None = None,
                   nano: bool = False) -> "ChatterboxTurboTTS":
        """``t3_turbo_v1`` (or ``t3_nano_v1`` with ``nano``), ``s3gen_meanflow``, ``ve``, the tokenizer files
        and, when present, ``conds.pt`` from a directory, checked strictly."""
        device = resolve_device(device)
        m = load_turbo_models(Path(ckpt_dir), torch.device("cpu"), nano=nano)
        from .checkpoint import is_synthetic_checkpoint

        conds = m.conds.to(device) if m.conds is not None else None
        tts = cls(m.t3, m.s3gen, m.ve, m.tokenizer, device, conds=conds, opt=opt,
                  synthetic=is_synthetic_checkpoint(Path(ckpt_dir)))
        tts.family = "nano" if nano else "turbo"
        return tts

    @classmethod
    def from_pretrained(cls, device: str | torch.device = "cpu", opt: OptConfig | None = None,
                        nano: bool = False) -> "ChatterboxTurboTTS":
        """Download (or reuse from the Hugging Face cache) ResembleAI/chatterbox-turbo (and chatterbox-nano)."""
        resolve_device(device)
        return cls.from_local(download_turbo_checkpoint(nano=nano), device, opt=opt, nano=nano)

    @classmethod
    def from_synthetic(cls, device: str | torch.device = "cpu", salt: int = 0, opt: OptConfig | None = None,
                       nano: bool = False) -> "ChatterboxTurboTTS":
        """Full-size Turbo (or Nano) models with deterministic synthetic weights, built in memory, and a
        synthetic voice: everything runs as with real weights, but the output is NOT speech."""
        device = resolve_device(device)
        log.warning(NOT_SPEECH_WARNING)
        m = load_turbo_models(None, torch.device("cpu"), nano=nano, salt=salt)
        tts = cls(m.t3, m.s3gen, m.ve, m.tokenizer, device, opt=opt, synthetic=True)
        tts.family = "nano" if nano else "turbo"
        tts.prepare_conditionals(synthetic_reference(seconds=SYNTHETIC_REFERENCE_SECONDS), sample_rate=S3GEN_SR)
        return tts

    @classmethod
    def from_models(cls, models: Models, tokenizer, device: str | torch.device = "cpu",
                    opt: OptConfig | None = None) -> "ChatterboxTurboTTS":
        return cls(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt)

    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.0, sample_rate: int | None = None,
                             norm_loudness: bool = True):
        """The voice from a reference recording longer than 5 s (loudness-normalised to -27 LUFS unless
        ``norm_loudness`` is off); it becomes the model's current voice."""
        conds = self.engine.prepare_conditionals(wav_fpath, exaggeration, sample_rate, norm_loudness=norm_loudness)
        self.conds = conds
        return conds

    def _request(self, text: str, **kw) -> SynthesisRequest:
        del kw["cfg_weight"], kw["min_p"]  # accepted for upstream's signature; Turbo uses neither
        return SynthesisRequest(text, **kw)

    def synthesize(self, text: str, repetition_penalty: float = 1.2, min_p: float = 0.0, top_p: float = 0.95,
                   audio_prompt_path=None, exaggeration: float = 0.0, cfg_weight: float = 0.0,
                   temperature: float = 0.8, top_k: int = 1000, max_new_tokens: int = 1000, seed: int | None = None,
                   watermark: bool | None = None, timer=None) -> SynthesisResult:
        request = self._request(text, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature, top_k=top_k,
                                max_new_tokens=max_new_tokens, seed=seed, watermark=watermark)
        engine = self.engine
        return engine.synthesize(request, self._voice(engine, audio_prompt_path, exaggeration), timer=timer)

    def generate(self, text: str, repetition_penalty: float = 1.2, min_p: float = 0.0, top_p: float = 0.95,
                 audio_prompt_path=None, exaggeration: float = 0.0, cfg_weight: float = 0.0, temperature: float = 0.8,
                 top_k: int = 1000, norm_loudness: bool = True, max_new_tokens: int = 1000, seed: int | None = None,
                 watermark: bool | None = None) -> torch.Tensor:
        """Speak ``text`` (paralinguistic tags such as ``[laugh]`` included); returns a (1, samples)
        float32 CPU tensor at ``self.sr``. ``norm_loudness`` applies to ``audio_prompt_path``."""
        if audio_prompt_path is not None:
            self.prepare_conditionals(audio_prompt_path, exaggeration, norm_loudness=norm_loudness)
        return self.synthesize(text, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                               exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature, top_k=top_k,
                               max_new_tokens=max_new_tokens, seed=seed, watermark=watermark).wav

    def generate_stream(self, text: str, audio_prompt_path=None, exaggeration: float = 0.0, cfg_weight: float = 0.0,
                        temperature: float = 0.8, repetition_penalty: float = 1.2, min_p: float = 0.0,
                        top_p: float = 0.95, top_k: int = 1000, chunk_size: int | list[int] = 25,
                        context_window: int = 50, fade_duration: float = 0.02, print_metrics: bool = True,
                        max_new_tokens: int = 1000, seed: int | None = None, watermark: bool | None = None,
                        lookahead_tokens: int = 3, norm_loudness: bool = True,
                        ) -> Iterator[tuple[torch.Tensor, StreamingMetrics]]:
        """``ChatterboxTTS.generate_stream`` for Turbo: exact-state streaming of the 2-step meanflow flow
        and the vocoder; the last chunk of a segment carries Turbo's trailing silence codes."""
        del fade_duration
        if audio_prompt_path is not None:
            self.prepare_conditionals(audio_prompt_path, exaggeration, norm_loudness=norm_loudness)
        request = self._request(text, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature, top_k=top_k,
                                max_new_tokens=max_new_tokens, seed=seed, watermark=watermark,
                                chunk_size=tuple(chunk_size) if isinstance(chunk_size, list) else chunk_size,
                                context_window=context_window, lookahead_tokens=lookahead_tokens)
        engine = self.engine
        return engine.session(request, self._voice(engine, None, exaggeration)).stream(log_metrics=print_metrics)
