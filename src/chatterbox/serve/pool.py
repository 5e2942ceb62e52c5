"""Admission and placement: which engine runs a request, and whether it runs now, waits, or is refused.

Each engine takes up to ``max_concurrent`` requests at once. A request goes to the least-loaded engine
of its model family with a free slot (fewest running requests, then fewest started, so equal engines
take turns); when none is free it waits in one FIFO queue of at most ``max_queue`` requests (a slot
that frees goes to the first waiter of that slot's family), and past that it is refused
(``QueueFull``, a 429). State lives on the event loop's thread; worker threads hand slots
back through ``release_threadsafe``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..family import DEFAULT_FAMILY

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every engine is busy and the queue is full."""


@dataclass(eq=False)
class EngineSlot:
    """One engine (a ``ChatterboxTTS``) and its load."""

    index: int
    tts: Any
    capacity: int
    active: int = 0
    started: int = 0

    @property
    def family(self) -> str:
        return getattr(self.tts, "family", DEFAULT_FAMILY)

    @property
    def name(self) -> str:
        return f"{self.tts.device}#{self.index}"


@dataclass
class Lease:
    """A slot held by one request; hand it back with ``EnginePool.release``."""

    slot: EngineSlot
    queued_s: float = 0.0
    released: bool = field(default=False, repr=False)


class EnginePool:
    def __init__(self, engines: list, max_concurrent: int, max_queue: int) -> None:
        if not engines:
            raise ValueError("the pool needs at least one engine")
        self.slots = [EngineSlot(i, tts, max_concurrent) for i, tts in enumerate(engines)]
        self.max_queue = max_queue
        # (family or None for any engine, future): the requests waiting for a slot, oldest first
        self._waiters: collections.deque[tuple[str | None, asyncio.Future]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> int:
        return sum(s.active for s in self.slots)

    @property
    def queued(self) -> int:
        return sum(1 for _, f in self._waiters if not f.done())

    @property
    def families(self) -> tuple[str, ...]:
        """The model families served, in the order their first engine was given."""
        return tuple(dict.fromkeys(s.family for s in self.slots))

    def first(self, family: str) -> EngineSlot | None:
        return next((s for s in self.slots if s.family == family), None)

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.slots)

    def _pick(self, family: str | None = None) -> EngineSlot | None:
        free = [s for s in self.slots if s.active < s.capacity and (family is None or s.family == family)]
        return min(free, key=lambda s: (s.active / s.capacity, s.active, s.started, s.index)) if free else None

    def _grant(self, slot: EngineSlot, queued_s: float = 0.0) -> Lease:
        slot.active += 1
        slot.started += 1
        return Lease(slot, queued_s)

    def _waiting(self, family: str | None) -> bool:
        """Whether a request that ``family``'s slots could serve is already waiting."""
        return any(not f.done() and (family is None or want is None or want == family) for want, f in self._waiters)

    def try_acquire(self, family: str | None = None) -> Lease | None:
        """A slot of ``family`` (None: any) now if one is free and nobody it could serve is waiting,
        else None (never queues)."""
        slot = None if self._waiting(family) else self._pick(family)
        return self._grant(slot) if slot is not None else None

    async def acquire(self, family: str | None = None) -> Lease:
        """A slot on an engine of ``family`` (None: any), waiting in the queue when they are all busy;
        ``QueueFull`` when the queue is too. Cancelling the wait leaves the queue (or hands back a slot
        granted meanwhile)."""
        if family is not None and self.first(family) is None:
            raise ValueError(f"no engine serves the model family {family!r}")
        self._loop = asyncio.get_running_loop()
        lease = self.try_acquire(family)
        if lease is not None:
            return lease
        if self.queued >= self.max_queue:
            raise QueueFull(f"all {self.capacity} slots are busy and {self.queued} requests are queued")
        start = time.perf_counter()
        fut: asyncio.Future = self._loop.create_future()
        entry = (family, fut)
        self._waiters.append(entry)
        try:
            slot = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(Lease(fut.result()))
            else:
                self._forget(entry)
            raise
        return Lease(slot, time.perf_counter() - start)

    def _forget(self, entry: tuple[str | None, asyncio.Future]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        lease.slot.active -= 1
        self._wake()

    def release_threadsafe(self, lease: Lease) -> None:
        """``release`` from any thread (the worker that ran the request)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.release(lease)
            return
        try:
            loop.call_soon_threadsafe(self.release, lease)
        except RuntimeError:  # the loop stopped while the worker finished: nothing waits any more
            self.release(lease)

    def _wake(self) -> None:
        """Hand free slots to the waiters, oldest first; a waiter whose family has no free slot keeps
        its place without holding up the others."""
        for entry in list(self._waiters):
            family, fut = entry
            if fut.done():
                self._forget(entry)
                continue
            slot = self._pick(family)
            if slot is None:
                continue
            self._forget(entry)
            slot.active += 1
            slot.started += 1
            fut.set_result(slot)

    def describe(self) -> list[dict]:
        return [{"engine": s.name, "model_family": s.family, "active": s.active, "capacity": s.capacity,
                 "started": s.started} for s in self.slots]
