"""Requests in slots of one state pool, stepped by captured graphs: what the graphed T3 runners of
every model family share.

A request takes a slot of one engine-wide ``T3StatePool`` and keeps its own KV cache (found through
the pool's cache table). The prefill (per prompt-length bucket) and the decode step (per batch
bucket, cache window and sampling processors) are CUDA graphs captured on scratch slots, never on a
live request, and replayed for whichever slots ask; the default sampling's graphs of every batch
bucket are captured when the runner is built. With the registry's graphs disabled the very same
steps run eagerly (how it is tested without a GPU, the Triton kernels under the interpreter).

A family's runner (``t3_runner.GraphedT3Runner``, ``turbo_runner.GraphedTurboRunner``) says how many
backbone rows a request has, how a slot starts, and what one decode step does with the pool; its
backbone decoder (``FusedDecoder``, ``GPT2TableDecoder``) provides ``prefill_table``,
``decode_table`` and ``per_request``.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import Tensor

from ..models.t3.cond import T3Cond
from ..models.t3.fused_decode import allocate_stacked_cache
from ..nn.transfer import host_to_device
from .graphs import GraphRegistry
from .t3_state import POS_BACKBONE, POS_SPEECH, T3StatePool
from .t3_stream import T3Stream, stepped_producer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class T3RunnerConfig:
    slots: int = 64  # requests decoding at once on the graphed runner; later ones wait for a slot
    window: int = 128  # decode graphs cover the KV cache in multiples of this many slots
    prefill_bucket: int = 32  # prompts are padded to a multiple of this (one prefill graph each)
    max_prefill: int = 512  # the longest prompt with a captured prefill; longer ones prefill eagerly
    capture_at_build: bool = True  # capture the default sampling's graphs, every bucket, at build
    # requests per decode step the graphed runner captures (the engine's batcher picks the bucket;
    # without OptConfig.t3_batching only 1 is used)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)

    def __post_init__(self) -> None:
        for name in ("slots", "window", "prefill_bucket", "max_prefill"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.batch_buckets or min(self.batch_buckets) != 1 or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be positive and include 1, got {self.batch_buckets}")

    @classmethod
    def published(cls) -> "T3RunnerConfig":
        return cls()

    @classmethod
    def turbo(cls) -> "T3RunnerConfig":
        """Turbo and Nano: one backbone row per request and a third of the original's KV cache per
        position, so four times the requests at once, and steps of up to 128 of them."""
        return cls(slots=256, batch_buckets=(1, 2, 4, 8, 16, 32, 64, 128))


@dataclass
class T3Request:
    """What one T3 generation needs (one text segment of a request)."""

    cond: T3Cond
    text_tokens: Tensor  # (rows, n): the original model's CFG pair (start/stop text tokens included), Turbo's one row
    sampling: object  # the family's sampling settings (SamplingConfig, TurboSamplingConfig)
    max_new_tokens: int
    generator: torch.Generator
    block_size: int


@dataclass
class Admission:
    """A request ready to take a slot: its prompt embedded and its KV cache allocated (no lock needed)."""

    req: T3Request
    embeds: Tensor  # (rows, P, C) in the backbone's dtype
    cache: object  # the stacked KVCache: alive as long as the request
    steps: int
    bucket: int  # prefill length, padded
    proc: Hashable  # the sampling processors its decode graph is captured for


@dataclass
class Row:
    """A request in a decode step: its slot, the backbone position of its next step, its generator."""

    slot: int
    position: int
    generator: torch.Generator
    proc: Hashable


class SlotRunner:
    """See the module docstring. ``step_rows`` advances up to ``max(cfg.batch_buckets)`` requests by
    one token in one replay (the rows padded with scratch slots to the next bucket): the engine's
    batcher drives it; ``start`` runs a request on its own (bucket 1), stepped by its caller."""

    FAMILY_PREFILL = "t3_prefill"
    FAMILY_DECODE = "t3_decode"
    rows = 1  # backbone rows per request
    first_may_stop = True  # False: the first sampled token is never read as a stop

    def __init__(self, t3, backbone, graphs: GraphRegistry, cfg: T3RunnerConfig, pick: Callable, *,
                 max_tokens: int, n_params: int, default_proc: Hashable) -> None:
        self.t3, self.backbone, self.graphs, self.cfg, self.pick = t3, backbone, graphs, cfg, pick
        self.lock = graphs.lock
        self.device = t3.device
        self.dtype = backbone.dtype
        self.max_tokens = max_tokens
        self.max_context = cfg.max_prefill + max_tokens
        self.max_window = cfg.window * math.ceil(self.max_context / cfg.window)
        self.buckets = tuple(sorted(cfg.batch_buckets))
        self.max_batch = self.buckets[-1]
        self.scratch = list(range(cfg.slots, cfg.slots + self.max_batch))  # graphs are captured on these
        self.pool = T3StatePool.allocate(cfg.slots + self.max_batch, t3.cfg.speech_vocab_size, max_tokens,
                                         self.device, rows=self.rows, n_params=n_params)
        with torch.inference_mode(False):
            self._slots_buf = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
            self._scratch_cache = allocate_stacked_cache(backbone.cfg, self.rows, 1, self.device, self.dtype)
        neutral = self.scratch_params()
        if neutral is not None:  # padding rows sample with valid settings
            self.pool.params[self.scratch] = torch.tensor(neutral, dtype=torch.float32).to(self.device)
        self._slots_host = [-1] * self.max_batch
        self._free = list(range(cfg.slots))
        self._slot_ready = threading.Condition(threading.Lock())
        if cfg.capture_at_build:  # every batch bucket, as compiled code and graphs: none is made mid-request
            for batch in self.buckets:
                self.capture(default_proc, batch)

    # ------------------------------------------------------------------ what a family defines
    def step(self, slots: Tensor, proc: Hashable, decode: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        """Advance ``slots`` (b,) by one token with ``decode(embeds, positions, slots) -> logits``."""
        raise NotImplementedError

    def init_slot(self, slot: int, req: T3Request, prefix: int) -> None:
        """The slot's settings, positions and penalty mask before the request's prefill."""
        raise NotImplementedError

    def check_request(self, req: T3Request) -> tuple[Tensor, int]:
        """-> (the request's text tokens, checked; its token budget)."""
        raise NotImplementedError

    def proc_for(self, req: T3Request) -> Hashable:
        raise NotImplementedError

    def merge_procs(self, procs: list) -> Hashable:
        """One processing that serves every row of a step (rows of one ``step_group``)."""
        raise NotImplementedError

    def scratch_params(self) -> list[float] | None:
        """Sampling settings of the scratch (padding) slots; None leaves them zero."""
        return None

    def step_group(self, proc: Hashable) -> Hashable:
        """Requests whose processings share this key may share a decode step."""
        return proc

    # ------------------------------------------------------------------ graphs
    def windows(self) -> list[int]:
        w = self.cfg.window
        return list(range(w, self.max_window + 1, w))

    def prefill_buckets(self) -> list[int]:
        b = self.cfg.prefill_bucket
        return [b * k for k in range(1, self.cfg.max_prefill // b + 1)]

    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def window_for(self, position: int) -> int:
        return min(self.cfg.window * math.ceil((position + 1) / self.cfg.window), self.max_window)

    def capture(self, proc: Hashable, batch: int = 1) -> None:
        """Capture every prefill bucket and every decode window of ``batch`` rows for ``proc`` (on
        scratch slots)."""
        with self.lock:
            for length in self.prefill_buckets():
                self._prefill_graph(length)
            for window in self.windows():
                self._decode_graph(batch, window, proc)

    def _use_scratch(self, b: int) -> None:
        pool = self.pool
        for s in self.scratch[:b]:
            pool.position[s, POS_BACKBONE] = 0
            pool.position[s, POS_SPEECH] = 1
            pool.cache_ptr[s] = self._scratch_cache.k.data_ptr()
            pool.cache_len[s] = self._scratch_cache.k.shape[3]
        self._set_slots(self.scratch[:b])

    def _set_slots(self, slots: list[int]) -> None:
        if self._slots_host[:len(slots)] != slots:
            self._slots_buf[:len(slots)].copy_(host_to_device(torch.tensor(slots), self.device))
            self._slots_host[:len(slots)] = slots

    def _prefill_graph(self, length: int):
        key = (self.FAMILY_PREFILL, length)
        t3, backbone, pool, rows = self.t3, self.backbone, self.pool, self.rows

        def prefill(embeds: Tensor, last: Tensor, slot: Tensor) -> Tensor:
            hidden = backbone.prefill_table(embeds, pool.cache_ptr.index_select(0, slot),
                                            pool.cache_len.index_select(0, slot), rows)
            logits = t3.speech_logits(hidden.index_select(1, last)[:, 0])  # (rows, V)
            pool.logits.index_copy_(0, slot, logits.view(1, rows, -1).to(pool.logits.dtype))
            return logits

        graph = self.graphs.get(key, prefill, clone_outputs=False)
        if graph.enabled and not graph.captured:
            self._use_scratch(1)
            embeds = torch.zeros(rows, length, t3.cfg.dim, device=self.device, dtype=self.dtype)
            zero = torch.zeros(1, dtype=torch.long, device=self.device)
            graph(embeds, zero, torch.full((1,), self.scratch[0], dtype=torch.long, device=self.device))
        return graph

    def _decode_graph(self, b: int, window: int, proc: Hashable):
        key = (self.FAMILY_DECODE, b, window, proc)
        t3, backbone, pool, rows, slots = self.t3, self.backbone, self.pool, self.rows, self._slots_buf[:b]

        def decode(embeds: Tensor, positions: Tensor, which: Tensor) -> Tensor:
            hidden = backbone.decode_table(embeds, positions, pool.cache_ptr.index_select(0, which),
                                           pool.cache_len.index_select(0, which), window, rows)
            return backbone.per_request(t3.speech_logits, hidden[:, -1])

        def step() -> Tensor:
            self.step(slots, proc, decode)
            return slots

        graph = self.graphs.get(key, step, clone_outputs=False)
        if graph.enabled and not graph.captured:
            self._use_scratch(b)
            graph()
        return graph

    # ------------------------------------------------------------------ slots
    def acquire(self, block: bool = True) -> int | None:
        with self._slot_ready:
            while not self._free:
                if not block:
                    return None
                self._slot_ready.wait()
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._slot_ready:
            self._free.append(slot)
            self._slot_ready.notify()

    @property
    def free_slots(self) -> int:
        with self._slot_ready:
            return len(self._free)

    # ------------------------------------------------------------------ requests
    def prepare(self, req: T3Request) -> Admission:
        """Check, embed and allocate for ``req`` (in the caller's thread; nothing shared is touched)."""
        cfg = self.cfg
        text, steps = self.check_request(req)
        if steps > self.max_tokens:
            raise ValueError(f"max_new_tokens {steps} exceeds the {self.max_tokens} tokens this runner's graphs cover")
        embeds = self.t3.prompt_embeds(req.cond, text).to(self.dtype)  # (rows, P, C)
        prefix = embeds.shape[1]
        if prefix + steps > self.max_window:
            raise ValueError(f"a prompt of {prefix} positions + {steps} tokens exceeds the {self.max_window} cache "
                             f"positions the decode graphs cover; lower max_new_tokens or split the text")
        bucket = cfg.prefill_bucket * math.ceil(prefix / cfg.prefill_bucket)
        with torch.inference_mode(False):
            cache = allocate_stacked_cache(self.backbone.cfg, self.rows, max(prefix + steps, bucket), self.device,
                                           self.dtype)
        return Admission(req, embeds, cache, steps, bucket, self.proc_for(req))

    def admit(self, adm: Admission, slot: int) -> Row:
        """Give ``slot`` to the request and prefill it (queued under the lock)."""
        with self.lock:
            self.init_slot(slot, adm.req, adm.embeds.shape[1])
            self.pool.cache_ptr[slot] = adm.cache.k.data_ptr()
            self.pool.cache_len[slot] = adm.cache.k.shape[3]
            self._prefill(adm.embeds, slot, adm.bucket)
        return Row(slot, adm.embeds.shape[1], adm.req.generator, adm.proc)

    def step_rows(self, rows: list[Row]) -> None:
        """One token for each of ``rows`` (at most ``max_batch``, one ``step_group``), in one replay."""
        b = self.bucket_for(len(rows))
        window = max(self.window_for(r.position) for r in rows)
        proc = self.merge_procs([r.proc for r in rows])
        with self.lock:
            graph = self._decode_graph(b, window, proc)
            for r in rows:
                self.pool.race[r.slot:r.slot + 1].exponential_(1, generator=r.generator)
            pad = self.scratch[:b - len(rows)]
            if pad:
                self._use_scratch(len(pad))
            self._set_slots([r.slot for r in rows] + pad)
            graph()
        for r in rows:
            r.position += 1

    def start(self, req: T3Request) -> T3Stream:
        adm = self.prepare(req)
        slot = self.acquire()
        try:
            row = self.admit(adm, slot)
        except BaseException:
            self.release(slot)
            raise
        return T3Stream(stepped_producer(self.pool.history, slot, lambda: self.step_rows([row]), self.lock),
                        adm.steps, req.block_size, self.t3.cfg.stop_speech_token, self.device, keep=(adm.cache,),
                        on_close=lambda: self.release(slot), first_may_stop=self.first_may_stop)

    def _prefill(self, embeds: Tensor, slot: int, bucket: int) -> None:
        prefix = embeds.shape[1]
        slot_t = torch.full((1,), slot, dtype=torch.long, device=self.device)
        last = torch.full((1,), prefix - 1, dtype=torch.long, device=self.device)
        if bucket > self.cfg.max_prefill:
            log.debug("prompt of %d positions is longer than the captured prefills: eager prefill", prefix)
            hidden = self.backbone.prefill_table(embeds, self.pool.cache_ptr[slot:slot + 1],
                                                 self.pool.cache_len[slot:slot + 1], self.rows)
            logits = self.t3.speech_logits(hidden[:, -1])
            self.pool.logits[slot] = logits.view(self.rows, -1).to(self.pool.logits.dtype)
            return
        padded = torch.nn.functional.pad(embeds, (0, 0, 0, bucket - prefix))
        self._prefill_graph(bucket)(padded, last, slot_t)


__all__ = ["Admission", "Row", "SlotRunner", "T3Request", "T3RunnerConfig"]
