"""Per-stage timers that do not synchronise the device inside the timed code.

On CUDA each stage records a pair of events; the durations are read once, when ``summary`` is
called (one synchronisation at the end). On the CPU wall-clock time is used.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch


class StageTimer:
    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True) -> None:
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.enabled = enabled
        self._pending: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._pending.append((name, t0, time.perf_counter()))

    def summary(self) -> dict[str, float]:
        """Seconds per stage name (summed over repeats)."""
        totals: dict[str, float] = defaultdict(float)
        if self.cuda and self._pending:
            torch.cuda.synchronize()
        for name, start, end in self._pending:
            if self.cuda:
                totals[name] += start.elapsed_time(end) / 1000.0
            else:
                totals[name] += end - start
        return dict(totals)
