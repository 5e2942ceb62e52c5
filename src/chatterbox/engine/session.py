"""One request running on an engine: its own generators, T3 state, flow and vocoder state.

A session is made per request (``Engine.session``) and dropped when the request ends or its stream
is closed; nothing it holds is shared with another request, so requests running at once on one
engine give each the audio it gives alone. Work is queued in units (a T3 block, an S3Gen chunk)
inside the request's autograd mode; streamed chunks are yielded outside it.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..conditionals import Conditionals
from ..models.s3gen.hift_stream import StreamNoise
from ..streaming import ChunkTiming, StreamingMetrics, chunk_schedule
from ..timing import StageTimer
from .chunks import SegmentRenderer, t3_chunks
from .request import SynthesisRequest
from .t3_runner import T3Request

log = logging.getLogger(__name__)

# Fixed offset between a request's T3 seed and its vocoder seed: separate streams, so a seed's speech
# tokens do not depend on how the vocoder consumes randomness (one-shot or streamed).
VOCODER_SEED_OFFSET = 0x5EED


@dataclass
class SynthesisResult:
    wav: torch.Tensor  # (1, L) float32 on the CPU, an ordinary tensor the caller owns
    speech_tokens: list[torch.Tensor] = field(default_factory=list)  # per text segment, (N,) as rendered
    generated_tokens: list[int] = field(default_factory=list)  # per text segment, T3's tokens (stop included)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seed: int = 0
    segments: list[str] = field(default_factory=list)


def handout(t: torch.Tensor) -> torch.Tensor:
    """A CPU float32 copy made outside inference mode: an ordinary tensor the caller may edit in place,
    whatever autograd mode the caller is in."""
    with torch.inference_mode(False):
        return t.detach().to("cpu", torch.float32).clone()


class Session:
    def __init__(self, engine, request: SynthesisRequest, conds: Conditionals) -> None:
        self.engine = engine
        self.request = request
        self.segments = engine.text_segments(request.text)
        self.seed = request.resolved_seed()
        device = engine.device
        self.sample_gen = torch.Generator(device=device).manual_seed(self.seed)
        self.vocoder_gen = torch.Generator(device=device).manual_seed(self.seed + VOCODER_SEED_OFFSET)
        self.noise_gen = torch.Generator().manual_seed(self.seed)
        self.conds = conds if conds.exaggeration() == float(request.exaggeration) \
            else conds.with_exaggeration(request.exaggeration)
        self.sampling = engine.t3_sampling(request)

    def _context(self) -> contextlib.ExitStack:
        return self.engine.context()

    def _t3(self, segment: str):
        eng = self.engine
        req = T3Request(cond=self.conds.t3, text_tokens=eng.text_tokens(segment), sampling=self.sampling,
                        max_new_tokens=self.request.max_new_tokens, generator=self.sample_gen,
                        block_size=eng.opt.stop_check_every)
        return eng.t3_start(req)

    def _watermark(self, wav: torch.Tensor) -> torch.Tensor:
        want = self.request.watermark
        return self.engine.watermark(wav) if (want if want is not None else self.engine.watermark_available) else wav

    # ------------------------------------------------------------------ one-shot
    def synthesize(self, timer: StageTimer | None = None) -> SynthesisResult:
        eng = self.engine
        s3gen = eng.models.s3gen
        timer = timer or StageTimer(eng.device)
        wavs, tokens_out, generated = [], [], []
        with self._context():
            cfm_noise = eng.cfm_noise(self.noise_gen)
            for segment in self.segments:
                with timer.stage("t3"):
                    stream = self._t3(segment)
                    speech = torch.cat(list(stream.blocks()), dim=1)
                generated.append(speech.shape[1])
                tokens = eng.valid_tokens(speech)
                tokens_out.append(tokens)
                if tokens.numel() == 0:
                    log.warning("T3 produced no renderable speech tokens for %r; segment skipped", segment)
                    continue
                with timer.stage("flow"):
                    mel = s3gen.flow_inference(tokens, self.conds.gen, cfm_noise=cfm_noise, n_timesteps=eng.cfm_steps)
                with timer.stage("hift"):
                    wav, _ = s3gen.hift_inference(mel, generator=self.vocoder_gen)
                    wavs.append(s3gen.apply_trim_fade(wav))
            wav = torch.cat(wavs, dim=-1) if wavs else torch.zeros(1, 0, device=eng.device)
        wav = handout(wav)
        with torch.inference_mode(False):
            tokens_out = [t.detach().to("cpu").clone() for t in tokens_out]
        with timer.stage("watermark"):
            wav = self._watermark(wav)
        return SynthesisResult(wav=wav, speech_tokens=tokens_out, generated_tokens=generated, timings=timer.summary(),
                               seed=self.seed, segments=list(self.segments))

    # ------------------------------------------------------------------ streaming
    def stream(self, log_metrics: bool = False) -> Iterator[tuple[torch.Tensor, StreamingMetrics]]:
        """The request's audio as it is made: ``(chunk (1, n) float32 CPU tensor, metrics)``; closing the
        generator early stops the request and frees its state."""
        eng, req = self.engine, self.request
        start = time.perf_counter()
        metrics = StreamingMetrics()
        schedule = chunk_schedule(list(req.chunk_size) if isinstance(req.chunk_size, tuple) else req.chunk_size)
        flow_cfg = req.flow_stream()
        with self._context():
            cfm_noise = eng.cfm_noise(self.noise_gen)
        total = 0
        first_audio_at = None  # perf_counter time the caller got the first audio: playback starts then
        for segment in self.segments:
            with self._context():
                stream = self._t3(segment)
                renderer = SegmentRenderer(eng.models.s3gen, self.conds.gen, eng.streamer, cfm_noise, flow_cfg,
                                           eng.cfm_steps, StreamNoise.drawn(self.vocoder_gen))
            blocks = stream.blocks()
            chunks = t3_chunks(_in_context(blocks, self._context), schedule, eng.t3_stop_token, eng.device,
                               eng.chunk_codes)
            try:
                for chunk in chunks:
                    timer = StageTimer(eng.device)
                    if eng.s3gen_scheduler is not None:
                        # deadline: when the audio already handed to the caller runs out in real time
                        deadline = start if first_audio_at is None else first_audio_at + total / eng.sample_rate
                        t0 = time.perf_counter()
                        wav = eng.s3gen_scheduler.render(renderer, chunk, first=first_audio_at is None,
                                                         deadline=deadline)
                        stages = {"flow": time.perf_counter() - t0}  # queueing, flow and vocoder together
                    else:
                        with self._context():
                            with timer.stage("flow"):
                                mel = renderer.flow(chunk.valid, chunk.final)
                            with timer.stage("vocoder"):
                                wav = renderer.vocode(mel, chunk.final)
                        stages = None
                    if wav.shape[-1] == 0:
                        continue
                    audio = self._watermark(handout(wav))
                    stages = stages if stages is not None else timer.summary()
                    total += audio.shape[1]
                    now = time.perf_counter() - start
                    if first_audio_at is None:
                        first_audio_at = time.perf_counter()
                    if metrics.latency_to_first_chunk is None:
                        metrics.latency_to_first_chunk = now
                        if log_metrics:
                            log.info("first audio after %.3f s", now)
                    metrics.chunk_count += 1
                    metrics.chunks.append(ChunkTiming(
                        index=metrics.chunk_count - 1, tokens=chunk.n_tokens, samples=audio.shape[1], t3_s=chunk.t3_s,
                        flow_s=stages.get("flow", 0.0), vocoder_s=stages.get("vocoder", 0.0), emitted_at_s=now))
                    metrics.total_generation_time = now
                    metrics.total_audio_duration = total / eng.sample_rate
                    metrics.rtf = now / metrics.total_audio_duration
                    yield audio, metrics
            finally:
                chunks.close()
                blocks.close()
        metrics.total_generation_time = time.perf_counter() - start
        metrics.total_audio_duration = total / eng.sample_rate
        metrics.rtf = metrics.total_generation_time / metrics.total_audio_duration if total else None
        if log_metrics:
            log.info("stream done: %d chunks, %.3f s of audio in %.3f s (RTF %s)", metrics.chunk_count,
                     metrics.total_audio_duration, metrics.total_generation_time,
                     f"{metrics.rtf:.3f}" if metrics.rtf is not None else "n/a")


def _in_context(it: Iterator, context) -> Iterator:
    """``it``'s items, each produced inside ``context()`` (and handed on outside it)."""
    while True:
        with context():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item
