"""T3 runners of the original model: how a request's speech tokens are generated (the engine picks one
at build).

* ``EagerT3Runner``: each request gets its own one-slot state pool and KV cache and steps through
  ``pool_step`` eagerly (the reference path, and every CPU configuration).
* ``GraphedT3Runner``: requests in slots of one engine-wide pool, stepped by captured graphs
  (``slot_runner.SlotRunner``): a request is its CFG pair of backbone rows, sampled by
  ``models.t3.sampling.sample_rows`` with the processors of ``RowProcessing``; the backbone is the
  fused Llama decoder's table form (``FusedDecoder.decode_table``).

Both hand out ``T3Stream``s: the request's tokens in stop-checked blocks.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..models.t3.fused_decode import FusedDecoder, allocate_stacked_cache
from ..models.t3.sampling import N_PARAMS, RowProcessing, SamplingConfig, param_row
from ..models.t3.t3 import CFG_BATCH, T3
from ..nn.transfer import host_to_device
from .graphs import GraphRegistry
from .slot_runner import Admission, Row, SlotRunner, T3Request, T3RunnerConfig
from .t3_state import POS_BACKBONE, POS_SPEECH, Pick, T3StatePool, default_pick, pool_step
from .t3_stream import T3Stream, stepped_producer


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


class GraphedT3Runner(SlotRunner):
    """The original model's requests in slots of one pool, stepped by captured graphs (see
    ``slot_runner``)."""

    rows = CFG_BATCH

    def __init__(self, t3: T3, fused: FusedDecoder, graphs: GraphRegistry, cfg: T3RunnerConfig,
                 pick: Pick = default_pick, default_proc: RowProcessing | None = None) -> None:
        self.fused = fused
        super().__init__(t3, fused, graphs, cfg, pick, max_tokens=t3.cfg.speech_pos_emb_len, n_params=N_PARAMS,
                         default_proc=default_proc or RowProcessing())

    def step(self, slots: Tensor, proc: RowProcessing, decode) -> None:
        pool_step(self.t3, self.pool, slots, proc, self.pick, decode)

    def init_slot(self, slot: int, req: T3Request, prefix: int) -> None:
        init_slot(self.t3, self.pool, slot, req.sampling, prefix)

    def check_request(self, req: T3Request) -> tuple[Tensor, int]:
        return self.t3.check_text(req.text_tokens), self.t3.check_new_tokens(req.max_new_tokens)

    def proc_for(self, req: T3Request) -> RowProcessing:
        return RowProcessing.for_rows([req.sampling], req.sampling.order)

    def step_group(self, proc: RowProcessing) -> tuple[str, ...]:
        return proc.order  # one processor order per step; min-p and top-p may be merged

    def merge_procs(self, procs: list[RowProcessing]) -> RowProcessing:
        return RowProcessing(order=procs[0].order, min_p=any(p.min_p for p in procs),
                             top_p=any(p.top_p for p in procs))


def init_slot(t3: T3, pool: T3StatePool, slot: int, sampling: SamplingConfig, prefix: int) -> None:
    """A request's slot before its prefill: settings, positions, nothing seen but the start token."""
    device = pool.params.device
    pool.params[slot].copy_(host_to_device(torch.tensor(param_row(sampling), dtype=torch.float32), device))
    pool.position[slot, POS_BACKBONE] = prefix
    pool.position[slot, POS_SPEECH] = 1
    pool.seen[slot] = False
    pool.seen[slot, t3.cfg.start_speech_token] = True  # the initial BOS counts as generated


__all__ = ["Admission", "EagerT3Runner", "GraphedT3Runner", "Row", "T3Request", "T3RunnerConfig", "init_slot"]
