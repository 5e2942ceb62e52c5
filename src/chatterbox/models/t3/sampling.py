"""Next-token selection for T3: CFG mix, logits processors, and sampling.

Everything stays on the device with fixed shapes: the repetition penalty reads a (B, vocab) boolean
"seen" mask instead of a growing id list, and nothing here syncs with the host.

The processors reproduce HF transformers' semantics (RepetitionPenaltyLogitsProcessor,
TopPLogitsWarper, MinPLogitsWarper, with ``min_tokens_to_keep=1`` and ``-inf`` filtering). Their
order differs between upstreams, so it is a config field:

* streaming fork (``T3.inference`` / ``inference_stream``): CFG -> temperature -> repetition
  penalty -> top-p -> softmax (it has no min-p; min-p sits before top-p when enabled);
* resemble-ai/chatterbox (newer): CFG -> repetition penalty -> temperature -> min-p -> top-p -> softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

TEMPERATURE = "temperature"
REPETITION_PENALTY = "repetition_penalty"
MIN_P = "min_p"
TOP_P = "top_p"
STREAM_ORDER = (TEMPERATURE, REPETITION_PENALTY, MIN_P, TOP_P)
RESEMBLE_ORDER = (REPETITION_PENALTY, TEMPERATURE, MIN_P, TOP_P)

# Names under which a recorder receives tensors.
REC_RAW_LOGITS = "raw_logits"  # (2, V): last-position logits of [cond, uncond]
REC_BEFORE_TOP_P = "before_top_p"  # (1, V): scores entering the top-p stage
REC_PROBS = "probs"  # (1, V): the distribution handed to the sampler

Recorder = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    cfg_weight: float = 0.5
    top_p: float = 0.8
    min_p: float = 0.0
    repetition_penalty: float = 2.0
    order: tuple[str, ...] = STREAM_ORDER

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if sorted(self.order) != sorted(STREAM_ORDER):
            raise ValueError(f"order must be a permutation of {STREAM_ORDER}, got {self.order}")

    @classmethod
    def published(cls) -> "SamplingConfig":
        """The streaming fork's ``T3.inference`` / ``generate`` defaults."""
        return cls()

    @classmethod
    def resemble(cls) -> "SamplingConfig":
        """resemble-ai/chatterbox ``T3.inference`` defaults and processor order."""
        return cls(temperature=0.8, cfg_weight=0.5, top_p=0.95, min_p=0.05, repetition_penalty=1.2,
                   order=RESEMBLE_ORDER)


class StepRecorder:
    """Collects what the sampling loop reports, one tensor per step and name."""

    def __init__(self) -> None:
        self.steps: dict[str, list[Tensor]] = {}

    def __call__(self, name: str, value: Tensor) -> None:
        self.steps.setdefault(name, []).append(value.detach())

    def stacked(self, name: str) -> Tensor:
        return torch.stack(self.steps[name])


def cfg_mix(cond: Tensor, uncond: Tensor, weight: float | Tensor) -> Tensor:
    """Classifier-free guidance as upstream writes it: c + w * (c - u)."""
    return cond + weight * (cond - uncond)


# Per-row sampling settings, for rows of requests sampled together (``sample_rows``): one float32
# row per request, in these columns. The top-p column holds the cut 1 - top_p, computed in double
# precision on the host as the scalar path computes it.
PARAM_TEMPERATURE, PARAM_CFG_WEIGHT, PARAM_TOP_P_CUT, PARAM_MIN_P, PARAM_REPETITION_PENALTY = range(5)
N_PARAMS = 5


def param_row(cfg: SamplingConfig) -> list[float]:
    """A request's settings as one row of the per-row parameter table (see ``sample_rows``)."""
    row = [0.0] * N_PARAMS
    row[PARAM_TEMPERATURE] = cfg.temperature
    row[PARAM_CFG_WEIGHT] = cfg.cfg_weight
    row[PARAM_TOP_P_CUT] = 1 - cfg.top_p
    row[PARAM_MIN_P] = cfg.min_p
    row[PARAM_REPETITION_PENALTY] = cfg.repetition_penalty
    return row


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    if isinstance(temperature, float) and temperature == 1.0:
        return logits
    return logits / temperature


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """HF rule on every seen id: negative scores are multiplied by ``penalty``, others divided."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_min_p(logits: Tensor, min_p: float | Tensor) -> Tensor:
    """Drop ids whose probability is below ``min_p`` times the top probability (top id always kept).
    A row with ``min_p`` 0 is left unchanged (no probability is below zero)."""
    if isinstance(min_p, float) and min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """HF nucleus filter: sort ascending, drop ids whose cumulative probability is <= 1 - top_p,
    always keep the most likely id."""
    if top_p >= 1.0:
        # Only zero-probability ids could go, which changes no probability.
        return logits
    return apply_top_p_cut(logits, 1 - top_p)


def apply_top_p_cut(logits: Tensor, cut: float | Tensor) -> Tensor:
    """``apply_top_p`` given the cut ``1 - top_p`` (a float, or per row (B, 1)). A cut of 0 drops only
    ids of zero probability, which changes no probability."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= cut
    drop_sorted = torch.cat((drop_sorted[..., :-1], torch.zeros_like(drop_sorted[..., -1:])), dim=-1)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, seen: Tensor, cfg: SamplingConfig, record: Recorder | None = None) -> Tensor:
    """Apply the processors in ``cfg.order`` to guided logits (B, V)."""
    for stage in cfg.order:
        if stage == TEMPERATURE:
            logits = apply_temperature(logits, cfg.temperature)
        elif stage == REPETITION_PENALTY:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        elif stage == MIN_P:
            logits = apply_min_p(logits, cfg.min_p)
        else:
            if record is not None:
                record(REC_BEFORE_TOP_P, logits)
            logits = apply_top_p(logits, cfg.top_p)
    return logits


@dataclass(frozen=True)
class RowProcessing:
    """What ``sample_rows`` computes for a batch, fixed when a step is built (e.g. captured): the
    processor order, and whether min-p and top-p run at all (a batch where every row has min_p 0
    and top_p 1 may skip them; they would change nothing)."""

    order: tuple[str, ...] = STREAM_ORDER
    min_p: bool = True
    top_p: bool = True

    @classmethod
    def for_rows(cls, rows: "list[SamplingConfig]", order: tuple[str, ...]) -> "RowProcessing":
        return cls(order=tuple(order), min_p=any(r.min_p > 0.0 for r in rows), top_p=any(r.top_p < 1.0 for r in rows))


def sample_rows(logits: Tensor, seen: Tensor, race: Tensor, params: Tensor, proc: RowProcessing) -> Tensor:
    """One token for each of B requests: logits (B, 2, V) of [cond, uncond], seen (B, V), race (B, V)
    of Exp(1) draws, params (B, N_PARAMS) (``param_row``) -> tokens (B, 1). The same math as
    ``sample_next`` row by row; pure tensors in and out, so a runner may compile and capture it."""
    col = params.to(logits.dtype)
    guided = cfg_mix(logits[:, 0], logits[:, 1], col[:, PARAM_CFG_WEIGHT:PARAM_CFG_WEIGHT + 1])
    for stage in proc.order:
        if stage == TEMPERATURE:
            guided = apply_temperature(guided, col[:, PARAM_TEMPERATURE:PARAM_TEMPERATURE + 1])
        elif stage == REPETITION_PENALTY:
            guided = apply_repetition_penalty(guided, seen, col[:, PARAM_REPETITION_PENALTY:PARAM_REPETITION_PENALTY + 1])
        elif stage == MIN_P:
            if proc.min_p:
                guided = apply_min_p(guided, col[:, PARAM_MIN_P:PARAM_MIN_P + 1])
        elif proc.top_p:
            guided = apply_top_p_cut(guided, col[:, PARAM_TOP_P_CUT:PARAM_TOP_P_CUT + 1])
    return pick_by_race(guided.softmax(dim=-1), race)


def exponential_race(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Exp(1) draws shaped like ``like`` (the random half of a categorical draw, see ``pick_by_race``)."""
    return torch.empty_like(like).exponential_(1, generator=generator)


def pick_by_race(probs: Tensor, race: Tensor) -> Tensor:
    """``argmax(p / E)`` per row (B, V) -> (B, 1): with E ~ Exp(1) it picks id i with probability p_i."""
    return (probs / race).argmax(dim=-1, keepdim=True)


def new_seen(batch: int, vocab: int, first_ids: Tensor) -> Tensor:
    """A (batch, vocab) mask with ``first_ids`` (batch, k) marked, e.g. the initial BOS."""
    empty = torch.zeros(batch, vocab, dtype=torch.bool, device=first_ids.device)
    return mark_seen(empty, first_ids)


def mark_seen(seen: Tensor, ids: Tensor) -> Tensor:
    """Out-of-place: ``seen`` with ``ids`` (B, k) set."""
    return seen.scatter(1, ids, True)


def sample_next(raw_logits: Tensor, seen: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                forced: Tensor | None = None, record: Recorder | None = None) -> Tensor:
    """One step: raw logits (2, V) of [cond, uncond] rows -> next token (1, 1).

    ``forced`` (1, 1), when given, replaces the multinomial draw (parity replays); the distribution
    is still computed so it can be recorded.
    """
    if record is not None:
        record(REC_RAW_LOGITS, raw_logits)
    guided = cfg_mix(raw_logits[0:1], raw_logits[1:2], cfg.cfg_weight)  # (1, V)
    probs = process_logits(guided, seen, cfg, record).softmax(dim=-1)
    if record is not None:
        record(REC_PROBS, probs)
    if forced is not None:
        return forced
    return torch.multinomial(probs, 1, generator=generator)
