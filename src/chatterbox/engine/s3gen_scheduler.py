"""One worker renders every request's streamed chunks, most urgent first, several at once.

Requests queue their next chunk (``render``) and wait for its audio. The worker takes the most urgent
chunk (a request's first chunk before any later one: time to first audio; then the earliest
deadline: the moment the audio already sent to that caller runs out) and, when ``max_batch`` > 1, the
next most urgent chunks of other requests, and renders them together: each request's flow
conditioning on its own, their CFM decodes in one batched call (frames padded to the longest, mask 0),
then each request's vocoder with its own exact state. A request has at most one chunk queued (it
waits for each), so its chunks stay in order.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from .chunks import ChunkTokens, SegmentRenderer

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Job:
    urgency: tuple  # (0 for a request's first chunk else 1, deadline in seconds, arrival order)
    renderer: SegmentRenderer = field(compare=False)
    chunk: ChunkTokens = field(compare=False)
    done: threading.Event = field(compare=False, default_factory=threading.Event)
    wav: torch.Tensor | None = field(compare=False, default=None)
    error: BaseException | None = field(compare=False, default=None)


class S3GenScheduler:
    def __init__(self, context: Callable[[], ContextManager], n_timesteps: int, max_batch: int = 1) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.context = context  # the engine's autograd mode and attention backend
        self.n_timesteps = n_timesteps
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._heap: list[_Job] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self.rendered = 0  # chunks rendered
        self.batches = 0  # worker rounds (several chunks each when batching)
        self.busy_s = 0.0  # worker time spent rendering (host side: queueing, and waiting where S3Gen syncs)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._heap)

    def render(self, renderer: SegmentRenderer, chunk: ChunkTokens, first: bool, deadline: float) -> torch.Tensor:
        """The chunk's waveform (1, n) on the device, trim fade applied; waits for its turn."""
        job = _Job((0 if first else 1, deadline, next(self._order)), renderer, chunk)
        with self._cond:
            heapq.heappush(self._heap, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="s3gen-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise RuntimeError(f"S3Gen rendering failed: {job.error}") from job.error
        return job.wav

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._heap:
                    self._thread = None  # idle: the next chunk starts a new worker
                    return
                jobs = [heapq.heappop(self._heap) for _ in range(min(self.max_batch, len(self._heap)))]
            began = time.perf_counter()
            try:
                with self.context():
                    self._run(jobs)
            except BaseException as exc:  # every chunk of the round learns of it
                log.exception("S3Gen rendering failed")
                for job in jobs:
                    job.error = exc
            self.busy_s += time.perf_counter() - began
            self.batches += 1
            self.rendered += len(jobs)
            for job in jobs:
                job.done.set()

    def _run(self, jobs: list[_Job]) -> None:
        plans = [job.renderer.plan(job.chunk.valid, job.chunk.final) for job in jobs]
        live = [(job, plan) for job, plan in zip(jobs, plans) if plan is not None]
        mels: dict[int, torch.Tensor] = {}
        if len(live) == 1:
            job, plan = live[0]
            r = job.renderer
            mel = r.s3gen.flow_inference(plan.window, r.ref, cfm_noise=plan.noise, n_timesteps=self.n_timesteps)
            mels[id(job)] = mel[:, :, plan.start:plan.stop]
        elif live:
            conds = [job.renderer.s3gen.flow_condition(plan.window, job.renderer.ref) for job, plan in live]
            flow = live[0][0].renderer.s3gen.flow
            out = flow.decode_batch(conds, [plan.noise for _, plan in live], n_timesteps=self.n_timesteps)
            for (job, plan), mel in zip(live, out):
                mels[id(job)] = mel[:, :, plan.start:plan.stop]
        for job in jobs:
            mel = mels.get(id(job))
            job.wav = job.renderer.vocode(job.renderer.empty_mel() if mel is None else mel, job.chunk.final)
