"""T3 decode state of requests, kept in slots of one pool, and the step that advances them.

A slot holds everything one request's next decode step reads and writes, except its KV cache (its
own allocation, found through ``cache_ptr`` / ``cache_len``): the last logits of its CFG pair, its
"seen" mask for the repetition penalty, its Exp(1) race draws for the next pick, its sampling
settings, its positions and the tokens it has sampled. ``pool_step`` advances any set of slots by
one token, reading and writing only those slots, so one request's numbers never depend on which
other requests share its step, and a step captured once (``T3GraphRunner``) serves every request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..models.t3.sampling import N_PARAMS, RowProcessing, mark_seen, sample_rows
from ..models.t3.t3 import CFG_BATCH, T3

# pool.position columns
POS_BACKBONE, POS_SPEECH = 0, 1

# decode(embeds (CFG_BATCH * b, 1, C), backbone positions (b,), slots (b,)) -> speech logits (CFG_BATCH * b, V)
Decode = Callable[[Tensor, Tensor, Tensor], Tensor]
# pick(logits (b, 2, V), seen (b, V), race (b, V), params (b, N_PARAMS), proc) -> tokens (b, 1)
Pick = Callable[[Tensor, Tensor, Tensor, Tensor, RowProcessing], Tensor]


@dataclass
class T3StatePool:
    logits: Tensor  # (S, rows, V) float32: the request's logits for the next pick (the CFG pair, or one row)
    seen: Tensor  # (S, V) bool
    race: Tensor  # (S, V) float32: Exp(1) draws of the next pick (written before each step)
    params: Tensor  # (S, N_PARAMS) float32 (sampling.param_row)
    position: Tensor  # (S, 2) int64: backbone position of the next fed token, its learned speech position
    history: Tensor  # (S, H) int64: sampled tokens by step
    cache_ptr: Tensor  # (S,) int64: address of the slot's stacked KV cache (graphed decode)
    cache_len: Tensor  # (S,) int64

    @classmethod
    def allocate(cls, slots: int, vocab: int, history: int, device: torch.device, rows: int = CFG_BATCH,
                 n_params: int = N_PARAMS) -> "T3StatePool":
        """``rows``: backbone rows per request (the original model's CFG pair; 1 for Turbo);
        ``n_params``: columns of the family's per-row sampling settings."""
        # Ordinary tensors whatever the caller's autograd mode: requests in other modes use them later.
        with torch.inference_mode(False):
            return cls(
                logits=torch.zeros(slots, rows, vocab, device=device),
                seen=torch.zeros(slots, vocab, dtype=torch.bool, device=device),
                race=torch.ones(slots, vocab, device=device),
                params=torch.zeros(slots, n_params, device=device),
                position=torch.zeros(slots, 2, dtype=torch.long, device=device),
                history=torch.zeros(slots, history, dtype=torch.long, device=device),
                cache_ptr=torch.zeros(slots, dtype=torch.long, device=device),
                cache_len=torch.ones(slots, dtype=torch.long, device=device),
            )

    @property
    def slots(self) -> int:
        return self.logits.shape[0]

    @property
    def history_len(self) -> int:
        return self.history.shape[1]


def pool_step(t3: T3, pool: T3StatePool, slots: Tensor, proc: RowProcessing, pick: Pick, decode: Decode) -> None:
    """Advance ``slots`` (b,) by one token: pick from each slot's logits and race draws, record the
    token, feed it back through ``decode`` and store the next logits. Fixed shapes, no host reads."""
    b = slots.shape[0]
    token = pick(pool.logits.index_select(0, slots), pool.seen.index_select(0, slots),
                 pool.race.index_select(0, slots), pool.params.index_select(0, slots), proc)  # (b, 1)
    pool.seen.index_copy_(0, slots, mark_seen(pool.seen.index_select(0, slots), token))
    position = pool.position.index_select(0, slots)  # (b, 2)
    speech_position = position[:, POS_SPEECH]
    pool.history.index_put_((slots, speech_position - 1), token[:, 0])
    embeds = t3.next_token_embeds(token, speech_position)  # (2b, 1, C)
    logits = decode(embeds, position[:, POS_BACKBONE], slots).view(b, CFG_BATCH, -1)
    pool.logits.index_copy_(0, slots, logits.to(pool.logits.dtype))
    pool.position.index_copy_(0, slots, position + 1)


def default_pick(logits: Tensor, seen: Tensor, race: Tensor, params: Tensor, proc: RowProcessing) -> Tensor:
    return sample_rows(logits, seen, race, params, proc)
