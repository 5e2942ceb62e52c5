"""The chunk pipeline behind ``ChatterboxTTS.generate_stream``: T3 tokens in, S3Gen audio out.

* ``t3_chunks`` cuts T3's stop-checked token blocks into chunks by the chunk schedule and yields a
  *poll point* (``None``) after every block, so the caller can look at S3Gen work in flight.
* ``SegmentS3Gen`` renders the chunks of one text segment: incremental flow, then streaming
  vocoder and trim fade; it carries the flow and vocoder state from chunk to chunk.
* ``render_in_order`` is the scheduler: it submits each chunk and hands back the rendered chunks in
  submission order, each as soon as it is seen finished, and never two in flight.
* Runners say where and when S3Gen runs: ``SyncRunner`` on the current stream, finished on return
  (the sequential path; the only one on the CPU), ``SideStreamRunner`` on a side CUDA stream while
  T3 keeps decoding on the current one (``OptConfig.overlap_s3gen``). Both run the same S3Gen
  calls in the same order, so the chunks are the same.

One thread drives both streams, so any host synchronisation inside S3Gen stalls T3's launches.
There are three per chunk: the flow's token-range checks (two, at its start, when the side
stream is idle: cheap) and ``torch.istft``'s window check in the vocoder (at its end: the host waits
for the vocoder, which is why the vocoder is enqueued only once the flow has finished).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, TypeVar

import torch

from .models.s3gen.hift_stream import HiFTStreamer, StreamNoise
from .models.s3gen.s3gen import S3Gen, S3GenRef
from .opt import OptConfig, autograd_context
from .streaming import FlowStreamConfig, flow_stream_step, init_flow_stream
from .text import drop_invalid_tokens
from .timing import StageTimer

log = logging.getLogger(__name__)

_MS = 1000.0


# ------------------------------------------------------------------------------------------------
# T3 side: token blocks -> chunks
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTokens:
    """One chunk's share of T3's output, ready for S3Gen."""

    tokens: torch.Tensor | None  # (1, n) as sampled; None when T3 ended exactly at a chunk boundary
    valid: torch.Tensor  # (M,) the codes S3Gen can render
    final: bool  # the segment's last chunk: S3Gen flushes
    t3_s: float  # wall seconds spent in T3 for this chunk (time suspended at poll points excluded)

    @property
    def n_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]


def t3_chunks(tokens_iter: Iterator[torch.Tensor], schedule: Iterator[int], stop_token: int,
              device: torch.device, autograd_mode: str) -> Iterator[ChunkTokens | None]:
    """Chunks of ``schedule()`` tokens from T3's blocks (1, <= block) of one segment.

    Yields ``None`` after each block (a poll point) and a ``ChunkTokens`` when a chunk is complete;
    the last one has ``final=True`` (T3 stopped, hit ``stop_token`` or ran out of steps). Every
    yield happens outside ``autograd_context``, so the caller's mode holds while this is suspended.
    """
    pending: list[torch.Tensor] = []
    done = False
    while not done:
        want = next(schedule)
        t3_s = 0.0
        while not done and sum(p.shape[1] for p in pending) < want:
            t0 = time.perf_counter()
            with autograd_context(autograd_mode):
                block = next(tokens_iter, None)
            t3_s += time.perf_counter() - t0
            if block is None:
                done = True
            else:
                pending.append(block)
                yield None
        t0 = time.perf_counter()
        with autograd_context(autograd_mode):
            arrived = torch.cat(pending, dim=1) if pending else None
            n_arrived = 0 if arrived is None else min(arrived.shape[1], want)
            tokens = arrived[:, :n_arrived] if arrived is not None else None
            pending = [arrived[:, n_arrived:]] if arrived is not None and arrived.shape[1] > n_arrived else []
            done = done or (tokens is not None and bool((tokens == stop_token).any()))
            t3_s += time.perf_counter() - t0
            valid = (drop_invalid_tokens(tokens) if tokens is not None
                     else torch.zeros(0, dtype=torch.long, device=device))
        yield ChunkTokens(tokens=tokens, valid=valid, final=done, t3_s=t3_s)


# ------------------------------------------------------------------------------------------------
# S3Gen side: one segment's incremental rendering
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3GenStreamSpec:
    """What every chunk of a call renders with (fixed for the whole ``generate_stream`` call)."""

    s3gen: S3Gen
    ref: S3GenRef
    streamer: HiFTStreamer
    cfm_noise: torch.Tensor  # the CFM start-noise table, sliced by absolute frame
    flow_cfg: FlowStreamConfig
    n_timesteps: int
    estimator: object = None  # the CFM estimator stand-in (a CUDA-graph runner) or None


class SegmentS3Gen:
    """Flow + vocoder state of one text segment. A chunk is ``vocode(flow(codes))``; the two steps
    are separate so that the vocoder can be enqueued later than the flow (see ``SideStreamRunner``)."""

    def __init__(self, spec: S3GenStreamSpec, noise: StreamNoise) -> None:
        self.spec = spec
        self.flow_state = init_flow_stream(spec.s3gen, spec.ref)
        self.voc_state = spec.streamer.init_state(1, spec.s3gen.device, noise)
        self.samples = 0  # rendered so far in this segment: the trim fade's offset

    def flow(self, valid: torch.Tensor, final: bool, timer) -> torch.Tensor:
        """Codes (M,) -> the mel frames now ready (1, n_mels, k)."""
        spec = self.spec
        with timer.stage("flow"):
            mel, self.flow_state = flow_stream_step(spec.s3gen, spec.ref, self.flow_state, valid, spec.cfm_noise,
                                                    spec.flow_cfg, final=final, n_timesteps=spec.n_timesteps,
                                                    estimator=spec.estimator)
        return mel

    def vocode(self, mel: torch.Tensor, final: bool, timer) -> torch.Tensor:
        """Mel frames -> the waveform samples now final (1, n), trim fade applied, float32, detached."""
        with timer.stage("vocoder"):
            wav, self.voc_state = self.spec.streamer.push(mel, self.voc_state, final=final)
            wav = self.spec.s3gen.apply_trim_fade(wav, offset=self.samples)
        self.samples += wav.shape[-1]
        return wav.detach().float()


class SegmentSlot:
    """One text segment's place in the stream. Its ``SegmentS3Gen`` is made when the segment's first
    chunk is submitted, after every earlier chunk's vocoder has been enqueued: the vocoder's random
    draws (the segment's phases first) then come in the same order whatever the runner."""

    def __init__(self, spec: S3GenStreamSpec, noise: StreamNoise) -> None:
        self.spec, self.noise = spec, noise
        self._s3gen: SegmentS3Gen | None = None

    def open(self) -> SegmentS3Gen:
        """The segment's S3Gen state (made on first call, in the caller's stream and autograd mode)."""
        if self._s3gen is None:
            self._s3gen = SegmentS3Gen(self.spec, self.noise)
        return self._s3gen


# ------------------------------------------------------------------------------------------------
# The scheduler
# ------------------------------------------------------------------------------------------------
class _Job(Protocol):
    def poll(self) -> bool:
        """Move the job on without blocking; True once its result is ready."""

    def wait(self) -> None:
        """Block until the result is ready."""


Item = TypeVar("Item")
Job = TypeVar("Job", bound=_Job)


def render_in_order(items: Iterator[Item | None], submit: Callable[[Item], Job]) -> Iterator[Job]:
    """Submit every non-None item; yield the submitted jobs in order, at most one in flight.

    ``None`` items are poll points. A job is yielded right after its own submission or at the first
    poll point at which ``poll()`` is true; when the next item arrives before that, the job is
    waited for and yielded first, then the item is submitted. The last job is waited for at the end.
    """
    pending: Job | None = None
    for item in items:
        if item is not None:
            if pending is not None:
                pending.wait()
                yield pending
                pending = None
            pending = submit(item)
        if pending is not None and pending.poll():
            job, pending = pending, None
            yield job
    if pending is not None:
        pending.wait()
        yield pending


# ------------------------------------------------------------------------------------------------
# Runners and their chunks
# ------------------------------------------------------------------------------------------------
@dataclass
class RenderedChunk:
    """A finished chunk (the sequential path)."""

    chunk: ChunkTokens
    host: torch.Tensor  # (1, n) float32 on the CPU
    timer: object  # StageTimer-like: ``summary()`` -> seconds per stage

    @property
    def samples(self) -> int:
        return self.host.shape[-1]

    def poll(self) -> bool:
        return True

    def wait(self) -> None:
        """Nothing to wait for."""

    def stage_seconds(self) -> dict[str, float]:
        return self.timer.summary()


class SyncRunner:
    """S3Gen on the current stream, one chunk at a time: each chunk is finished when returned."""

    def __init__(self, device: torch.device, autograd_mode: str) -> None:
        self.device = torch.device(device)
        self.autograd_mode = autograd_mode

    def submit(self, slot: SegmentSlot, chunk: ChunkTokens) -> RenderedChunk:
        timer = StageTimer(self.device)
        with autograd_context(self.autograd_mode):
            segment = slot.open()
            wav = segment.vocode(segment.flow(chunk.valid, chunk.final, timer), chunk.final, timer)
            audio = wav.to("cpu")
        return RenderedChunk(chunk=chunk, host=audio, timer=timer)

    def close(self) -> None:
        """Nothing runs after ``submit`` returns."""


class SideStreamTimer:
    """``StageTimer``'s interface for work enqueued on a side stream: a pair of CUDA events per
    stage on the current stream; ``summary`` reads them without synchronising (call it once the
    chunk's completion event has passed; it raises if a stage is still running)."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((name, start, end))

    def summary(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in self._pending:
            if not end.query():
                raise RuntimeError(f"stage {name!r} is still running: read the timer after its chunk is done")
            totals[name] += start.elapsed_time(end) / _MS
        return dict(totals)


class CudaSideStream:
    """The CUDA calls ``SideStreamRunner`` makes, in one place (tests stand a CPU fake in for it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)

    def follow_current(self) -> None:
        """Work enqueued on the side stream from now on runs after what the current stream has queued."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def used_here(self, tensor: torch.Tensor) -> None:
        """``tensor`` came from the current stream: its memory is not reused until the side stream is past it."""
        tensor.record_stream(self.stream)

    def active(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream)

    def mark(self) -> torch.cuda.Event:
        """An event recorded on the side stream now; ``query()`` says whether the work before it is done."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def timer(self) -> SideStreamTimer:
        return SideStreamTimer()

    def to_host(self, wav: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy into pinned memory (valid once a later ``mark`` has completed); the
        host allocator keeps the buffer alive until the copy is done."""
        if wav.shape[-1] == 0:
            return torch.zeros(wav.shape, dtype=wav.dtype)
        host = torch.empty(wav.shape, dtype=wav.dtype, pin_memory=True)
        host.copy_(wav, non_blocking=True)
        return host

    def synchronize(self) -> None:
        self.stream.synchronize()


class SideStreamChunk:
    """A chunk in flight on the side stream: flow enqueued at submission, vocoder once the flow is done.

    The vocoder waits for the flow because ``HiFTGenerator.spec_to_wav`` calls ``torch.istft``, whose
    window check reads a device value on the host: enqueued behind a running flow, it would hold the
    host (and so T3) until the flow finished. Enqueued after it, that wait covers only the vocoder's
    own convolutions (about a tenth of the chunk's S3Gen time), and the rest of the chunk (trim fade,
    copy to the host) is waited for right away, so the audio is ready when ``poll`` returns.
    """

    def __init__(self, runner: "SideStreamRunner", segment: SegmentS3Gen, chunk: ChunkTokens,
                 mel: torch.Tensor, timer, flow_done) -> None:
        self.runner, self.segment, self.chunk = runner, segment, chunk
        self.timer = timer
        self._mel = mel  # made and used on the side stream
        self._flow_done = flow_done
        self._done = None
        self.host: torch.Tensor | None = None

    @property
    def samples(self) -> int:
        if self.host is None:
            raise RuntimeError("the chunk's vocoder has not run yet: poll() or wait() first")
        return self.host.shape[-1]

    def poll(self) -> bool:
        if self._done is None:
            if not self._flow_done.query():
                return False
            self._vocode()
            self._done.synchronize()
            return True
        return self._done.query()

    def wait(self) -> None:
        if self._done is None:
            self._vocode()
        self._done.synchronize()

    def stage_seconds(self) -> dict[str, float]:
        return self.timer.summary()

    def _vocode(self) -> None:
        t0 = time.perf_counter()
        side, final = self.runner.side, self.chunk.final
        with side.active(), autograd_context(self.runner.autograd_mode):
            wav = self.segment.vocode(self._mel, final, self.timer)
            self.host = side.to_host(wav)
            self._done = side.mark()
        self._mel = None
        log.debug("vocoder of %d samples enqueued in %.2f ms of host time (torch.istft waits for it)",
                  self.host.shape[-1], (time.perf_counter() - t0) * _MS)


class SideStreamRunner:
    """S3Gen on a side CUDA stream (made per ``generate_stream`` call) while T3 decodes on the current one.

    ``submit`` makes the side stream wait for the current one (it then sees the chunk's tokens),
    enqueues the flow there, marks its end and returns; the chunk's ``poll`` enqueues the vocoder,
    the trim fade and a copy into pinned host memory once the flow is done. Cross-stream lifetimes:
    the chunk's codes (made on the current stream) are marked as used by the side stream; segment
    state is made and used on the side stream only (``SegmentSlot.open`` runs there); the noise
    table and the conditionals live as long as the call, which ends with ``close`` (a
    synchronisation of the side stream). Between chunks nothing is in flight: ``render_in_order``
    yields a chunk only when it is finished and submits the next one after that.
    """

    def __init__(self, device: torch.device, autograd_mode: str, side: CudaSideStream | None = None) -> None:
        self.device = torch.device(device)
        self.autograd_mode = autograd_mode
        self.side = CudaSideStream(self.device) if side is None else side

    def submit(self, slot: SegmentSlot, chunk: ChunkTokens) -> SideStreamChunk:
        t0 = time.perf_counter()
        side = self.side
        side.follow_current()
        timer = side.timer()
        with side.active(), autograd_context(self.autograd_mode):
            side.used_here(chunk.valid)
            segment = slot.open()  # segment state is made on the side stream and only used there
            mel = segment.flow(chunk.valid, chunk.final, timer)
            flow_done = side.mark()
        log.debug("flow of %d codes enqueued on the side stream in %.2f ms of host time", chunk.valid.numel(),
                  (time.perf_counter() - t0) * _MS)
        return SideStreamChunk(self, segment, chunk, mel, timer, flow_done)

    def close(self) -> None:
        """Wait for everything enqueued on the side stream (also when the stream is closed early)."""
        self.side.synchronize()


def make_runner(device: torch.device, opt: OptConfig) -> SyncRunner | SideStreamRunner:
    """The side-stream runner when ``opt.overlap_s3gen`` is on and the model is on a CUDA device."""
    device = torch.device(device)
    if opt.overlap_s3gen and device.type == "cuda" and torch.cuda.is_available():
        return SideStreamRunner(device, opt.autograd_mode)
    return SyncRunner(device, opt.autograd_mode)
