"""The request bodies, validated at the edge: first their shape (pydantic, a 422 naming the field),
then their values (a 400 naming the parameter), before anything reaches an engine."""
from __future__ import annotations

import json
import math
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from ..engine.request import MAX_SEED, SynthesisRequest
from ..family import DEFAULT_FAMILY, request_defaults
from .config import ServerConfig
from .errors import APIError, validation_error

Number = Annotated[float, Field(allow_inf_nan=False)]
STREAM_FORMATS = ("audio", "sse")
SUPPORTED_SPEED = 1.0
# The Chatterbox extras that tune sampling; a request that leaves one out gets its model's default.
SAMPLING_FIELDS = ("exaggeration", "cfg_weight", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class VoiceRef(BaseModel):
    """OpenAI's object form of ``voice``: ``{"id": "voice_..."}``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str


class SpeechParams(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's fields, then Chatterbox's extras (None: the model's default,
    ``chatterbox.family.request_defaults``; Turbo and Nano ignore exaggeration, cfg_weight and min_p)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: str
    voice: Union[str, VoiceRef]
    instructions: str | None = None
    response_format: str | None = None
    speed: Number = SUPPORTED_SPEED
    stream_format: str = "audio"
    exaggeration: Number | None = None
    cfg_weight: Number | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: int | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    seed: int | None = None
    max_new_tokens: int | None = None

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared)} bytes is larger than the limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


async def read_json_object(request: Request, limit: int) -> dict:
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


def parse_speech(body: dict) -> SpeechParams:
    try:
        return SpeechParams.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_values(params: SpeechParams, cfg: ServerConfig, formats: tuple[str, ...]) -> str:
    """Refuse values the server cannot honour (400, naming the parameter); returns the audio format."""
    if not params.input.strip():
        raise APIError(400, "input is empty: give the text to speak", param="input", code="empty_input")
    if len(params.input) > cfg.max_input_chars:
        raise APIError(400, f"input is {len(params.input)} characters long; this server accepts at most "
                            f"{cfg.max_input_chars}", param="input", code="input_too_long")
    fmt = params.response_format
    if fmt is None:
        fmt = cfg.default_format if cfg.default_format in formats else cfg.fallback_format
    if fmt not in formats:
        raise APIError(400, f"response_format {fmt!r} is not supported here; supported formats: "
                            f"{', '.join(formats)}", param="response_format", code="unsupported_format")
    if params.stream_format not in STREAM_FORMATS:
        raise APIError(400, f"stream_format must be one of {', '.join(STREAM_FORMATS)}, got "
                            f"{params.stream_format!r}", param="stream_format", code="invalid_value")
    if not math.isclose(params.speed, SUPPORTED_SPEED):
        raise APIError(400, f"speed {params.speed} is not supported: this server speaks at speed "
                            f"{SUPPORTED_SPEED} only", param="speed", code="unsupported_value")
    for name in ("exaggeration", "cfg_weight"):
        if getattr(params, name) is not None and getattr(params, name) < 0:
            raise APIError(400, f"{name} must be >= 0, got {getattr(params, name)}", param=name,
                           code="invalid_value")
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise APIError(400, f"seed must be in [0, {MAX_SEED}], got {params.seed}", param="seed",
                       code="invalid_value")
    if params.max_new_tokens is not None and not 1 <= params.max_new_tokens <= cfg.max_new_tokens:
        raise APIError(400, f"max_new_tokens must be in [1, {cfg.max_new_tokens}] on this server, got "
                            f"{params.max_new_tokens}", param="max_new_tokens", code="invalid_value")
    return fmt


def synthesis_request(params: SpeechParams, cfg: ServerConfig, seed: int,
                      family: str = DEFAULT_FAMILY) -> SynthesisRequest:
    """The engine request for a model of ``family`` (its defaults fill the sampling settings the
    request leaves out); the engine's own checks (sampling ranges) become 400s naming the field."""
    given = {name: getattr(params, name) for name in SAMPLING_FIELDS if getattr(params, name) is not None}
    try:
        return SynthesisRequest(
            params.input, **{**request_defaults(family), **given},
            max_new_tokens=params.max_new_tokens or cfg.max_new_tokens, seed=seed, watermark=cfg.watermark,
            chunk_size=cfg.engine_chunk_size, context_window=cfg.context_window)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        raise APIError(400, message, param=field if field in SpeechParams.model_fields else None,
                       code="invalid_value") from None
