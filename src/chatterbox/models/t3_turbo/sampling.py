"""Next-token selection of the Turbo/Nano T3, and the token clean-up before S3Gen.

Upstream's ``T3.inference_turbo`` runs HF logits processors in this order, each only when it would
act: temperature (when > 0 and != 1) -> top-k -> top-p (when < 1) -> repetition penalty (when != 1),
then softmax and a multinomial draw. There is no guidance (batch 1 per request).

Its repetition penalty reads a step-dependent id list: the first token (sampled from the prefill)
sees only the start-of-speech token; every later step sees the tokens generated so far, *without*
the start token. Here that list is a (B, vocab) boolean mask, so nothing grows or syncs per token.

Top-k keeps every score tied with the k-th largest (HF's ``scores < kth`` rule); top-p is HF's
ascending-sort nucleus filter (``models.t3.sampling.apply_top_p``); the penalty follows HF's rule
(negative scores times the penalty, others divided) and leaves ``-inf`` scores at ``-inf``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..t3.sampling import (REC_PROBS, REC_RAW_LOGITS, Recorder, apply_repetition_penalty, apply_top_p, apply_top_p_cut,
                           pick_by_race)

# Name under which a recorder receives the processed scores (1, V) handed to the softmax.
REC_PROCESSED = "processed"


@dataclass(frozen=True)
class TurboSamplingConfig:
    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def published(cls) -> "TurboSamplingConfig":
        """``ChatterboxTurboTTS.generate`` defaults."""
        return cls()


@dataclass(frozen=True)
class SpeechTokenCleanup:
    """What ``ChatterboxTurboTTS.generate`` does between T3 and S3Gen: ids >= ``first_special`` (start
    and stop of speech) are dropped, then ``trailing_silence`` copies of ``silence_token`` appended."""

    first_special: int = 6561
    silence_token: int = 4299
    trailing_silence: int = 3

    @classmethod
    def published(cls) -> "SpeechTokenCleanup":
        return cls()


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` largest scores of each row (and any tied with the k-th), ``-inf`` elsewhere."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def process_turbo_logits(logits: Tensor, seen: Tensor, cfg: TurboSamplingConfig) -> Tensor:
    """Raw speech logits (B, V) -> the scores handed to the softmax (upstream's processor chain)."""
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        logits = apply_top_k(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = apply_top_p(logits, cfg.top_p)
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    return logits


def sample_turbo(raw_logits: Tensor, seen: Tensor, cfg: TurboSamplingConfig,
                 generator: torch.Generator | None = None, forced: Tensor | None = None,
                 record: Recorder | None = None) -> Tensor:
    """One step: raw logits (B, V) and the penalty mask (B, V) -> next tokens (B, 1).

    ``forced`` (B, 1) replaces the multinomial draw (parity replays); the distribution is still
    computed so that ``record`` receives it.
    """
    if record is not None:
        record(REC_RAW_LOGITS, raw_logits)
    processed = process_turbo_logits(raw_logits, seen, cfg)
    probs = processed.softmax(dim=-1)
    if record is not None:
        record(REC_PROCESSED, processed)
        record(REC_PROBS, probs)
    if forced is not None:
        return forced
    return torch.multinomial(probs, 1, generator=generator)


# Per-row settings of requests sampled together (``sample_turbo_rows``): one float32 row per request.
# A stage a request would skip gets its neutral value (temperature 1, top-k of the whole vocabulary,
# cut 0, penalty 1), which leaves every score as it is, exactly. The top-p column holds the cut
# 1 - top_p, computed in double precision on the host as the scalar path computes it.
TURBO_TEMPERATURE, TURBO_TOP_K, TURBO_TOP_P_CUT, TURBO_PENALTY = range(4)
TURBO_N_PARAMS = 4


def turbo_param_row(cfg: TurboSamplingConfig, vocab: int) -> list[float]:
    """A request's settings as one row of the per-row parameter table."""
    row = [0.0] * TURBO_N_PARAMS
    row[TURBO_TEMPERATURE] = cfg.temperature if cfg.temperature > 0 else 1.0
    row[TURBO_TOP_K] = float(min(cfg.top_k, vocab) if cfg.top_k > 0 else vocab)
    row[TURBO_TOP_P_CUT] = 1 - cfg.top_p
    row[TURBO_PENALTY] = cfg.repetition_penalty
    return row


def sample_turbo_rows(logits: Tensor, seen: Tensor, race: Tensor, params: Tensor) -> Tensor:
    """One token for each of B requests: logits (B, V), penalty masks (B, V), Exp(1) draws (B, V) and
    settings (B, TURBO_N_PARAMS) (``turbo_param_row``) -> tokens (B, 1). ``process_turbo_logits`` row
    by row, then the race draw (``models.t3.sampling.pick_by_race``); fixed shapes, no host reads."""
    col = params.to(logits.dtype)
    logits = logits / col[:, TURBO_TEMPERATURE:TURBO_TEMPERATURE + 1]
    k = params[:, TURBO_TOP_K:TURBO_TOP_K + 1].long().clamp(1, logits.shape[-1]) - 1  # (B, 1): the k-th largest
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, k)
    logits = logits.masked_fill(logits < kth, float("-inf"))
    cut = col[:, TURBO_TOP_P_CUT:TURBO_TOP_P_CUT + 1]
    logits = torch.where(cut > 0, apply_top_p_cut(logits, cut), logits)  # top_p 1: skipped, as upstream does
    logits = apply_repetition_penalty(logits, seen, col[:, TURBO_PENALTY:TURBO_PENALTY + 1])
    return pick_by_race(logits.softmax(dim=-1), race)


def ids_mask(batch: int, vocab: int, ids: Tensor) -> Tensor:
    """A (batch, vocab) boolean mask with ``ids`` (batch, k) set."""
    return torch.zeros(batch, vocab, dtype=torch.bool, device=ids.device).scatter(1, ids, True)


def clean_speech_tokens(tokens: Tensor, cleanup: SpeechTokenCleanup = SpeechTokenCleanup()) -> Tensor:
    """Generated tokens (1, N) or (N,) -> the (M + trailing_silence,) codes S3Gen renders.

    One boolean selection (a host sync), once per utterance.
    """
    flat = tokens.reshape(-1)
    kept = flat[flat < cleanup.first_special]
    silence = torch.full((cleanup.trailing_silence,), cleanup.silence_token, dtype=kept.dtype, device=kept.device)
    return torch.cat([kept, silence])
