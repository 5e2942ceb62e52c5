"""The speech service: engines, admission, voices and metrics behind one async interface that knows
nothing of HTTP (the app turns its results and ``APIError``s into responses).

A server may load several model families (original Chatterbox, Turbo, Nano): each request names its
model (``chatterbox``, ``chatterbox-turbo``, ``chatterbox-nano``; OpenAI's names mean the first family
loaded) and runs on an engine of that family, with that family's default sampling settings and a
voice made by that family's front end."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import numpy as np

from ..constants import S3GEN_SR
from ..engine.request import SEED_RANGE, SynthesisRequest
from ..family import DEFAULT_FAMILY, request_defaults
from .config import ServerConfig
from .encoders import available_formats
from .errors import APIError
from .loading import warm_up
from .metrics import ServerMetrics
from .pool import EnginePool, Lease, QueueFull
from .protocol import SpeechParams, check_values, synthesis_request
from .voices import VoiceInfo, VoiceNameTaken, VoiceNotFound, VoiceStore, check_name
from .worker import Chunk, WorkerStream

log = logging.getLogger(__name__)



class ClientGone(Exception):
    """The client disconnected while its request waited for a slot."""


@dataclass(frozen=True)
class SpeechJob:
    """A validated speech request, ready to run."""

    request: SynthesisRequest
    family: str  # the model family that runs it
    voice: str  # the built-in voice's id, or a stored voice's id
    response_format: str
    stream_format: str
    input_tokens: int
    instructions_ignored: bool
    arrived: float  # time.perf_counter() when the request arrived


class SpeechStream:
    """A running request: its chunks as they are made. Leaving the iteration early cancels it."""

    def __init__(self, service: "SpeechService", job: SpeechJob, lease: Lease, worker: WorkerStream) -> None:
        self.service, self.job, self.lease, self.worker = service, job, lease, worker
        self.samples = 0
        self.tokens = 0

    @property
    def engine(self) -> str:
        return self.lease.slot.name

    async def chunks(self) -> AsyncIterator[Chunk]:
        metrics = self.service.metrics
        outcome = "cancelled"
        try:
            async for chunk in self.worker.chunks():
                if self.samples == 0 and chunk.audio.size:
                    metrics.ttfa.observe(time.perf_counter() - self.job.arrived)
                self.samples += chunk.audio.size
                self.tokens += chunk.tokens
                yield chunk
            outcome = "completed"
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.worker.cancel()  # a no-op once the stream ended; stops the worker otherwise
            metrics.streams.labels(outcome).inc()
            metrics.audio_seconds.inc(self.samples / self.service.sample_rate)
            metrics.speech_tokens.inc(self.tokens)

    def cancel(self) -> None:
        self.worker.cancel()


class SpeechService:
    def __init__(self, config: ServerConfig, loader: Callable[[], list],
                 families: tuple[str, ...] | None = None) -> None:
        """``loader()`` returns the engines (``ChatterboxTTS`` objects, one per device and family; each
        object's ``family`` says which requests it serves); ``load()`` calls it and warms every engine
        up. ``families``: the families the loader will bring, in order (the first is the default model),
        for what is listed before loading ends; afterwards the engines' own families count."""
        self.config = config
        self.loader = loader
        self._declared = tuple(families) if families else (DEFAULT_FAMILY,)
        self.sample_rate = S3GEN_SR
        self.voices = VoiceStore(config.voices_dir, config.voice_cache_size)
        self.voices.sweep(config.stale_upload_s)
        self.metrics = ServerMetrics(config.ttfa_buckets_s)
        self.formats = available_formats(self.sample_rate, config.ogg_page_latency_ms)
        self.pool: EnginePool | None = None
        self.state = "loading"
        self.error: str | None = None
        self.created = int(time.time())
        self._executor: ThreadPoolExecutor | None = None
        self._rng = random.SystemRandom()
        self._live: set[WorkerStream] = set()
        self._lock = threading.Lock()
        self.metrics.watch(lambda: self.pool, lambda: self.ready, self.devices)

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def devices(self) -> list:
        return [slot.tts.device for slot in self.pool.slots] if self.pool else []

    def load(self) -> None:
        """Load and warm up the engines (blocking); the service is ready afterwards."""
        try:
            engines = self.loader()
            for i, tts in enumerate(engines):
                log.info("engine %d warmed up in %.1f s", i, warm_up(tts, self.config))
            self.pool = EnginePool(engines, self.config.max_concurrent, self.config.max_queue)
            self._executor = ThreadPoolExecutor(max_workers=self.pool.capacity + 1,
                                                thread_name_prefix="chatterbox-stream")
        except BaseException as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        self.state = "ready"
        log.info("ready: %d engine(s) on %s, formats %s", len(engines),
                 ", ".join(str(d) for d in self.devices()), ", ".join(self.formats))

    async def start(self) -> None:
        await asyncio.to_thread(self.load)

    def close(self) -> None:
        with self._lock:
            live = list(self._live)
        for worker in live:
            worker.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def require_ready(self) -> None:
        if not self.ready:
            message = "the model failed to load" if self.state == "failed" else "the model is still loading"
            raise APIError(503, message, code="model_not_ready",
                           headers={"Retry-After": str(self.config.retry_after_s)})

    # ------------------------------------------------------------------ names
    @property
    def families(self) -> tuple[str, ...]:
        """The model families served, the default (OpenAI's model names) first."""
        return self.pool.families if self.pool is not None else self._declared

    def model_names(self) -> dict[str, str]:
        """Every model name requests may use -> the family that serves it."""
        return self.config.served_names(self.families)

    def resolve_model(self, name: str) -> str:
        """A model name -> its family (404 for a model this server does not serve)."""
        names = self.model_names()
        if name not in names:
            raise APIError(404, f"model {name!r} does not exist; this server serves {', '.join(names)}",
                           param="model", code="model_not_found")
        return names[name]

    def _model(self, family: str):
        """The first loaded model of ``family`` (its tokenizer, engine and built-in voice)."""
        return self.pool.first(family).tts

    def _builtin_available(self, family: str | None = None) -> bool:
        """Whether ``family`` (None: any family served) has a built-in voice."""
        if self.pool is None:
            return False
        return any(self._model(f).conds is not None for f in ((family,) if family else self.pool.families))

    def resolve_voice(self, name: str, family: str = DEFAULT_FAMILY) -> str:
        """A voice name or id -> the built-in voice's id or the id of a stored voice made for ``family``
        (404 when there is none, 400 when it was made for another family). A stored voice that carries
        an OpenAI voice name stands in for the built-in voice of its own family only."""
        builtin = self.config.default_voice
        stored = None if name == builtin else self.voices.find(name)
        if stored is not None and stored.family == family:
            return stored.id
        if stored is not None and name not in self.config.openai_voices:
            raise APIError(400, f"voice {stored.name!r} was made for the model "
                                f"{self.config.family_model_name(stored.family)} and cannot speak for "
                                f"{self.config.family_model_name(family)} (each model makes its own voices: upload "
                                f"the reference again with model={self.config.family_model_name(family)})",
                           param="voice", code="voice_model_mismatch")
        if name == builtin or name in self.config.openai_voices:
            if not self._builtin_available(family):
                raise APIError(404, f"the {self.config.family_model_name(family)} checkpoint has no built-in "
                                    "voice; upload one with POST /v1/voices", param="voice", code="voice_not_found")
            return builtin
        raise APIError(404, f"voice {name!r} not found (GET /v1/voices lists them)", param="voice",
                       code="voice_not_found")

    def builtin_voice(self) -> VoiceInfo:
        shadowed = {v.name for v in self.voices.list()}
        aliases = [n for n in self.config.openai_voices if n not in shadowed]
        models = [self.config.family_model_name(f) for f in self.families if self._builtin_available(f)]
        return VoiceInfo(id=self.config.default_voice, name=self.config.default_voice, created_at=self.created,
                         source={"aliases": aliases, "models": models}, built_in=True, family=None)

    def list_voices(self) -> list[VoiceInfo]:
        return ([self.builtin_voice()] if self._builtin_available() else []) + self.voices.list()

    def get_voice(self, voice_id: str) -> VoiceInfo:
        if voice_id == self.config.default_voice and self._builtin_available():
            return self.builtin_voice()
        try:
            return self.voices.get(voice_id)
        except VoiceNotFound:
            raise APIError(404, f"voice {voice_id!r} not found", param="voice_id", code="voice_not_found") from None

    # ------------------------------------------------------------------ speech
    def plan(self, params: SpeechParams, arrived: float) -> SpeechJob:
        """Validate a speech request against this server (400/404) and resolve its names."""
        self.require_ready()
        family = self.resolve_model(params.model)
        fmt = check_values(params, self.config, self.formats)
        voice = self.resolve_voice(params.voice_name, family)
        engine = self._model(family).engine
        try:
            engine.text_segments(params.input)
        except ValueError as exc:
            raise APIError(400, str(exc), param="input", code="invalid_input") from None
        seed = params.seed if params.seed is not None else self._rng.randrange(SEED_RANGE)
        return SpeechJob(request=synthesis_request(params, self.config, seed, family), family=family, voice=voice,
                         response_format=fmt,
                         stream_format=params.stream_format, input_tokens=engine.count_text_tokens(params.input),
                         instructions_ignored=bool(params.instructions), arrived=arrived)

    async def admit(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                    family: str | None = None) -> Lease:
        """A slot on the least-loaded engine of ``family`` (None: any), waiting in the queue if needed
        (429 when it is full; ``ClientGone`` when ``is_disconnected()`` turns true while waiting)."""
        task = asyncio.ensure_future(self.pool.acquire(family))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.disconnect_poll_s)
                if done:
                    lease = task.result()
                    self.metrics.queue_wait.observe(lease.queued_s)
                    return lease
                if is_disconnected is not None and await is_disconnected():
                    task.cancel()
                    raise ClientGone()
        except QueueFull as exc:
            raise APIError(429, f"the server is busy ({exc}); retry shortly", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def open(self, job: SpeechJob,
                   is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> SpeechStream:
        """Admit ``job`` and start it; its audio comes from the returned stream's ``chunks()``."""
        stored = None
        if job.voice != self.config.default_voice:
            try:
                stored = await asyncio.to_thread(self.voices.conditionals, job.voice)
            except VoiceNotFound:
                raise APIError(404, f"voice {job.voice!r} was deleted", param="voice", code="voice_not_found") from None
        lease = await self.admit(is_disconnected, job.family)
        engine = lease.slot.tts.engine
        conds = stored if stored is not None else lease.slot.tts.conds
        worker: WorkerStream | None = None

        def done() -> None:
            with self._lock:
                self._live.discard(worker)
            self.pool.release_threadsafe(lease)

        worker = WorkerStream(lambda: engine.session(job.request, conds).stream(), self._executor, on_done=done)
        with self._lock:
            self._live.add(worker)
        worker.start()
        return SpeechStream(self, job, lease, worker)

    # ------------------------------------------------------------------ voices
    async def create_voice(self, name: str, audio: np.ndarray, sample_rate: int, source: dict,
                           model: str | None = None) -> VoiceInfo:
        """Make a voice for ``model`` (default: the default model) from reference audio ((L,) or (L, C)
        float32) on the least-loaded engine of its family, and store it with the family."""
        self.require_ready()
        family = self.families[0] if model is None else self.resolve_model(model)
        try:
            name = check_name(name, self.config.max_voice_name_chars, (self.config.default_voice,))
        except ValueError as exc:
            raise APIError(400, str(exc), param="name", code="invalid_name") from None
        if self.voices.find(name) is not None:
            raise APIError(409, f"a voice named {name!r} already exists", param="name", code="voice_exists")
        lease = await self.admit(family=family)
        exaggeration = SynthesisRequest("", **request_defaults(family)).exaggeration
        try:
            engine = lease.slot.tts.engine
            conds = await asyncio.to_thread(engine.prepare_conditionals, audio, exaggeration, sample_rate)
        except ValueError as exc:
            raise APIError(400, f"the uploaded audio cannot be used as a voice: {exc}", param="file",
                           code="invalid_audio") from None
        finally:
            self.pool.release(lease)
        try:
            return await asyncio.to_thread(self.voices.create, name, conds, source, family)
        except VoiceNameTaken as exc:
            raise APIError(409, str(exc), param="name", code="voice_exists") from None

    def delete_voice(self, voice_id: str) -> VoiceInfo:
        if voice_id == self.config.default_voice:
            raise APIError(400, "the built-in voice cannot be deleted", param="voice_id", code="voice_built_in")
        try:
            return self.voices.delete(voice_id)
        except VoiceNotFound:
            raise APIError(404, f"voice {voice_id!r} not found", param="voice_id", code="voice_not_found") from None
