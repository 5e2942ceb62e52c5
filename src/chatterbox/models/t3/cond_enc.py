"""T3CondEnc: turns the conditioning tensors into the prefix embeddings of the T3 sequence.

Output (B, 1 + Q + 1, C) = [speaker projection | perceiver(prompt embedding) (Q) | emotion projection];
the prompt part is empty when there is no prompt, the emotion part when the model has no emotion
input. (Upstream also reserves a CLAP slot that is always empty.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...nn.dtype import cast_floating
from .perceiver import Perceiver, PerceiverConfig

# emotion_adv is a single scalar per item.
EMOTION_DIM = 1


@dataclass(frozen=True)
class T3CondEncConfig:
    speaker_embed_size: int
    dim: int
    use_perceiver: bool = True
    use_emotion_adv: bool = True
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig.published)

    def __post_init__(self) -> None:
        if self.use_perceiver and self.perceiver.dim != self.dim:
            raise ValueError(f"perceiver dim {self.perceiver.dim} != model dim {self.dim}")

    @classmethod
    def published(cls) -> "T3CondEncConfig":
        return cls(speaker_embed_size=256, dim=1024, perceiver=PerceiverConfig.published())

    @classmethod
    def tiny(cls) -> "T3CondEncConfig":
        return cls(speaker_embed_size=16, dim=64, perceiver=PerceiverConfig.tiny())


class T3CondEnc(nn.Module):
    def __init__(self, cfg: T3CondEncConfig):
        super().__init__()
        self.cfg = cfg
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.dim)
        self.emotion_adv_fc = nn.Linear(EMOTION_DIM, cfg.dim, bias=False) if cfg.use_emotion_adv else None
        self.perceiver = Perceiver(cfg.perceiver) if cfg.use_perceiver else None

    def forward(self, speaker_emb: Tensor, prompt_emb: Tensor | None = None,
                emotion_adv: Tensor | None = None) -> Tensor:
        """speaker_emb (B, S) [any shape with B*S elements], prompt_emb (B, P, C) | None,
        emotion_adv (B, 1, 1) | None -> (B, L_cond, C)."""
        dtype = self.spkr_enc.weight.dtype  # the backbone's: the prefix joins its activations as they are
        speaker_emb, prompt_emb, emotion_adv = (cast_floating(t, dtype) for t in (speaker_emb, prompt_emb, emotion_adv))
        parts = [self.spkr_enc(speaker_emb.reshape(-1, self.cfg.speaker_embed_size))[:, None]]  # (B, 1, C)
        if prompt_emb is not None:
            parts.append(self.perceiver(prompt_emb) if self.perceiver is not None else prompt_emb)
        if self.emotion_adv_fc is not None:
            if emotion_adv is None:
                raise ValueError("this model is conditioned on emotion_adv; pass a (B, 1, 1) tensor")
            parts.append(self.emotion_adv_fc(emotion_adv.reshape(-1, 1, EMOTION_DIM)))  # (B, 1, C)
        return torch.cat(parts, dim=1)
