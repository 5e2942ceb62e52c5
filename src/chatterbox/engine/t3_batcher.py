"""Continuous batching of T3: one thread steps every running request together.

Requests join and leave at token granularity. ``start`` (in the caller's thread) embeds the prompt and
allocates the request's KV cache, then queues it; the batcher thread admits at most one newcomer per
iteration (its prefill, one captured graph: the others' decode waits for one prefill at most), then
advances up to ``max_batch`` running requests by one token in one replay of the graphed runner
(``SlotRunner.step_rows``; more requests than that take turns). Each request's consumer reads its
tokens from its slot's history as they become available (``T3Stream``), so a slow consumer never
slows the others. A request leaves when it reaches its token budget, when the batcher sees its stop
token (checked one block late, without stalling the device), or when its consumer closes it; its
slot and KV cache are given back then.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .slot_runner import Admission, Row, SlotRunner, T3Request
from .t3_stream import T3Stream

log = logging.getLogger(__name__)

# When a request waits for a slot held outside the batcher, look again after this long.
SLOT_POLL_S = 0.005


@dataclass(eq=False)
class _Live:
    adm: Admission
    row: Row | None = None
    steps_done: int = 0  # steps queued on the device (their tokens are readable in stream order)
    finished: bool = False  # no more steps (budget, stop token, cancel or error)
    cancelled: bool = False
    error: BaseException | None = None
    checked: int = 0  # tokens already looked at for a stop token
    pending_check: tuple | None = field(default=None, repr=False)  # (offset, host value, event)
    tokens: Tensor | None = None  # the request's tokens, copied out of its slot when it left


class T3Batcher:
    def __init__(self, runner: SlotRunner, block_size: int) -> None:
        self.runner = runner
        self.block_size = block_size
        self.stop_token = runner.t3.cfg.stop_speech_token
        self._cond = threading.Condition()
        self._pending: deque[_Live] = deque()
        self._active: list[_Live] = []
        self._turn = 0  # round-robin start when more requests run than one step takes
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode replays so far (for metrics)
        self.rows = 0  # request-steps so far (tokens generated; rows / steps is the mean batch)
        self.busy_s = 0.0  # host time spent admitting and stepping (queueing device work)

    # ------------------------------------------------------------------ requests
    def start(self, req: T3Request) -> T3Stream:
        adm = self.runner.prepare(req)
        live = _Live(adm)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine's T3 batcher is closed")
            self._pending.append(live)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="t3-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return T3Stream(lambda start, n: self._produce(live, start, n), adm.steps, req.block_size, self.stop_token,
                        self.runner.device, on_close=lambda: self._cancel(live),
                        first_may_stop=self.runner.first_may_stop)

    def _produce(self, live: _Live, start: int, n: int) -> Tensor:
        with self._cond:
            while live.steps_done < start + n and not live.finished:
                self._cond.wait()
            if live.error is not None:
                raise RuntimeError(f"T3 generation failed: {live.error}") from live.error
            m = min(live.steps_done, start + n) - start
            if m <= 0 or live.row is None:
                return torch.zeros(1, 0, dtype=torch.long, device=self.runner.device)
            # copied under the lock: queued before any later request can take the slot over
            source = live.tokens[None] if live.tokens is not None else self.runner.pool.history[live.row.slot][None]
            return source[:, start:start + m].clone()  # (1, m)

    def _cancel(self, live: _Live) -> None:
        with self._cond:
            live.cancelled = True
            live.finished = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._active)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._retire()
                if not self._active and not self._pending:
                    self._thread = None  # idle: the next request starts a new thread (none outlives its engine)
                    self._cond.notify_all()
                    return
                if self._closed:
                    for live in list(self._active) + list(self._pending):
                        live.finished = True
                    self._retire()
                    self._cond.notify_all()
                    return
                newcomer = self._pending.popleft() if self._pending and self.runner.free_slots else None
                rows = self._choose()
            if newcomer is None and not rows:
                with self._cond:
                    self._cond.wait(SLOT_POLL_S)
                continue
            began = time.perf_counter()
            try:
                if newcomer is not None:
                    self._admit(newcomer)
                if rows:
                    self._step(rows)
            except BaseException as exc:  # a device error: every running request learns of it
                log.exception("T3 batcher step failed")
                with self._cond:
                    for live in self._active + ([newcomer] if newcomer is not None else []):
                        live.error, live.finished = exc, True
                    self._cond.notify_all()
            self.busy_s += time.perf_counter() - began

    def _admit(self, live: _Live) -> None:
        slot = self.runner.acquire(block=False)
        if slot is None:  # taken meanwhile: back to the front of the queue
            with self._cond:
                self._pending.appendleft(live)
            return
        try:
            live.row = self.runner.admit(live.adm, slot)
        except BaseException:
            self.runner.release(slot)
            raise
        with self._cond:
            self._active.append(live)
            if live.cancelled:
                live.finished = True

    def _choose(self) -> list[_Live]:
        """Running requests that still step, at most one step's worth, taking turns (under the lock)."""
        ready = [live for live in self._active if not live.finished]
        if len(ready) <= self.runner.max_batch:
            return ready
        start = self._turn % len(ready)
        self._turn += self.runner.max_batch
        return (ready[start:] + ready[:start])[:self.runner.max_batch]

    def _step(self, lives: list[_Live]) -> None:
        groups: dict[object, list[_Live]] = {}
        for live in lives:
            groups.setdefault(self.runner.step_group(live.row.proc), []).append(live)
        for group in groups.values():
            self.runner.step_rows([live.row for live in group])
            self.steps += 1
            self.rows += len(group)
        with self._cond:
            for live in lives:
                live.steps_done += 1
                if live.steps_done >= live.adm.steps:
                    live.finished = True
                self._check_stop(live)
            self._cond.notify_all()

    def _check_stop(self, live: _Live) -> None:
        """Look for the stop token one block at a time, read when the copy has landed (no stall)."""
        if live.pending_check is not None:
            offset, host, event = live.pending_check
            if event is None or event.query():
                live.pending_check = None
                stop = int(host)
                if stop >= 0:
                    live.finished = True
                    live.steps_done = min(live.steps_done, offset + stop + 1)
                    return
        if live.pending_check is None and live.steps_done - live.checked >= self.block_size:
            start, live.checked = live.checked, live.steps_done
            block = self.runner.pool.history[live.row.slot, start:live.steps_done]
            hit = block == self.stop_token
            if start == 0 and not self.runner.first_may_stop:
                hit[0] = False
            first = torch.where(hit.any(), hit.int().argmax(), -1)
            if block.is_cuda:
                host = torch.empty((), dtype=torch.long, pin_memory=True)
                host.copy_(first, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                live.pending_check = (start, host, event)
            else:
                live.pending_check = (start, first, None)

    def _retire(self) -> None:
        """Give the slots and KV caches of finished requests back (under the lock). A request's tokens
        are copied out first (queued before any newcomer's steps), for a consumer still reading."""
        keep = []
        for live in self._active:
            if live.finished:
                if not live.cancelled and live.error is None:
                    live.tokens = self.runner.pool.history[live.row.slot, :live.steps_done].clone()
                self.runner.release(live.row.slot)
                live.adm.cache = None
            else:
                keep.append(live)
        self._active = keep
        self._pending = deque(live for live in self._pending if not live.cancelled)
