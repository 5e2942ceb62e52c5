"""What a caller asks for: one dataclass for the text, the sampling settings and the streaming
schedule, validated once, instead of the same dozen keyword arguments in every entry point."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.t3.sampling import RESEMBLE_ORDER, SamplingConfig
from ..streaming import FlowStreamConfig

# Seeds are drawn from [0, SEED_RANGE) when the caller gives none.
SEED_RANGE = 2 ** 62
MAX_SEED = 2 ** 63 - 1


@dataclass(frozen=True)
class SynthesisRequest:
    """One request. ``max_new_tokens`` bounds T3's speech tokens per text segment (long texts are
    split into segments of at most ``TextSplitConfig.max_tokens`` text tokens, each generated on
    its own). ``chunk_size`` (an int, or a schedule whose last value repeats), ``context_window``
    and ``lookahead_tokens`` apply to streaming only."""

    text: str
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    top_p: float = 1.0
    top_k: int = 1000  # Chatterbox-Turbo's top-k (the original model has none)
    max_new_tokens: int = 1000
    seed: int | None = None
    watermark: bool | None = None
    chunk_size: int | tuple[int, ...] = 25
    context_window: int = 50
    lookahead_tokens: int = 3
    order: tuple[str, ...] = field(default=RESEMBLE_ORDER)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        if not np.isfinite(self.exaggeration):
            raise ValueError(f"exaggeration must be a finite number, got {self.exaggeration!r}")
        if not np.isfinite(self.cfg_weight):
            raise ValueError(f"cfg_weight must be a finite number, got {self.cfg_weight!r}")
        sizes = (self.chunk_size,) if isinstance(self.chunk_size, (int, np.integer)) else tuple(self.chunk_size)
        if not sizes or any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"chunk_size must be a positive int or a non-empty list of them, got {self.chunk_size!r}")
        is_schedule = isinstance(self.chunk_size, (list, tuple))
        object.__setattr__(self, "chunk_size", tuple(int(s) for s in sizes) if is_schedule else int(sizes[0]))
        self.sampling()  # validates temperature, top_p, min_p, repetition_penalty, order
        self.flow_stream()  # validates context_window and lookahead_tokens

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=float(self.temperature), cfg_weight=float(self.cfg_weight),
                              top_p=float(self.top_p), min_p=float(self.min_p),
                              repetition_penalty=float(self.repetition_penalty), order=tuple(self.order))

    def flow_stream(self) -> FlowStreamConfig:
        return FlowStreamConfig(context_window=int(self.context_window), lookahead_tokens=int(self.lookahead_tokens))

    def replace(self, **changes) -> "SynthesisRequest":
        return dataclasses.replace(self, **changes)

    def resolved_seed(self) -> int:
        """The seed, or one drawn from torch's global generator (so ``torch.manual_seed`` still makes
        unseeded runs repeatable)."""
        if self.seed is not None:
            return int(self.seed)
        return int(torch.randint(0, SEED_RANGE, (1,)))
