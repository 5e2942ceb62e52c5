"""The HTTP face of the speech service: OpenAI's ``/v1/audio/speech`` and ``/v1/models``, a voices
API, ``/health`` and ``/metrics``. Routes validate, call the service, and turn its chunks into bytes
as they are made; the service knows nothing of HTTP."""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from .encoders import Encoder, make_encoder
from .errors import APIError, error_body, install_error_handlers
from .metrics import CONTENT_TYPE
from .protocol import parse_speech, read_json_object
from .service import ClientGone, SpeechService, SpeechStream
from .uploads import read_voice_upload

log = logging.getLogger(__name__)

INSTRUCTIONS_HEADER = "x-chatterbox-instructions"
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left while its request was queued
_ENDPOINTS = (("/v1/audio/speech", re.compile(r"^/v1/audio/speech$")),
              ("/v1/voices", re.compile(r"^/v1/voices/?$")),
              ("/v1/voices/{id}", re.compile(r"^/v1/voices/[^/]+$")),
              ("/v1/models", re.compile(r"^/v1/models/?$")),
              ("/v1/models/{id}", re.compile(r"^/v1/models/[^/]+$")),
              ("/health", re.compile(r"^/health$")),
              ("/metrics", re.compile(r"^/metrics$")))


def endpoint_label(path: str) -> str:
    return next((name for name, pattern in _ENDPOINTS if pattern.match(path)), "other")


class CancellableStreamingResponse(StreamingResponse):
    """Streams its body while listening for the client's disconnect, whatever ASGI version the server
    speaks, so a client that leaves cancels the body at once instead of at the next write."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke during a write
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


class RequestCounter:
    """ASGI middleware: counts every HTTP request by endpoint, method and status."""

    def __init__(self, app, service: SpeechService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.service.metrics.requests.labels(endpoint_label(scope["path"]), scope["method"],
                                                 str(status["code"])).inc()


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def audio_body(stream: SpeechStream, encoder: Encoder) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream.chunks():
            data = encoder.push(chunk.audio)
            if data:
                yield data
        tail = encoder.finish()
        if tail:
            yield tail
    except Exception:
        log.exception("speech stream failed on %s; the response is cut short", stream.engine)
        raise
    finally:
        stream.cancel()


async def sse_body(stream: SpeechStream, encoder: Encoder) -> AsyncIterator[bytes]:
    """``speech.audio.delta`` events (base64 of the format's bytes), then ``speech.audio.done`` with
    usage: input = text tokens, output = speech tokens."""
    try:
        async for chunk in stream.chunks():
            data = encoder.push(chunk.audio)
            if data:
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        tail = encoder.finish()
        if tail:
            yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(tail).decode()})
        usage = {"input_tokens": stream.job.input_tokens, "output_tokens": stream.tokens,
                 "total_tokens": stream.job.input_tokens + stream.tokens}
        yield _sse({"type": "speech.audio.done", "usage": usage})
    except Exception as exc:
        log.exception("speech stream failed on %s", stream.engine)
        yield _sse({"type": "error", **error_body(500, f"synthesis failed ({type(exc).__name__})")})
    finally:
        stream.cancel()


def _auth(service: SpeechService) -> Callable:
    keys = [k.encode() for k in service.config.api_keys]

    async def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not given or not any(hmac.compare_digest(given, k) for k in keys):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _v1_routes(service: SpeechService) -> APIRouter:
    cfg = service.config
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(service))])

    @router.post("/audio/speech")
    async def speech(request: Request) -> Response:
        arrived = time.perf_counter()
        params = parse_speech(await read_json_object(request, cfg.max_body_bytes))
        job = service.plan(params, arrived)
        try:
            stream = await service.open(job, request.is_disconnected)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        try:
            encoder = make_encoder(job.response_format, service.sample_rate, cfg.ogg_page_latency_ms)
            headers = {"x-chatterbox-seed": str(job.request.seed), "x-chatterbox-engine": stream.engine,
                       "cache-control": "no-cache"}
            if job.instructions_ignored:
                headers[INSTRUCTIONS_HEADER] = "ignored: this model takes no instructions"
            if job.stream_format == "sse":
                return CancellableStreamingResponse(sse_body(stream, encoder), media_type="text/event-stream",
                                                    headers=headers)
            return CancellableStreamingResponse(audio_body(stream, encoder), media_type=encoder.media_type,
                                                headers=headers)
        except BaseException:
            stream.cancel()
            raise

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model(service, name, family)
                                           for name, family in service.model_names().items()]}

    @router.get("/models/{model_id}")
    async def model(model_id: str) -> dict:
        return _model(service, model_id, service.resolve_model(model_id))

    @router.post("/voices")
    async def create_voice(request: Request) -> JSONResponse:
        service.require_ready()
        upload = await read_voice_upload(request, cfg)
        info = await service.create_voice(upload.name, upload.audio, upload.sample_rate, upload.source, upload.model)
        return JSONResponse(info.public(), status_code=201)

    @router.get("/voices")
    async def list_voices() -> dict:
        voices = await asyncio.to_thread(service.list_voices)
        return {"object": "list", "data": [v.public() for v in voices]}

    @router.get("/voices/{voice_id}")
    async def get_voice(voice_id: str) -> dict:
        return (await asyncio.to_thread(service.get_voice, voice_id)).public()

    @router.delete("/voices/{voice_id}")
    async def delete_voice(voice_id: str) -> dict:
        info = await asyncio.to_thread(service.delete_voice, voice_id)
        return {"id": info.id, "object": "voice.deleted", "deleted": True}

    return router


def _model(service: SpeechService, name: str, family: str) -> dict:
    """OpenAI's model object; ``root`` is the served model the name stands for."""
    return {"id": name, "object": "model", "created": service.created, "owned_by": "chatterbox",
            "root": service.config.family_model_name(family), "family": family}


def create_app(service: SpeechService, load_on_startup: bool = True,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app over ``service``. With ``load_on_startup`` the engines load in the background when
    the app starts (``/health`` answers 503 until they are warm); otherwise call ``service.load()``
    first."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if load_on_startup and service.state == "loading":
            async def load() -> None:
                try:
                    await service.start()
                except BaseException as exc:  # noqa: BLE001  (reported; the server cannot serve)
                    log.error("loading the model failed: %s", exc, exc_info=True)
                    if on_load_failure is not None:
                        on_load_failure(exc)

            task = asyncio.create_task(load())
        try:
            yield
        finally:
            service.close()
            if task is not None and not task.done():
                task.cancel()

    app = FastAPI(title="Chatterbox TTS", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(_v1_routes(service))

    @app.get("/health")
    async def health() -> JSONResponse:
        names = [service.config.family_model_name(f) for f in service.families]
        body = {"status": {"ready": "ok"}.get(service.state, service.state), "model": names[0], "models": names}
        if service.pool is not None:
            body["engines"] = service.pool.describe()
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(RequestCounter, service=service)
    return app
