"""Audio encoders that turn float32 chunks into response bytes as they are made.

* ``pcm``: 16-bit little-endian mono samples, nothing else.
* ``wav``: a RIFF header whose sizes say "unknown length" (0xFFFFFFFF, as streaming servers send),
  then 16-bit PCM; readers take the length from the data that arrives.
* ``mp3``, ``opus`` (Ogg): libsndfile writing into memory; the bytes it has produced are sent after
  every chunk. MP3 is constant bit rate, so readers estimate its length right without the header
  frame libsndfile rewrites on close (that rewrite is dropped). Ogg pages are flushed every
  ``ogg_page_latency_ms``.
* ``flac``: sent whole when synthesis ends. A FLAC stream states its length in its first bytes,
  and libsndfile (hence ``soundfile``) cannot read a FLAC of unknown length.

Which of them the installed libsndfile can encode is found once, by encoding a few samples
(``available_formats``); a request for another is refused with the list of those that work.
"""
from __future__ import annotations

import logging
import struct

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

# name -> (soundfile format, subtype, media type, streamed)
_SOUNDFILE_FORMATS = {
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg", True),
    "opus": ("OGG", "OPUS", "audio/ogg", True),
    "flac": ("FLAC", "PCM_16", "audio/flac", False),
}
MEDIA_TYPES = {"pcm": "audio/pcm", "wav": "audio/wav",
               **{name: spec[2] for name, spec in _SOUNDFILE_FORMATS.items()}}
FORMAT_ORDER = ("mp3", "opus", "wav", "pcm", "flac")
# libsndfile's command numbers (sndfile.h), not exported by the soundfile package.
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302
_PCM_FULL_SCALE = 32767.0
_UNKNOWN_SIZE = 0xFFFFFFFF
_PROBE_SAMPLES = 2400
# libsndfile applies the MP3 bit-rate mode only together with a compression level; 0.5 gives a
# constant 64 kbit/s at 24 kHz.
_MP3_COMPRESSION_LEVEL = 0.5


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] -> 16-bit little-endian integers (every format encodes these, so
    the lossless ones carry exactly the samples ``pcm`` does)."""
    return (np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0) * _PCM_FULL_SCALE).astype("<i2")


def to_pcm16(audio: np.ndarray) -> bytes:
    return to_int16(audio).tobytes()


def wav_stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte RIFF/WAVE header for PCM of unknown length."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", _UNKNOWN_SIZE))


class Encoder:
    """``push(chunk) -> bytes`` for each chunk, then ``finish() -> bytes``; either may be empty."""

    media_type = "application/octet-stream"

    def push(self, audio: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class PCMEncoder(Encoder):
    media_type = MEDIA_TYPES["pcm"]

    def push(self, audio: np.ndarray) -> bytes:
        return to_pcm16(audio)


class WavEncoder(PCMEncoder):
    media_type = MEDIA_TYPES["wav"]

    def __init__(self, sample_rate: int) -> None:
        self.header = wav_stream_header(sample_rate)

    def push(self, audio: np.ndarray) -> bytes:
        header, self.header = self.header, b""
        return header + to_pcm16(audio)

    def finish(self) -> bytes:  # no audio at all: still a valid (empty) WAV stream
        header, self.header = self.header, b""
        return header


class _Spool:
    """A file object for libsndfile that remembers which bytes were already handed out: writes behind
    that point (header rewrites on close) are kept in memory but never sent again."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.sent = 0

    def write(self, data) -> int:
        data = bytes(data)
        end = self.pos + len(data)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[self.pos:end] = data
        self.pos = end
        return len(data)

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else min(len(self.data), self.pos + size)
        out = bytes(self.data[self.pos:end])
        self.pos = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.data)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.data[self.sent:])
        self.sent = len(self.data)
        return out


class SoundFileEncoder(Encoder):
    def __init__(self, name: str, sample_rate: int, ogg_page_latency_ms: float) -> None:
        fmt, subtype, self.media_type, self.streamed = _SOUNDFILE_FORMATS[name]
        self.spool = _Spool()
        extra = {"bitrate_mode": "CONSTANT", "compression_level": _MP3_COMPRESSION_LEVEL} if fmt == "MP3" else {}
        self.file = sf.SoundFile(self.spool, mode="w", samplerate=sample_rate, channels=1, format=fmt,
                                 subtype=subtype, **extra)
        if fmt == "OGG":
            _set_ogg_page_latency(self.file, ogg_page_latency_ms)

    def push(self, audio: np.ndarray) -> bytes:
        self.file.write(to_int16(audio))
        return self.spool.take() if self.streamed else b""

    def finish(self) -> bytes:
        self.file.close()
        if self.streamed:
            return self.spool.take()
        return bytes(self.spool.data)


def _set_ogg_page_latency(file: sf.SoundFile, latency_ms: float) -> None:
    try:
        value = sf._ffi.new("double*", float(latency_ms))
        sf._snd.sf_command(file._file, _SFC_SET_OGG_PAGE_LATENCY_MS, value, sf._ffi.sizeof("double"))
    except (AttributeError, TypeError) as exc:  # an older soundfile: pages come when libsndfile fills them
        log.debug("cannot set the Ogg page latency: %s", exc)


def make_encoder(name: str, sample_rate: int, ogg_page_latency_ms: float) -> Encoder:
    if name == "pcm":
        return PCMEncoder()
    if name == "wav":
        return WavEncoder(sample_rate)
    if name in _SOUNDFILE_FORMATS:
        return SoundFileEncoder(name, sample_rate, ogg_page_latency_ms)
    raise ValueError(f"unknown audio format {name!r}")


def available_formats(sample_rate: int, ogg_page_latency_ms: float) -> tuple[str, ...]:
    """The formats that encode here, found by encoding a short tone in each."""
    tone = (0.1 * np.sin(np.arange(_PROBE_SAMPLES, dtype=np.float32) * 0.05)).astype(np.float32)
    usable = []
    for name in FORMAT_ORDER:
        try:
            enc = make_encoder(name, sample_rate, ogg_page_latency_ms)
            data = enc.push(tone) + enc.finish()
        except Exception as exc:  # noqa: BLE001  (libsndfile reports missing codecs in many ways)
            log.info("audio format %s is not available: %s", name, exc)
            continue
        if data:
            usable.append(name)
    return tuple(usable)
