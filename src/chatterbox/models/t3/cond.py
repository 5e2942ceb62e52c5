"""``T3Cond``: the non-text conditioning of T3 (speaker, speech prompt, emotion).

Field names and shapes follow upstream's ``T3Cond.__dict__``, which is what ``conds.pt`` stores
under ``"t3"``. Unlike upstream, nothing here is mutated in place: ``to`` and ``replace`` return new
objects, and T3 never writes the prompt embedding back into the caller's instance.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

# Upstream's default exaggeration when no emotion value is given.
DEFAULT_EMOTION_ADV = 0.5


@dataclass
class T3Cond:
    speaker_emb: Tensor  # (1, speaker_dim)
    clap_emb: Tensor | None = None  # unsupported upstream; must stay None
    cond_prompt_speech_tokens: Tensor | None = None  # (1, P) int64
    cond_prompt_speech_emb: Tensor | None = None  # (1, P, C), derived from the tokens when None
    emotion_adv: Tensor | float = DEFAULT_EMOTION_ADV  # (1, 1, 1)

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.emotion_adv):
            self.emotion_adv = torch.full((1, 1, 1), float(self.emotion_adv), dtype=self.speaker_emb.dtype,
                                          device=self.speaker_emb.device)
        if self.clap_emb is not None:
            raise NotImplementedError("clap_emb conditioning is not supported (upstream asserts it is None)")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "T3Cond":
        """A copy on ``device``; floating tensors are also cast to ``dtype`` (token ids keep theirs)."""
        def move(v: Any) -> Any:
            if not torch.is_tensor(v):
                return v
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        return T3Cond(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def replace(self, **changes: Any) -> "T3Cond":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Tensor | None]:
        """The upstream ``T3Cond.__dict__`` layout (``conds.pt["t3"]``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "T3Cond":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"unknown T3Cond fields: {unknown}")
        if "speaker_emb" not in state:
            raise ValueError("T3Cond needs speaker_emb")
        return cls(**dict(state))
