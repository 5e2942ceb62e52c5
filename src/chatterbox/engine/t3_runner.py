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
from typing import Callable

import torch
from torch import Tensor

from ..models.t3.cond import T3Cond
from ..models.t3.fused_decode import FusedDecoder, allocate_stacked_cache
from ..models.t3.sampling import RowProcessing, SamplingConfig, param_row
from ..models.t3.t3 import CFG_BATCH, T3
from ..nn.transfer import host_to_device
from .graphs import GraphRegistry
from .t3_state import POS_BACKBONE, POS_SPEECH, Pick, T3StatePool, default_pick, pool_step
from .t3_stream import T3Stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class T3RunnerConfig:
    slots: int = 16  # requests decoding at once on the graphed runner; later ones wait for a slot
    window: int = 128  # decode graphs cover the KV cache in multiples of this many slots
    prefill_bucket: int = 32  # prompts are padded to a multiple of this (one prefill graph each)
    max_prefill: int = 512  # the longest prompt with a captured prefill; longer ones prefill eagerly
    capture_at_build: bool = True  # capture the default graphs when the runner is built

    def __post_init__(self) -> None:
        for name in ("slots", "window", "prefill_bucket", "max_prefill"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

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
                return fused.decode(e, positions, cache)
            return t3.tfmr.decode(e, positions, cache)

        def step() -> None:
            pool.race[0:1].exponential_(1, generator=req.generator)
            pool_step(t3, pool, slot, proc, pick, decode)

        return T3Stream(pool, 0, steps, req.block_size, t3.cfg.stop_speech_token, step, self.lock,
                        keep=(cache,))


class GraphedT3Runner:
    """Requests in slots of one pool, stepped by captured graphs (see the module docstring)."""

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
        self.scratch = cfg.slots  # the last slot: graphs are captured on it
        self.pool = T3StatePool.allocate(cfg.slots + 1, speech.speech_vocab_size, speech.speech_pos_emb_len,
                                         self.device)
        with torch.inference_mode(False):
            self._slots_buf = torch.zeros(1, dtype=torch.long, device=self.device)
            self._scratch_cache = allocate_stacked_cache(speech.llama, CFG_BATCH, 1, self.device, self.dtype)
        self._slots_host = [-1]
        self._free = list(range(cfg.slots))
        self._slot_ready = threading.Condition(threading.Lock())
        if cfg.capture_at_build:
            self.capture(default_proc or RowProcessing())

    # ------------------------------------------------------------------ graphs
    def windows(self) -> list[int]:
        w = self.cfg.window
        return list(range(w, self.max_window + 1, w))

    def prefill_buckets(self) -> list[int]:
        b = self.cfg.prefill_bucket
        return [b * k for k in range(1, self.cfg.max_prefill // b + 1)]

    def capture(self, proc: RowProcessing) -> None:
        """Capture every prefill bucket and every decode window for ``proc`` (on the scratch slot)."""
        with self.lock:
            for length in self.prefill_buckets():
                self._prefill_graph(length)
            for window in self.windows():
                self._decode_graph(window, proc)

    def _use_scratch(self) -> None:
        pool, s = self.pool, self.scratch
        pool.position[s, POS_BACKBONE] = 0
        pool.position[s, POS_SPEECH] = 1
        pool.cache_ptr[s] = self._scratch_cache.k.data_ptr()
        pool.cache_len[s] = self._scratch_cache.k.shape[3]
        self._set_slots([s])

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
            self._use_scratch()
            embeds = torch.zeros(CFG_BATCH, length, t3.cfg.dim, device=self.device, dtype=self.dtype)
            zero = torch.zeros(1, dtype=torch.long, device=self.device)
            graph(embeds, zero, torch.full((1,), self.scratch, dtype=torch.long, device=self.device))
        return graph

    def _decode_graph(self, window: int, proc: RowProcessing):
        key = (self.FAMILY_DECODE, 1, window, proc)
        t3, fused, pool, pick, slots = self.t3, self.fused, self.pool, self.pick, self._slots_buf

        def decode(embeds: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
            return fused.decode_table(embeds, positions, pool.cache_ptr.index_select(0, rows),
                                      pool.cache_len.index_select(0, rows), window)

        def step() -> Tensor:
            pool_step(t3, pool, slots, proc, pick, decode)
            return slots

        graph = self.graphs.get(key, step, clone_outputs=False)
        if graph.enabled and not graph.captured:
            self._use_scratch()
            graph()
        return graph

    # ------------------------------------------------------------------ requests
    def _acquire(self) -> int:
        with self._slot_ready:
            while not self._free:
                self._slot_ready.wait()
            return self._free.pop()

    def _release(self, slot: int) -> None:
        with self._slot_ready:
            self._free.append(slot)
            self._slot_ready.notify()

    def start(self, req: T3Request) -> T3Stream:
        t3, cfg = self.t3, self.cfg
        text = t3.check_text(req.text_tokens)
        steps = t3.check_new_tokens(req.max_new_tokens)
        embeds = t3.prompt_embeds(req.cond, text).to(self.dtype)  # (2, P, C)
        prefix = embeds.shape[1]
        bucket = cfg.prefill_bucket * math.ceil(prefix / cfg.prefill_bucket)
        with torch.inference_mode(False):
            cache = allocate_stacked_cache(t3.cfg.llama, CFG_BATCH, max(prefix + steps, bucket), self.device,
                                           self.dtype)
        slot = self._acquire()
        try:
            with self.lock:
                init_slot(t3, self.pool, slot, req.sampling, prefix)
                self.pool.cache_ptr[slot] = cache.k.data_ptr()
                self.pool.cache_len[slot] = cache.k.shape[3]
                self._prefill(embeds, slot, bucket)
        except BaseException:
            self._release(slot)
            raise
        proc = RowProcessing.for_rows([req.sampling], req.sampling.order)
        position = [prefix]

        def step() -> None:
            window = min(cfg.window * math.ceil((position[0] + 1) / cfg.window), self.max_window)
            graph = self._decode_graph(window, proc)
            self.pool.race[slot:slot + 1].exponential_(1, generator=req.generator)
            self._set_slots([slot])
            graph()
            position[0] += 1

        return T3Stream(self.pool, slot, steps, req.block_size, t3.cfg.stop_speech_token, step, self.lock,
                        keep=(cache,), on_close=lambda: self._release(slot))

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
