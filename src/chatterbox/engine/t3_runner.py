"""T3 runners: how a request's speech tokens are generated (the engine picks one at build).

* ``EagerT3Runner``: each request gets its own one-slot state pool and KV cache and steps through
  ``pool_step`` eagerly (the reference path, and every CPU configuration).
* ``GraphedT3Runner``: requests take a slot of one engine-wide state pool and keep their own KV cache;
  the prefill (per prompt-length bucket) and the decode step (per cache window and sampling
  processors) are CUDA graphs captured on a scratch slot, never on a live request, and replayed for
  whichever slot asks. Graphs of the default processors are captured when the runner is built. With
  the registry's graphs disabled the very same steps run eagerly (how it is tested without a GPU,
  the Triton kernels under the interpreter).

Both hand out ``T3Stream``s: the request's tokens in stop-checked blocks.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.t3.cond import T3Cond
from ..models.t3.fused_decode import FusedDecoder, allocate_stacked_cache
from ..models.t3.sampling import RowProcessing, SamplingConfig, param_row
from ..models.t3.t3 import CFG_BATCH, T3
from ..nn.transfer import host_to_device
from .graphs import GraphRegistry
from .t3_state import POS_BACKBONE, POS_SPEECH, Pick, T3StatePool, default_pick, pool_step
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


@dataclass
class T3Request:
    """What one T3 generation needs (one text segment of a request)."""

    cond: T3Cond
    text_tokens: Tensor  # (2, n) the CFG pair, start/stop text tokens included
    sampling: SamplingConfig
    max_new_tokens: int
    generator: torch.Generator
    block_size: int


class EagerT3Runner:
    """Every request on its own state and cache, stepped eagerly (``pool_step`` on a one-slot pool)."""

    def __init__(self, t3: T3, fused: FusedDecoder | None, pick: Pick = default_pick) -> None:
        self.t3, self.fused, self.pick = t3, fused, pick
        self.lock = contextlib.nullcontext()  # nothing is shared between requests

    def start(self, req: T3Request) -> T3Stream:
        t3 = self.t3
        text = t3.check_text(req.text_tokens)
        steps = t3.check_new_tokens(req.max_new_tokens)
        embeds = t3.prompt_embeds(req.cond, text)  # (2, P, C)
        prefix = embeds.shape[1]
        device, dtype = embeds.device, embeds.dtype
        # The step after the last token is computed too (and discarded): one slot more than T3.inference.
        length = prefix + steps
        if self.fused is not None:
            cache = allocate_stacked_cache(t3.cfg.llama, CFG_BATCH, length, device, dtype)
        else:
            cache = t3.init_cache(CFG_BATCH, length, device, dtype)
        pool = T3StatePool.allocate(1, t3.cfg.speech_vocab_size, steps, device)
        slot = torch.zeros(1, dtype=torch.long, device=device)
        init_slot(t3, pool, 0, req.sampling, prefix)
        pool.logits[0] = t3.prefill(embeds, cache).view(CFG_BATCH, -1)
        proc = RowProcessing.for_rows([req.sampling], req.sampling.order)
        fused, pick = self.fused, self.pick

        def decode(e: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
            if fused is not None:
                return t3.speech_logits(fused.decode(e, positions, cache)[:, -1])
            return t3.speech_logits(t3.tfmr.decode(e, positions, cache)[:, -1])

        def step() -> None:
            pool.race[0:1].exponential_(1, generator=req.generator)
            pool_step(t3, pool, slot, proc, pick, decode)

        return T3Stream(stepped_producer(pool.history, 0, step, self.lock), steps, req.block_size,
                        t3.cfg.stop_speech_token, device, keep=(cache,))


@dataclass
class Admission:
    """A request ready to take a slot: its prompt embedded and its KV cache allocated (no lock needed)."""

    req: T3Request
    embeds: Tensor  # (2, P, C) in the backbone's dtype
    cache: object  # the stacked KVCache: alive as long as the request
    steps: int
    bucket: int  # prefill length, padded
    proc: RowProcessing


@dataclass
class Row:
    """A request in a decode step: its slot, the backbone position of its next step, its generator."""

    slot: int
    position: int
    generator: torch.Generator
    proc: RowProcessing


class GraphedT3Runner:
    """Requests in slots of one pool, stepped by captured graphs (see the module docstring).

    ``step_rows`` advances up to ``max(cfg.batch_buckets)`` requests by one token in one replay (the
    rows padded with scratch slots to the next bucket): the engine's batcher drives it; ``start`` runs a
    request on its own (bucket 1), stepped by its caller.
    """

    FAMILY_PREFILL = "t3_prefill"
    FAMILY_DECODE = "t3_decode"

    def __init__(self, t3: T3, fused: FusedDecoder, graphs: GraphRegistry, cfg: T3RunnerConfig,
                 pick: Pick = default_pick, default_proc: RowProcessing | None = None) -> None:
        self.t3, self.fused, self.graphs, self.cfg, self.pick = t3, fused, graphs, cfg, pick
        self.lock = graphs.lock
        self.device = t3.device
        self.dtype = fused.final_norm.dtype
        speech = t3.cfg
        self.max_context = cfg.max_prefill + speech.speech_pos_emb_len
        self.max_window = cfg.window * math.ceil(self.max_context / cfg.window)
        self.buckets = tuple(sorted(cfg.batch_buckets))
        self.max_batch = self.buckets[-1]
        self.scratch = list(range(cfg.slots, cfg.slots + self.max_batch))  # graphs are captured on these
        self.pool = T3StatePool.allocate(cfg.slots + self.max_batch, speech.speech_vocab_size,
                                         speech.speech_pos_emb_len, self.device)
        with torch.inference_mode(False):
            self._slots_buf = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
            self._scratch_cache = allocate_stacked_cache(speech.llama, CFG_BATCH, 1, self.device, self.dtype)
        self._slots_host = [-1] * self.max_batch
        self._free = list(range(cfg.slots))
        self._slot_ready = threading.Condition(threading.Lock())
        if cfg.capture_at_build:  # every batch bucket, as compiled code and graphs: none is made mid-request
            for batch in self.buckets:
                self.capture(default_proc or RowProcessing(), batch)

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

    def capture(self, proc: RowProcessing, batch: int = 1) -> None:
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
        t3, fused, pool = self.t3, self.fused, self.pool

        def prefill(embeds: Tensor, last: Tensor, slot: Tensor) -> Tensor:
            hidden = fused.prefill_table(embeds, pool.cache_ptr.index_select(0, slot),
                                         pool.cache_len.index_select(0, slot))
            logits = t3.speech_logits(hidden.index_select(1, last)[:, 0])  # (2, V)
            pool.logits.index_copy_(0, slot, logits.view(1, CFG_BATCH, -1).to(pool.logits.dtype))
            return logits

        graph = self.graphs.get(key, prefill, clone_outputs=False)
        if graph.enabled and not graph.captured:
            self._use_scratch(1)
            embeds = torch.zeros(CFG_BATCH, length, t3.cfg.dim, device=self.device, dtype=self.dtype)
            zero = torch.zeros(1, dtype=torch.long, device=self.device)
            graph(embeds, zero, torch.full((1,), self.scratch[0], dtype=torch.long, device=self.device))
        return graph

    def _decode_graph(self, b: int, window: int, proc: RowProcessing):
        key = (self.FAMILY_DECODE, b, window, proc)
        t3, fused, pool, pick, slots = self.t3, self.fused, self.pool, self.pick, self._slots_buf[:b]

        def decode(embeds: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
            hidden = fused.decode_table(embeds, positions, pool.cache_ptr.index_select(0, rows),
                                        pool.cache_len.index_select(0, rows), window)
            return fused.per_request(t3.speech_logits, hidden[:, -1])

        def step() -> Tensor:
            pool_step(t3, pool, slots, proc, pick, decode)
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
        t3, cfg = self.t3, self.cfg
        text = t3.check_text(req.text_tokens)
        steps = t3.check_new_tokens(req.max_new_tokens)
        embeds = t3.prompt_embeds(req.cond, text).to(self.dtype)  # (2, P, C)
        prefix = embeds.shape[1]
        bucket = cfg.prefill_bucket * math.ceil(prefix / cfg.prefill_bucket)
        with torch.inference_mode(False):
            cache = allocate_stacked_cache(t3.cfg.llama, CFG_BATCH, max(prefix + steps, bucket), self.device,
                                           self.dtype)
        return Admission(req, embeds, cache, steps, bucket, RowProcessing.for_rows([req.sampling], req.sampling.order))

    def admit(self, adm: Admission, slot: int) -> Row:
        """Give ``slot`` to the request and prefill it (queued under the lock)."""
        with self.lock:
            init_slot(self.t3, self.pool, slot, adm.req.sampling, adm.embeds.shape[1])
            self.pool.cache_ptr[slot] = adm.cache.k.data_ptr()
            self.pool.cache_len[slot] = adm.cache.k.shape[3]
            self._prefill(adm.embeds, slot, adm.bucket)
        return Row(slot, adm.embeds.shape[1], adm.req.generator, adm.proc)

    def step_rows(self, rows: list[Row]) -> None:
        """One token for each of ``rows`` (at most ``max_batch``, one processor order), in one replay."""
        b = self.bucket_for(len(rows))
        window = max(self.window_for(r.position) for r in rows)
        proc = RowProcessing(order=rows[0].proc.order, min_p=any(r.proc.min_p for r in rows),
                             top_p=any(r.proc.top_p for r in rows))
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
                        on_close=lambda: self.release(slot))

    def _prefill(self, embeds: Tensor, slot: int, bucket: int) -> None:
        prefix = embeds.shape[1]
        slot_t = torch.full((1,), slot, dtype=torch.long, device=self.device)
        last = torch.full((1,), prefix - 1, dtype=torch.long, device=self.device)
        if bucket > self.cfg.max_prefill:
            log.debug("prompt of %d positions is longer than the captured prefills: eager prefill", prefix)
            hidden = self.fused.prefill_table(embeds, self.pool.cache_ptr[slot:slot + 1],
                                              self.pool.cache_len[slot:slot + 1])
            self.pool.logits[slot] = self.t3.speech_logits(hidden[:, -1]).to(self.pool.logits.dtype)
            return
        padded = torch.nn.functional.pad(embeds, (0, 0, 0, bucket - prefix))
        self._prefill_graph(bucket)(padded, last, slot_t)


def init_slot(t3: T3, pool: T3StatePool, slot: int, sampling: SamplingConfig, prefix: int) -> None:
    """A request's slot before its prefill: settings, positions, nothing seen but the start token."""
    device = pool.params.device
    pool.params[slot].copy_(host_to_device(torch.tensor(param_row(sampling), dtype=torch.float32), device))
    pool.position[slot, POS_BACKBONE] = prefix
    pool.position[slot, POS_SPEECH] = 1
    pool.seen[slot] = False
    pool.seen[slot, t3.cfg.start_speech_token] = True  # the initial BOS counts as generated


__all__ = ["EagerT3Runner", "GraphedT3Runner", "T3Request", "T3RunnerConfig", "init_slot"]
