"""T3 runners of Chatterbox-Turbo and Nano (GPT-2 backbone, one row per request, no guidance).

* ``EagerTurboRunner``: each request on its own state and cache, stepped eagerly (the reference
  path, and every CPU configuration).
* ``GraphedTurboRunner``: requests in slots of one engine-wide pool, stepped by captured graphs
  (``slot_runner.SlotRunner``; with the engine's batcher, many requests per replay). The backbone is
  ``models.t3_turbo.table_decode.GPT2TableDecoder``; the pick is ``sample_turbo_rows`` (upstream's
  processors row by row, then the race draw).

Upstream's rules hold in both: the first token is never read as a stop, and the repetition penalty
of the first step sees only the start token, later steps the generated tokens only.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from ..models.t3.sampling import exponential_race, mark_seen, pick_by_race
from ..models.t3_turbo.sampling import (TURBO_N_PARAMS, TurboSamplingConfig, ids_mask, process_turbo_logits,
                                        sample_turbo_rows, turbo_param_row)
from ..models.t3_turbo.t3_turbo import T3Turbo
from ..models.t3_turbo.table_decode import GPT2TableDecoder
from ..nn.transfer import host_to_device
from .graphs import GraphRegistry
from .slot_runner import SlotRunner, T3Request, T3RunnerConfig
from .t3_state import POS_BACKBONE, POS_SPEECH, T3StatePool
from .t3_stream import T3Stream, stepped_producer

# Turbo requests: one backbone row each (no classifier-free guidance).
TURBO_ROWS = 1
# The longest generation the graphed runner covers (its decode windows and token history): 82 s of
# speech per text segment; upstream's ``generate`` stops at 1000.
TURBO_GRAPHED_MAX_TOKENS = 2048
# The one sampling processing Turbo has (every request shares its decode graphs).
TURBO_PROC = "turbo"

# pick(logits (b, V), seen (b, V), race (b, V), params (b, TURBO_N_PARAMS)) -> tokens (b, 1)
TurboPick = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class EagerTurboRunner:
    """A Turbo request on its own state and cache, stepped eagerly. The draw is the exponential race
    (``argmax(p / E)``), which is ``torch.multinomial``'s draw and generator use without its host read."""

    def __init__(self, t3: T3Turbo) -> None:
        self.t3 = t3
        self.lock = contextlib.nullcontext()

    def start(self, req: T3Request) -> T3Stream:
        t3, cfg = self.t3, self.t3.cfg
        sampling: TurboSamplingConfig = req.sampling
        text = t3.check_text(req.text_tokens)
        steps = req.max_new_tokens
        if steps < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {steps}")
        embeds = t3.prompt_embeds(req.cond, text)  # (1, P, C)
        prefix = embeds.shape[1]
        if prefix + steps > cfg.gpt2.max_position_embeddings:
            raise ValueError(f"{prefix} prompt positions + {steps} tokens exceed the position table "
                             f"({cfg.gpt2.max_position_embeddings}); lower max_new_tokens")
        device = embeds.device
        cache = t3.init_cache(TURBO_ROWS, prefix + steps, device, embeds.dtype)
        start = torch.full((TURBO_ROWS, 1), cfg.start_speech_token, dtype=torch.long, device=device)
        state = {"logits": t3.prefill(embeds, cache), "penalised": ids_mask(TURBO_ROWS, cfg.speech_vocab_size, start),
                 "position": torch.full((1,), prefix, dtype=torch.long, device=device), "step": 0}
        generated = torch.zeros(TURBO_ROWS, cfg.speech_vocab_size, dtype=torch.bool, device=device)
        history = torch.zeros(1, steps, dtype=torch.long, device=device)

        def step() -> None:
            probs = process_turbo_logits(state["logits"], state["penalised"], sampling).softmax(dim=-1)
            token = pick_by_race(probs, exponential_race(probs, req.generator))  # (1, 1)
            history[:, state["step"]:state["step"] + 1] = token
            generated.scatter_(1, token, True)
            state["penalised"] = generated  # from the second step on: the generated tokens only
            state["logits"] = t3.decode_step(t3.next_token_embeds(token), state["position"], cache)
            state["position"] = state["position"] + 1
            state["step"] += 1

        return T3Stream(stepped_producer(history, 0, step, self.lock), steps, req.block_size, cfg.stop_speech_token,
                        device, keep=(cache,), first_may_stop=False)


def turbo_pick(logits: Tensor, seen: Tensor, race: Tensor, params: Tensor) -> Tensor:
    return sample_turbo_rows(logits, seen, race, params)


def turbo_pool_step(t3: T3Turbo, pool: T3StatePool, slots: Tensor, pick: TurboPick,
                    decode: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
    """Advance ``slots`` (b,) by one token (``t3_state.pool_step`` for Turbo): pick, record, feed the token
    back at the slot's backbone position. The penalty mask holds the start token until the first pick
    and the generated tokens after it."""
    b = slots.shape[0]
    token = pick(pool.logits.index_select(0, slots)[:, 0], pool.seen.index_select(0, slots),
                 pool.race.index_select(0, slots), pool.params.index_select(0, slots))  # (b, 1)
    position = pool.position.index_select(0, slots)  # (b, 2)
    step = position[:, POS_SPEECH] - 1  # tokens sampled before this one
    kept = pool.seen.index_select(0, slots) & (step > 0)[:, None]  # the first pick drops the start token
    pool.seen.index_copy_(0, slots, mark_seen(kept, token))
    pool.history.index_put_((slots, step), token[:, 0])
    logits = decode(t3.next_token_embeds(token), position[:, POS_BACKBONE], slots).view(b, TURBO_ROWS, -1)
    pool.logits.index_copy_(0, slots, logits.to(pool.logits.dtype))
    pool.position.index_copy_(0, slots, position + 1)


class GraphedTurboRunner(SlotRunner):
    """Turbo requests in slots of one pool, stepped by captured graphs (see ``slot_runner``)."""

    FAMILY_PREFILL = "turbo_prefill"
    FAMILY_DECODE = "turbo_decode"
    rows = TURBO_ROWS
    first_may_stop = False

    def __init__(self, t3: T3Turbo, decoder: GPT2TableDecoder, graphs: GraphRegistry, cfg: T3RunnerConfig,
                 pick: TurboPick = turbo_pick, max_tokens: int | None = None) -> None:
        """``max_tokens``: the longest generation the graphs cover (default ``TURBO_GRAPHED_MAX_TOKENS``,
        or what the position table leaves after ``cfg.max_prefill``)."""
        limit = t3.cfg.gpt2.max_position_embeddings - cfg.max_prefill
        max_tokens = min(TURBO_GRAPHED_MAX_TOKENS, limit) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in 1..{limit} (the position table's "
                             f"{t3.cfg.gpt2.max_position_embeddings} less max_prefill {cfg.max_prefill}), got {max_tokens}")
        super().__init__(t3, decoder, graphs, cfg, pick, max_tokens=max_tokens, n_params=TURBO_N_PARAMS,
                         default_proc=TURBO_PROC)

    def step(self, slots: Tensor, proc: str, decode) -> None:
        turbo_pool_step(self.t3, self.pool, slots, self.pick, decode)

    def init_slot(self, slot: int, req: T3Request, prefix: int) -> None:
        pool, vocab = self.pool, self.t3.cfg.speech_vocab_size
        row = torch.tensor(turbo_param_row(req.sampling, vocab), dtype=torch.float32)
        pool.params[slot].copy_(host_to_device(row, pool.params.device))
        pool.position[slot, POS_BACKBONE] = prefix
        pool.position[slot, POS_SPEECH] = 1
        pool.seen[slot] = False
        pool.seen[slot, self.t3.cfg.start_speech_token] = True  # the first step's penalty sees the start token

    def scratch_params(self) -> list[float]:
        return turbo_param_row(TurboSamplingConfig(), self.t3.cfg.speech_vocab_size)

    def check_request(self, req: T3Request) -> tuple[Tensor, int]:
        if not isinstance(req.sampling, TurboSamplingConfig):
            raise TypeError(f"Turbo requests sample with a TurboSamplingConfig, got {type(req.sampling).__name__}")
        steps = req.max_new_tokens
        if steps < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {steps}")
        return self.t3.check_text(req.text_tokens), steps

    def covers(self, req: T3Request) -> bool:
        """Whether ``req`` fits the captured graphs: its budget within ``max_tokens`` and its prompt
        ([speaker | prompt tokens | text | start]) plus budget within the last decode window."""
        prompt = req.cond.cond_prompt_speech_tokens
        prompt_len = 0 if prompt is None else prompt.shape[-1]
        if req.cond.cond_prompt_speech_emb is not None:
            prompt_len = req.cond.cond_prompt_speech_emb.shape[1]
        prefix = 1 + prompt_len + req.text_tokens.shape[-1] + 1
        return req.max_new_tokens <= self.max_tokens and prefix + req.max_new_tokens <= self.max_window

    def proc_for(self, req: T3Request) -> str:
        return TURBO_PROC

    def merge_procs(self, procs: list) -> str:
        return TURBO_PROC


__all__ = ["EagerTurboRunner", "GraphedTurboRunner", "TURBO_GRAPHED_MAX_TOKENS", "TURBO_ROWS", "turbo_pick",
           "turbo_pool_step"]
