"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart).

Counters and histograms are updated as requests run; the gauges (active streams, queue depth, GPU
memory, readiness) are read from the live objects at every scrape.
"""
from __future__ import annotations

from typing import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "chatterbox"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LiveCollector:
    def __init__(self, pool: Callable, ready: Callable[[], bool], devices: Callable[[], list]) -> None:
        self._pool, self._ready, self._devices = pool, ready, devices

    def collect(self):
        pool = self._pool()
        ready = GaugeMetricFamily(f"{PREFIX}_ready", "1 once the engines are loaded and warmed up")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready
        active = GaugeMetricFamily(f"{PREFIX}_active_streams", "requests synthesising now")
        active.add_metric([], float(pool.active if pool else 0))
        yield active
        queued = GaugeMetricFamily(f"{PREFIX}_queue_depth", "requests waiting for a free engine slot")
        queued.add_metric([], float(pool.queued if pool else 0))
        yield queued
        per_engine = GaugeMetricFamily(f"{PREFIX}_engine_active_streams", "requests running per engine",
                                       labels=["engine"])
        for slot in (pool.slots if pool else []):
            per_engine.add_metric([slot.name], float(slot.active))
        yield per_engine
        memory = GaugeMetricFamily(f"{PREFIX}_gpu_memory_bytes", "CUDA memory held by torch per device",
                                   labels=["device", "kind"])
        for device in self._devices():
            if device.type == "cuda" and torch.cuda.is_available():
                memory.add_metric([str(device), "allocated"], float(torch.cuda.memory_allocated(device)))
                memory.add_metric([str(device), "reserved"], float(torch.cuda.memory_reserved(device)))
        yield memory


class ServerMetrics:
    def __init__(self, ttfa_buckets_s: tuple[float, ...]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.streams = Counter(f"{PREFIX}_speech_streams", "speech streams by how they ended",
                               ["outcome"], registry=self.registry)
        self.ttfa = Histogram(f"{PREFIX}_time_to_first_audio_seconds",
                              "from the request's arrival to its first audio bytes (queueing included)",
                              buckets=ttfa_buckets_s, registry=self.registry)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "time spent waiting for an engine slot",
                                    buckets=ttfa_buckets_s, registry=self.registry)
        self.audio_seconds = Counter(f"{PREFIX}_audio_seconds", "seconds of audio produced",
                                     registry=self.registry)
        self.speech_tokens = Counter(f"{PREFIX}_speech_tokens", "speech tokens generated",
                                     registry=self.registry)

    def watch(self, pool: Callable, ready: Callable[[], bool], devices: Callable[[], list]) -> None:
        """Add the live gauges, read through these callables at every scrape."""
        self.registry.register(_LiveCollector(pool, ready, devices))

    def render(self) -> bytes:
        return generate_latest(self.registry)
