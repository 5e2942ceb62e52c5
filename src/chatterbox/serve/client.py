"""Driving a running server and timing it: time to first audio (first body bytes) and total time per
request, alone or N at once. ``eval/serve_bench.py --http`` is meant to call ``run_concurrent``
against ``chatterbox-tts serve`` on the GPU and compare with the in-process figures; the tests use
``stream_speech`` too."""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import httpx

SPEECH_PATH = "/v1/audio/speech"
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class StreamTiming:
    status: int
    ttfa_s: float | None  # seconds from sending the request to the first body bytes
    total_s: float
    bytes: int
    pieces: int  # body pieces as they arrived
    headers: dict = field(default_factory=dict)
    body: bytes = b""


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stream_speech(base_url: str, payload: dict, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                  keep_body: bool = False) -> StreamTiming:
    """POST ``payload`` to ``/v1/audio/speech`` and read the streamed answer, timing its arrival."""
    body = bytearray()
    pieces = 0
    ttfa = None
    start = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        with client.stream("POST", SPEECH_PATH, json=payload, headers=_headers(api_key)) as response:
            for piece in response.iter_raw():
                if not piece:
                    continue
                ttfa = time.perf_counter() - start if ttfa is None else ttfa
                pieces += 1
                body.extend(piece)
            status, headers = response.status_code, dict(response.headers)
    return StreamTiming(status, ttfa, time.perf_counter() - start, len(body), pieces, headers,
                        bytes(body) if keep_body else b"")


async def astream_speech(client: httpx.AsyncClient, payload: dict, api_key: str | None = None) -> StreamTiming:
    size = pieces = 0
    ttfa = None
    start = time.perf_counter()
    async with client.stream("POST", SPEECH_PATH, json=payload, headers=_headers(api_key)) as response:
        async for piece in response.aiter_raw():
            if not piece:
                continue
            ttfa = time.perf_counter() - start if ttfa is None else ttfa
            pieces += 1
            size += len(piece)
        status, headers = response.status_code, dict(response.headers)
    return StreamTiming(status, ttfa, time.perf_counter() - start, size, pieces, headers)


async def run_concurrent(base_url: str, payload: dict, n: int, api_key: str | None = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> list[StreamTiming]:
    """``n`` identical requests at once (one connection each)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        return list(await asyncio.gather(*(astream_speech(client, payload, api_key) for _ in range(n))))


def summarize(timings: list[StreamTiming]) -> dict:
    """p50/p95 of time to first audio and total time over the successful requests."""
    ok = [t for t in timings if t.status == 200 and t.ttfa_s is not None]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    ttfa = [t.ttfa_s for t in ok]
    total = [t.total_s for t in ok]
    return {"requests": len(timings), "ok": len(ok), "ttfa_p50_s": pct(ttfa, 0.5), "ttfa_p95_s": pct(ttfa, 0.95),
            "total_p50_s": pct(total, 0.5), "ttfa_mean_s": statistics.fmean(ttfa) if ttfa else None}
