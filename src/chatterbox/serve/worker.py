"""One request's synchronous audio stream, run in a worker thread and read from the event loop.

The engine's ``Session.stream()`` is a plain generator that computes each chunk when asked. The
worker thread drives it and hands every chunk to the loop; the loop side iterates them
asynchronously. Cancelling (the client went away) sets a flag that the worker checks after every
chunk: it then closes the generator itself, since a generator cannot be closed from another thread
while it runs, which stops the request and frees its engine state. So a cancelled request holds its
slot for at most the chunk being computed when the flag was set; ``on_done`` runs once the
generator is closed, and hands the slot back.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

_CHUNK, _END, _ERROR = "chunk", "end", "error"


@dataclass(frozen=True)
class Chunk:
    audio: np.ndarray  # (n,) float32 samples
    tokens: int  # speech tokens behind this chunk


class WorkerStream:
    def __init__(self, open_stream: Callable[[], Iterator], executor: Executor,
                 on_done: Callable[[], None] | None = None) -> None:
        """``open_stream()`` is called in the worker and returns the generator of ``(audio (1, n), metrics)``."""
        self._open_stream = open_stream
        self._executor = executor
        self._on_done = on_done
        self._cancel = threading.Event()
        self.finished = threading.Event()
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.chunks_made = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._executor.submit(self._run)

    def cancel(self) -> None:
        self._cancel.set()

    def _post(self, kind: str, item=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop is gone (shutdown): nobody reads any more
            self._cancel.set()

    def _run(self) -> None:
        gen = None
        completed = False
        try:
            if self._cancel.is_set():
                return
            gen = self._open_stream()
            for audio, metrics in gen:
                if self._cancel.is_set():
                    break
                tokens = metrics.chunks[-1].tokens if metrics.chunks else 0
                self.chunks_made += 1
                self._post(_CHUNK, Chunk(audio.reshape(-1).numpy(), tokens))
                if self._cancel.is_set():
                    break
            else:
                completed = True
                self._post(_END)
        except BaseException as exc:  # noqa: BLE001  (handed to the reader, which reports it)
            self._post(_ERROR, exc)
        finally:
            try:
                if gen is not None:
                    gen.close()
            except Exception:  # noqa: BLE001
                log.exception("closing a cancelled stream failed")
            self.finished.set()
            if self._on_done is not None:
                self._on_done()
            if not completed and self._cancel.is_set():
                log.info("request cancelled after %d chunks; its slot is free", self.chunks_made)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The chunks as they are made. Leaving the loop early (or being cancelled) cancels the request."""
        try:
            while True:
                kind, item = await self._queue.get()
                if kind == _CHUNK:
                    yield item
                elif kind == _END:
                    return
                else:
                    raise item
        finally:
            self._cancel.set()
