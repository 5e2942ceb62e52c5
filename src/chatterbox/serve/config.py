"""What the server is and what it allows: ``ModelSpec`` (which weights, on which devices, with which
``OptConfig``) and ``ServerConfig`` (limits, streaming schedule, names), both frozen with a preset.
Every number the server uses lives here; the rest of the package reads it from these objects."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.request import SynthesisRequest
from ..family import DEFAULT_FAMILY, check_family

MODEL_SOURCES = ("synthetic", "pretrained", "local", "tiny")
# OpenAI's built-in voice names: a request naming one gets the default voice unless a stored voice
# carries that name.
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
# Model names OpenAI clients send; they are served by the server's default model (the first loaded).
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
API_KEYS_ENV = "CHATTERBOX_API_KEYS"
MIB = 1024 * 1024


def default_voices_dir() -> Path:
    """``$XDG_DATA_HOME/chatterbox/voices`` (``~/.local/share/chatterbox/voices`` without it)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "chatterbox" / "voices"


def keys_from_env(environ: dict | None = None) -> tuple[str, ...]:
    """API keys from ``CHATTERBOX_API_KEYS`` (comma or whitespace separated)."""
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return tuple(k for k in raw.replace(",", " ").split() if k)


@dataclass(frozen=True)
class ModelSpec:
    """Which model each engine loads. ``family``: ``original``, ``turbo`` or ``nano``; ``source``:
    ``synthetic`` (full size, weights are noise, not speech), ``pretrained`` (the published checkpoint
    from the hub), ``local`` (``ckpt`` directory) or ``tiny`` (tiny random models for tests). One
    engine is built per entry of ``devices``; a server loads one spec per model family it serves."""

    source: str = "synthetic"
    ckpt: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    opt: str = "reference"
    family: str = DEFAULT_FAMILY
    # with the opt's s3gen_scheduling: streamed chunks of up to this many requests share one CFM call
    s3gen_batch: int = 1

    def __post_init__(self) -> None:
        check_family(self.family)
        if self.s3gen_batch < 1:
            raise ValueError(f"s3gen_batch must be >= 1, got {self.s3gen_batch}")
        if self.source not in MODEL_SOURCES:
            raise ValueError(f"source must be one of {MODEL_SOURCES}, got {self.source!r}")
        if (self.source == "local") != (self.ckpt is not None):
            raise ValueError("a checkpoint directory is given exactly when source is 'local'")
        if not self.devices or any(not d for d in self.devices):
            raise ValueError(f"devices must name at least one device, got {self.devices!r}")

    @classmethod
    def published(cls, device: str = "cpu") -> "ModelSpec":
        return cls(source="pretrained", devices=(device,))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    voices_dir: str = field(default_factory=lambda: str(default_voices_dir()))
    # Requests synthesising at once on one engine, and requests waiting for a slot across all engines
    # (one more is refused with 429).
    max_concurrent: int = 4
    max_queue: int = 64
    max_input_chars: int = 4096
    # Server-wide cap on speech tokens per text segment (25 tokens = 1 s of audio).
    max_new_tokens: int = 1000
    # Streaming schedule: speech tokens per chunk (the last value repeats) and the flow's left context.
    chunk_size: tuple[int, ...] = (25,)
    context_window: int = 50
    watermark: bool | None = None  # None: watermark when resemble-perth is installed
    max_body_bytes: int = 1 * MIB  # JSON request bodies
    max_upload_bytes: int = 20 * MIB  # voice uploads (the whole multipart body)
    max_voice_seconds: float = 120.0  # of reference audio in an upload
    max_voice_name_chars: int = 64
    voice_cache_size: int = 64  # stored voices kept in memory
    stale_upload_s: float = 3600.0  # interrupted voice writes older than this are swept at start
    retry_after_s: int = 1  # Retry-After of a 429 or 503
    shutdown_grace_s: float = 5.0  # running streams get this long to finish when the server stops
    disconnect_poll_s: float = 0.25  # how often a queued request checks that its client is still there
    model_name: str = "chatterbox"
    model_aliases: tuple[str, ...] = OPENAI_MODELS
    openai_voices: tuple[str, ...] = OPENAI_VOICES
    default_voice: str = "default"
    # Preferred default response format, and the one used when libsndfile cannot encode it.
    default_format: str = "mp3"
    fallback_format: str = "wav"
    ogg_page_latency_ms: float = 100.0  # Opus: Ogg pages are flushed at least this often
    warmup_text: str = "Warming up the engine."
    warmup_tokens: int = 8
    ttfa_buckets_s: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_input_chars", "max_new_tokens", "max_body_bytes", "max_upload_bytes",
                     "max_voice_name_chars", "voice_cache_size", "retry_after_s", "warmup_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_voice_seconds <= 0 or self.disconnect_poll_s <= 0 or self.ogg_page_latency_ms <= 0:
            raise ValueError("max_voice_seconds, disconnect_poll_s and ogg_page_latency_ms must be > 0")
        if self.default_voice in self.openai_voices:
            raise ValueError("default_voice must not be one of the OpenAI voice names")
        # the streaming schedule is checked the way the engine checks it
        SynthesisRequest("", chunk_size=self.chunk_size, context_window=self.context_window)

    @classmethod
    def published(cls) -> "ServerConfig":
        return cls()

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)

    def family_model_name(self, family: str) -> str:
        """The name requests use for ``family``: ``model_name`` for the original model, then
        ``model_name-turbo`` and ``model_name-nano``."""
        return self.model_name if check_family(family) == DEFAULT_FAMILY else f"{self.model_name}-{family}"

    def served_names(self, families: tuple[str, ...]) -> dict[str, str]:
        """Every model name a server of ``families`` answers to -> its family: each family's own name,
        then OpenAI's names for the first (the default)."""
        names = {self.family_model_name(f): f for f in families}
        for alias in self.model_aliases:
            names.setdefault(alias, families[0])
        return names

    @property
    def engine_chunk_size(self) -> int | tuple[int, ...]:
        """``chunk_size`` as ``SynthesisRequest`` takes it (an int, or a schedule)."""
        return self.chunk_size[0] if len(self.chunk_size) == 1 else self.chunk_size

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)
