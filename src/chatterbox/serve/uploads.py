"""Voice uploads: a size-limited multipart body, its fields, and the audio decoded and checked in
memory (nothing is written under the voices directory until the voice is made)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .config import ServerConfig
from .errors import APIError
from .protocol import read_body

FILE_FIELDS = ("file", "audio_sample")  # the second is the name OpenAI's voice uploads use
MAX_FORM_FIELDS = 8
MAX_FILENAME_CHARS = 255  # of the uploaded file's name, kept in voice.json


@dataclass(frozen=True)
class VoiceUpload:
    name: str
    audio: np.ndarray  # (L, C) float32
    sample_rate: int
    source: dict
    model: str | None = None  # the model the voice is for (None: the server's default model)


def _replay(body: bytes):
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def decode_audio(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, dict]:
    """Audio bytes -> ((L, C) float32 samples, sample rate, facts). 400 when it is not audio, is empty
    or is longer than ``max_seconds``."""
    if not data:
        raise APIError(400, "the uploaded file is empty", param="file", code="invalid_audio")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames, kind = f.samplerate, f.channels, f.frames, f.format
            if rate <= 0 or frames <= 0:
                raise APIError(400, "the uploaded file holds no audio samples", param="file", code="invalid_audio")
            if frames / rate > max_seconds:
                raise APIError(400, f"the uploaded audio is {frames / rate:.1f} s long; at most {max_seconds:g} s "
                                    "are accepted (the voice uses the first 10 s)", param="file",
                               code="audio_too_long")
            audio = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        readable = ", ".join(sorted(k.lower() for k in sf.available_formats()))
        raise APIError(400, f"the uploaded file is not audio this server can read ({exc}); readable formats: "
                            f"{readable}", param="file", code="invalid_audio") from None
    if audio.shape[0] == 0:
        raise APIError(400, "the uploaded file holds no audio samples", param="file", code="invalid_audio")
    facts = {"format": kind.lower(), "sample_rate": int(rate), "channels": int(channels),
             "duration_s": round(audio.shape[0] / rate, 3), "bytes": len(data)}
    return audio, int(rate), facts


async def read_voice_upload(request: Request, cfg: ServerConfig) -> VoiceUpload:
    """``POST /v1/voices``: multipart with ``name`` and ``file`` (or ``audio_sample``), and optionally
    ``model`` (the model whose front end makes the voice; the server's default model without it)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the voice as multipart/form-data with the fields 'name' and 'file'",
                       code="invalid_content_type")
    body = await read_body(request, cfg.max_upload_bytes)
    try:
        form = await Request(request.scope, _replay(body)).form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except MultiPartException as exc:
        raise APIError(400, f"malformed multipart body: {exc.message}", code="invalid_multipart") from None
    try:
        name = form.get("name")
        if not isinstance(name, str):
            raise APIError(400, "the form needs a text field 'name'", param="name", code="missing_field")
        model = form.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "the field 'model' must be text (a model name)", param="model", code="invalid_value")
        upload = next((form.get(f) for f in FILE_FIELDS if isinstance(form.get(f), UploadFile)), None)
        if upload is None:
            raise APIError(400, "the form needs a file field 'file' holding the reference audio", param="file",
                           code="missing_field")
        data = await upload.read()
        audio, rate, facts = decode_audio(data, cfg.max_voice_seconds)
        facts["filename"] = (upload.filename or "")[:MAX_FILENAME_CHARS]
        return VoiceUpload(name=name, audio=audio, sample_rate=rate, source=facts, model=model)
    finally:
        await form.close()
