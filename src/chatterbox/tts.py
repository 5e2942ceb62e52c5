"""The public text-to-speech API: ``ChatterboxTTS``, a drop-in for upstream's class and a thin facade
over the engine (``chatterbox.engine``): it keeps the float32 weights and the current voice, and
builds an ``Engine`` for its ``OptConfig``; every call becomes a ``SynthesisRequest`` run in a session
of its own, so one loaded model serves many threads at once."""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import CONDS_FILE, TOKENIZER_FILE, is_synthetic_checkpoint
from .conditionals import Conditionals
from .constants import S3_SR, S3GEN_SR
from .engine import Engine, EngineConfig, SynthesisRequest, SynthesisResult
from .loader import Models, download_checkpoint, load_models_from_dir, load_synthetic_models, resolve_device
from .models.s3gen.s3gen import S3Gen
from .models.t3.t3 import T3
from .models.voice_encoder import VoiceEncoder
from .optim.config import OptConfig
from .streaming import StreamingMetrics
from .synthetic import NOT_SPEECH_WARNING
from .text import EnTokenizer, TextSplitConfig
from .voice import synthetic_reference

log = logging.getLogger(__name__)

__all__ = ["ChatterboxTTS", "SynthesisResult"]


class ChatterboxTTS:
    ENC_COND_LEN = 6 * S3_SR
    DEC_COND_LEN = 10 * S3GEN_SR
    engine_class: type[Engine] = Engine  # the model family's engine (Turbo and Nano have their own)
    family = "original"  # which model family this object runs (``chatterbox.family.FAMILIES``)

    def __init__(self, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer: EnTokenizer,
                 device: str | torch.device, conds: Conditionals | None = None,
                 opt: OptConfig | None = None, synthetic: bool = False,
                 engine_cfg: EngineConfig | None = None) -> None:
        """``t3``, ``s3gen``, ``ve``: float32 models (kept as the weights every engine is built from;
        they are never changed). ``opt`` picks the optimisations (``OptConfig.reference()`` by default)."""
        self.sr = S3GEN_SR
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.conds = conds
        self.synthetic = synthetic
        self.engine_cfg = engine_cfg or EngineConfig.published()
        self._weights = Models(t3=t3, s3gen=s3gen, ve=ve)
        self._lock = threading.Lock()
        self.engine = self.engine_class.build(self._weights, tokenizer, opt or OptConfig.reference(), self.device,
                                              self.engine_cfg)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_local(cls, ckpt_dir: str | Path, device: str | torch.device = "cpu",
                   opt: OptConfig | None = None) -> "ChatterboxTTS":
        """Load ``ve``, ``t3_cfg``, ``s3gen`` (.safetensors or .pt), ``tokenizer.json`` and, when present,
        the built-in voice ``conds.pt`` from a directory. Keys and shapes are checked strictly."""
        device = resolve_device(device)
        ckpt_dir = Path(ckpt_dir)
        models = load_models_from_dir(ckpt_dir, torch.device("cpu"))
        tokenizer = EnTokenizer(ckpt_dir / TOKENIZER_FILE)
        conds_path = ckpt_dir / CONDS_FILE
        conds = Conditionals.load(conds_path).to(device) if conds_path.is_file() else None
        return cls(models.t3, models.s3gen, models.ve, tokenizer, device, conds=conds, opt=opt,
                   synthetic=is_synthetic_checkpoint(ckpt_dir))

    @classmethod
    def from_pretrained(cls, device: str | torch.device = "cpu", opt: OptConfig | None = None) -> "ChatterboxTTS":
        """Download (or reuse from the Hugging Face cache) the published checkpoint and load it."""
        resolve_device(device)
        return cls.from_local(download_checkpoint(), device, opt=opt)

    @classmethod
    def from_synthetic(cls, device: str | torch.device = "cpu", salt: int = 0,
                       opt: OptConfig | None = None) -> "ChatterboxTTS":
        """The embedded default: full-size models with deterministic synthetic weights, built in memory.

        Everything runs as with real weights, but the output is NOT speech.
        """
        import tempfile

        from .text_vocab import write_tokenizer_json

        device = resolve_device(device)
        log.warning(NOT_SPEECH_WARNING)
        models: Models = load_synthetic_models(torch.device("cpu"), salt=salt)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = EnTokenizer(write_tokenizer_json(Path(tmp) / TOKENIZER_FILE))
        tts = cls(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt, synthetic=True)
        tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
        return tts

    # ------------------------------------------------------------------ engine
    @property
    def opt(self) -> OptConfig:
        return self.engine.opt

    @property
    def t3(self) -> T3:
        return self.engine.models.t3

    @property
    def s3gen(self) -> S3Gen:
        return self.engine.models.s3gen

    @property
    def ve(self) -> VoiceEncoder:
        return self.engine.models.ve

    def set_opt(self, opt: OptConfig) -> None:
        """Switch optimisation settings: a new engine is built from the float32 weights. Requests
        already running finish on the engine they started on."""
        engine = self.engine_class.build(self._weights, self.tokenizer, opt, self.device, self.engine_cfg)
        with self._lock:
            self.engine = engine

    def with_opt(self, opt: OptConfig) -> "ChatterboxTTS":
        """Another model object over the same weights and voice, with its own engine for ``opt``."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._lock = threading.Lock()
        other.engine = self.engine_class.build(self._weights, self.tokenizer, opt, self.device, self.engine_cfg)
        return other

    # ------------------------------------------------------------------ voice
    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5,
                             sample_rate: int | None = None) -> Conditionals:
        """Make the voice from a reference recording (file path, or array/tensor + ``sample_rate``); it
        becomes the model's current voice. Requests already running keep the voice they started with."""
        conds = self.engine.prepare_conditionals(wav_fpath, exaggeration, sample_rate)
        self.conds = conds
        return conds

    # ------------------------------------------------------------------ text
    @property
    def split_cfg(self) -> TextSplitConfig:
        """How long texts are cut into segments (``TextSplitConfig``)."""
        return self.engine.cfg.text_split

    @split_cfg.setter
    def split_cfg(self, cfg: TextSplitConfig) -> None:
        self.engine_cfg = dataclasses.replace(self.engine_cfg, text_split=cfg)
        self.engine.cfg = dataclasses.replace(self.engine.cfg, text_split=cfg)

    def count_text_tokens(self, text: str) -> int:
        return self.engine.count_text_tokens(text)

    def text_segments(self, text: str) -> list[str]:
        """How ``text`` is cut into segments generated one after another (each with its own
        ``max_new_tokens`` budget)."""
        return self.engine.text_segments(text)

    def text_tokens(self, text: str) -> torch.Tensor:
        return self.engine.text_tokens(text)

    # ------------------------------------------------------------------ generation
    def _voice(self, engine: Engine, audio_prompt_path, exaggeration: float) -> Conditionals:
        if audio_prompt_path is not None:
            return self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
        conds = self.conds
        if conds is None:
            raise ValueError("no voice: call prepare_conditionals(...) first or pass audio_prompt_path")
        if conds.exaggeration() != float(exaggeration):
            # as upstream, the model's voice keeps the last exaggeration asked for; a new object, so
            # requests already running keep the voice they started with
            conds = conds.with_exaggeration(exaggeration)
            self.conds = conds
        return conds

    def generate(self, text: str, repetition_penalty: float = 1.2, min_p: float = 0.05, top_p: float = 1.0,
                 audio_prompt_path=None, exaggeration: float = 0.5, cfg_weight: float = 0.5,
                 temperature: float = 0.8, max_new_tokens: int = 1000, seed: int | None = None,
                 watermark: bool | None = None) -> torch.Tensor:
        """Speak ``text``; returns a (1, samples) float32 CPU tensor at ``self.sr``.

        ``max_new_tokens`` bounds the speech tokens of each text segment: long texts are cut into
        segments of at most 300 text tokens, each generated with its own budget."""
        return self.synthesize(text, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                               audio_prompt_path=audio_prompt_path, exaggeration=exaggeration,
                               cfg_weight=cfg_weight, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, watermark=watermark).wav

    def synthesize(self, text: str, repetition_penalty: float = 1.2, min_p: float = 0.05, top_p: float = 1.0,
                   audio_prompt_path=None, exaggeration: float = 0.5, cfg_weight: float = 0.5,
                   temperature: float = 0.8, max_new_tokens: int = 1000, seed: int | None = None,
                   watermark: bool | None = None, timer=None) -> SynthesisResult:
        """``generate`` with its by-products: speech tokens, per-stage timings, the seed used."""
        request = SynthesisRequest(text, exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature,
                                   repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed, watermark=watermark)
        engine = self.engine
        return engine.synthesize(request, self._voice(engine, audio_prompt_path, exaggeration), timer=timer)

    def generate_stream(self, text: str, audio_prompt_path=None, exaggeration: float = 0.5, cfg_weight: float = 0.5,
                        temperature: float = 0.8, repetition_penalty: float = 1.2, min_p: float = 0.05,
                        top_p: float = 1.0, chunk_size: int | list[int] = 25, context_window: int = 50,
                        fade_duration: float = 0.02, print_metrics: bool = True, max_new_tokens: int = 1000,
                        seed: int | None = None, watermark: bool | None = None, lookahead_tokens: int = 3,
                        ) -> Iterator[tuple[torch.Tensor, StreamingMetrics]]:
        """Speak ``text`` incrementally: yields ``(audio_chunk (1, n) float32 CPU tensor, metrics)``.

        T3 tokens are rendered every ``chunk_size`` tokens (an int, or a schedule such as
        ``[10, 25, 50]`` whose last value repeats). The flow re-encodes at most ``context_window``
        tokens of left context per chunk; the vocoder streams with exact state, so chunks join without
        seams and no cross-fade is applied (``fade_duration`` is accepted for compatibility and unused).
        ``lookahead_tokens`` holds each chunk's newest frames back until that many later tokens exist
        (3 is the encoder's own lookahead). ``max_new_tokens`` bounds each text segment's speech tokens.
        The caller's autograd mode is never changed between chunks; closing the generator early
        stops the request and frees its state.
        """
        del fade_duration  # seams are exact; nothing to fade
        request = SynthesisRequest(text, exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature,
                                   repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed, watermark=watermark,
                                   chunk_size=tuple(chunk_size) if isinstance(chunk_size, list) else chunk_size,
                                   context_window=context_window, lookahead_tokens=lookahead_tokens)
        engine = self.engine
        session = engine.session(request, self._voice(engine, audio_prompt_path, exaggeration))
        return session.stream(log_metrics=print_metrics)
