"""The public text-to-speech pipeline: ``ChatterboxTTS`` (drop-in for upstream's class)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CONDS_FILE, TOKENIZER_FILE
from .conditionals import Conditionals
from .loader import Models, download_checkpoint, load_models_from_dir, load_synthetic_models, resolve_device
from .models.s3gen.s3gen import S3Gen
from .models.t3.sampling import RESEMBLE_ORDER
from .models.t3.t3 import T3
from .models.voice_encoder import VoiceEncoder
from .opt import OptConfig, autograd_context
from .synthetic import NOT_SPEECH_WARNING
from .text import EnTokenizer, TextSplitConfig, drop_invalid_tokens, punc_norm, split_text
from .models.s3gen.hift_stream import HiFTStreamer, StreamNoise
from .stream_pipeline import S3GenStreamSpec, SegmentSlot, make_runner, render_in_order, t3_chunks
from .streaming import ChunkTiming, FlowStreamConfig, StreamingMetrics, chunk_schedule
from .timing import StageTimer
from .voice import VoiceConfig, prepare_conditionals, synthetic_reference
from .watermark import Watermarker, watermark_available

log = logging.getLogger(__name__)

S3GEN_SR = 24000
S3_SR = 16000
_SEED_RANGE = 2**62
_VOCODER_SEED_OFFSET = 0x5EED  # any fixed offset: keeps the vocoder's stream apart from T3's


@dataclass
class SynthesisResult:
    wav: torch.Tensor  # (1, L) float32 on the CPU, an ordinary tensor the caller owns
    speech_tokens: list[torch.Tensor] = field(default_factory=list)  # per text segment, (N,) as rendered
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seed: int = 0
    segments: list[str] = field(default_factory=list)


class ChatterboxTTS:
    ENC_COND_LEN = 6 * S3_SR
    DEC_COND_LEN = 10 * S3GEN_SR

    def __init__(self, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer: EnTokenizer,
                 device: str | torch.device, conds: Conditionals | None = None,
                 opt: OptConfig | None = None, synthetic: bool = False) -> None:
        self.sr = S3GEN_SR
        self.t3 = t3
        self.s3gen = s3gen
        self.ve = ve
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.conds = conds
        self.synthetic = synthetic
        self.voice_cfg = VoiceConfig.published()
        self.split_cfg = TextSplitConfig.published()
        self._watermarker: Watermarker | None = None
        self.opt = OptConfig.reference()
        self.opt_state = None  # what the passes did, and the CUDA-graph runners they made
        self.set_opt(opt or OptConfig.reference())

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_local(cls, ckpt_dir: str | Path, device: str | torch.device = "cpu",
                   opt: OptConfig | None = None) -> "ChatterboxTTS":
        """Load ``ve``, ``t3_cfg``, ``s3gen`` (.safetensors or .pt), ``tokenizer.json`` and, when present,
        the built-in voice ``conds.pt`` from a directory. Keys and shapes are checked strictly."""
        device = resolve_device(device)
        ckpt_dir = Path(ckpt_dir)
        models = load_models_from_dir(ckpt_dir, device)
        tokenizer = EnTokenizer(ckpt_dir / TOKENIZER_FILE)
        conds_path = ckpt_dir / CONDS_FILE
        conds = Conditionals.load(conds_path).to(device) if conds_path.is_file() else None
        return cls(models.t3, models.s3gen, models.ve, tokenizer, device, conds=conds, opt=opt)

    @classmethod
    def from_pretrained(cls, device: str | torch.device = "cpu", opt: OptConfig | None = None) -> "ChatterboxTTS":
        """Download (or reuse from the Hugging Face cache) the published checkpoint and load it."""
        resolve_device(device)
        return cls.from_local(download_checkpoint(), device, opt=opt)

    @classmethod
    def from_synthetic(cls, device: str | torch.device = "cpu", salt: int = 0,
                       opt: OptConfig | None = None) -> "ChatterboxTTS":
        """The embedded default: full-size models with deterministic synthetic weights.

        Everything runs as with real weights, but the output is NOT speech.
        """
        import tempfile

        from .text_vocab import write_tokenizer_json

        device = resolve_device(device)
        log.warning(NOT_SPEECH_WARNING)
        models: Models = load_synthetic_models(device, salt=salt)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = EnTokenizer(write_tokenizer_json(Path(tmp) / TOKENIZER_FILE))
        tts = cls(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt, synthetic=True)
        tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
        return tts

    def set_opt(self, opt: OptConfig) -> None:
        """Switch optimisation settings on the loaded model (passes are applied to the modules)."""
        from .opt import apply_opt

        self.opt_state = apply_opt(self, opt)
        self.opt = opt

    @property
    def _t3_decoder(self):
        return getattr(self.opt_state, "t3_decoder", None)

    @property
    def _cfm_estimator(self):
        return getattr(self.opt_state, "cfm_estimator", None)

    # ------------------------------------------------------------------ voice
    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5,
                             sample_rate: int | None = None) -> Conditionals:
        """Make the voice from a reference recording (file path, or array/tensor + ``sample_rate``)."""
        with autograd_context(self.opt.autograd_mode):
            conds = prepare_conditionals(self.s3gen, self.ve, wav_fpath, exaggeration, sample_rate, self.voice_cfg)
        # copied outside the autograd-mode context: the caller gets ordinary tensors it may edit
        self.conds = conds.clone()
        return self.conds

    def _resolve_conds(self, audio_prompt_path, exaggeration: float) -> Conditionals:
        if audio_prompt_path is not None:
            self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
        elif self.conds is None:
            raise ValueError("no voice: call prepare_conditionals(...) first or pass audio_prompt_path")
        if float(self.conds.t3.emotion_adv.reshape(-1)[0]) != float(exaggeration):
            self.conds = self.conds.with_exaggeration(exaggeration)
        return self.conds

    # ------------------------------------------------------------------ text
    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(punc_norm(text)))

    def text_segments(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return split_text(text, self.count_text_tokens, self.split_cfg)

    def text_tokens(self, text: str) -> torch.Tensor:
        """Normalised text -> the CFG pair (2, n + 2) with start and stop text tokens."""
        ids = self.tokenizer.text_to_tokens(punc_norm(text)).to(self.device)
        ids = F.pad(ids, (1, 0), value=self.t3.cfg.start_text_token)
        ids = F.pad(ids, (0, 1), value=self.t3.cfg.stop_text_token)
        return torch.cat([ids, ids], dim=0).long()

    # ------------------------------------------------------------------ generation
    def generate(self, text: str, repetition_penalty: float = 1.2, min_p: float = 0.05, top_p: float = 1.0,
                 audio_prompt_path=None, exaggeration: float = 0.5, cfg_weight: float = 0.5,
                 temperature: float = 0.8, max_new_tokens: int = 1000, seed: int | None = None,
                 watermark: bool | None = None) -> torch.Tensor:
        """Speak ``text``; returns a (1, samples) float32 CPU tensor at ``self.sr``."""
        return self.synthesize(text, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                               audio_prompt_path=audio_prompt_path, exaggeration=exaggeration,
                               cfg_weight=cfg_weight, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, watermark=watermark).wav

    def synthesize(self, text: str, repetition_penalty: float = 1.2, min_p: float = 0.05, top_p: float = 1.0,
                   audio_prompt_path=None, exaggeration: float = 0.5, cfg_weight: float = 0.5,
                   temperature: float = 0.8, max_new_tokens: int = 1000, seed: int | None = None,
                   watermark: bool | None = None, timer: StageTimer | None = None) -> SynthesisResult:
        """``generate`` with its by-products: speech tokens, per-stage timings, the seed used."""
        segments = self.text_segments(text)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        seed = self._seed(seed)
        timer = timer or StageTimer(self.device)
        sample_gen, vocoder_gen, noise_gen = self._generators(seed)
        wavs, tokens_out = [], []
        with autograd_context(self.opt.autograd_mode):
            with timer.stage("conditionals"):
                conds = self._resolve_conds(audio_prompt_path, exaggeration)
            cfm_noise = self.s3gen.draw_cfm_noise(noise_gen)
            for segment in segments:
                with timer.stage("t3"):
                    speech = self.t3.inference(
                        conds.t3, self.text_tokens(segment), max_new_tokens, temperature=temperature,
                        cfg_weight=cfg_weight, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                        order=RESEMBLE_ORDER, generator=sample_gen, stop_check_every=self.opt.stop_check_every,
                        decoder=self._t3_decoder)
                tokens = drop_invalid_tokens(speech[0])
                tokens_out.append(tokens)
                if tokens.numel() == 0:
                    log.warning("T3 produced no renderable speech tokens for %r; segment skipped", segment)
                    continue
                with timer.stage("flow"):
                    mel = self.s3gen.flow_inference(tokens, conds.gen, cfm_noise=cfm_noise,
                                                    n_timesteps=self.opt.cfm_steps, estimator=self._cfm_estimator)
                with timer.stage("hift"):
                    wav, _ = self.s3gen.hift_inference(mel, generator=vocoder_gen)
                    wavs.append(self.s3gen.apply_trim_fade(wav))
            wav = torch.cat(wavs, dim=-1) if wavs else torch.zeros(1, 0, device=self.device)
        wav = wav.detach().float().to("cpu").clone()  # a plain tensor, made outside the autograd-mode context
        tokens_out = [t.detach().to("cpu").clone() for t in tokens_out]
        if watermark is None:
            watermark = watermark_available()
        if watermark:
            with timer.stage("watermark"):
                wav = self._watermark(wav)
        return SynthesisResult(wav=wav, speech_tokens=tokens_out, timings=timer.summary(), seed=seed,
                               segments=segments)

    def _watermark(self, wav: torch.Tensor) -> torch.Tensor:
        if self._watermarker is None:
            self._watermarker = Watermarker()
        return self._watermarker.apply(wav, self.sr)

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
        """T3 sampling, vocoder draws (device) and the CFM noise table (CPU): separate streams, so the
        speech tokens of a seed do not depend on how the vocoder consumes randomness (one-shot or
        streamed)."""
        sample_gen = torch.Generator(device=self.device).manual_seed(seed)
        vocoder_gen = torch.Generator(device=self.device).manual_seed(seed + _VOCODER_SEED_OFFSET)
        noise_gen = torch.Generator().manual_seed(seed)
        return sample_gen, vocoder_gen, noise_gen

    @staticmethod
    def _seed(seed: int | None) -> int:
        if seed is None:
            # drawn from torch's global generator, so torch.manual_seed(...) still makes runs repeatable
            return int(torch.randint(0, _SEED_RANGE, (1,)))
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return int(seed)

    # ------------------------------------------------------------------ streaming
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
        (3 is the encoder's own lookahead; more raises fidelity to one-shot at the cost of latency).
        With ``opt.overlap_s3gen`` on a CUDA device, S3Gen renders chunk k on a side stream while T3
        decodes chunk k+1; the chunks are the same, in the same order (see ``stream_pipeline``).
        The caller's autograd mode is never changed between chunks; closing the generator early
        releases its state.
        """
        del fade_duration  # seams are exact; nothing to fade
        start = time.perf_counter()
        segments = self.text_segments(text)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        schedule = chunk_schedule(chunk_size)
        flow_cfg = FlowStreamConfig(context_window=context_window, lookahead_tokens=lookahead_tokens)
        seed = self._seed(seed)
        sample_gen, vocoder_gen, noise_gen = self._generators(seed)
        if watermark is None:
            watermark = watermark_available()
        metrics = StreamingMetrics()
        mode = self.opt.autograd_mode
        with autograd_context(mode):
            conds = self._resolve_conds(audio_prompt_path, exaggeration)
            cfm_noise = self.s3gen.draw_cfm_noise(noise_gen)
        spec = S3GenStreamSpec(s3gen=self.s3gen, ref=conds.gen, streamer=HiFTStreamer(self.s3gen.mel2wav),
                               cfm_noise=cfm_noise, flow_cfg=flow_cfg, n_timesteps=self.opt.cfm_steps,
                               estimator=self._cfm_estimator)
        runner = make_runner(self.device, self.opt)

        def chunk_items():
            """Per segment: T3's chunks (and poll points), each with the segment's S3Gen slot."""
            for segment in segments:
                with autograd_context(mode):
                    tokens_iter = self.t3.generate_tokens(
                        conds.t3, self.text_tokens(segment), max_new_tokens, temperature=temperature,
                        cfg_weight=cfg_weight, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                        order=RESEMBLE_ORDER, generator=sample_gen, block_size=self.opt.stop_check_every,
                        decoder=self._t3_decoder)
                slot = SegmentSlot(spec, StreamNoise.drawn(vocoder_gen))
                try:
                    for chunk in t3_chunks(tokens_iter, schedule, self.t3.cfg.stop_speech_token, self.device, mode):
                        yield None if chunk is None else (slot, chunk)
                finally:
                    tokens_iter.close()

        items = chunk_items()
        rendered = render_in_order(items, lambda item: runner.submit(*item))
        total_samples = 0
        try:
            for done in rendered:
                if done.samples == 0:
                    continue
                audio = done.host.clone()  # a plain tensor, made outside the autograd-mode context
                if watermark:
                    audio = self._watermark(audio)
                stages = done.stage_seconds()
                total_samples += audio.shape[1]
                now = time.perf_counter() - start
                if metrics.latency_to_first_chunk is None:
                    metrics.latency_to_first_chunk = now
                    if print_metrics:
                        log.info("first audio after %.3f s", now)
                metrics.chunk_count += 1
                metrics.chunks.append(ChunkTiming(
                    index=metrics.chunk_count - 1, tokens=done.chunk.n_tokens, samples=audio.shape[1],
                    t3_s=done.chunk.t3_s, flow_s=stages.get("flow", 0.0), vocoder_s=stages.get("vocoder", 0.0),
                    emitted_at_s=now))
                metrics.total_generation_time = now
                metrics.total_audio_duration = total_samples / self.sr
                metrics.rtf = now / metrics.total_audio_duration
                yield audio, metrics
        finally:
            rendered.close()
            items.close()
            runner.close()
        metrics.total_generation_time = time.perf_counter() - start
        metrics.total_audio_duration = total_samples / self.sr
        metrics.rtf = metrics.total_generation_time / metrics.total_audio_duration if total_samples else None
        if print_metrics:
            log.info("stream done: %d chunks, %.3f s of audio in %.3f s (RTF %s)", metrics.chunk_count,
                     metrics.total_audio_duration, metrics.total_generation_time,
                     f"{metrics.rtf:.3f}" if metrics.rtf is not None else "n/a")
