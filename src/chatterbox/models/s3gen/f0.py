"""Pitch (F0) predictor of the HiFT vocoder: a stack of weight-normed convolutions on the mel.

Checkpoint layout (under ``mel2wav.f0_predictor.``): ``condnet.{0,2,4,6,8}`` are the convolutions
(the odd slots are the parameter-free ELUs), ``classifier`` is the final projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ...nn.conv import Conv1d

# One pitch value per frame.
_F0_OUTPUTS = 1


@dataclass(frozen=True)
class F0PredictorConfig:
    in_channels: int = 80
    hidden_channels: int = 512
    num_layers: int = 5
    kernel_size: int = 3

    @classmethod
    def published(cls) -> "F0PredictorConfig":
        return cls(in_channels=80, hidden_channels=512, num_layers=5, kernel_size=3)

    @classmethod
    def tiny(cls) -> "F0PredictorConfig":
        return cls(in_channels=8, hidden_channels=16, num_layers=2, kernel_size=3)


class F0Predictor(nn.Module):
    """mel (B, n_mels, T) -> non-negative F0 in Hz, (B, T)."""

    def __init__(self, cfg: F0PredictorConfig) -> None:
        super().__init__()
        if cfg.kernel_size % 2 != 1:
            raise ValueError(f"F0 predictor kernel size must be odd to keep the frame count, got {cfg.kernel_size}")
        self.cfg = cfg
        layers: list[nn.Module] = []
        for i in range(cfg.num_layers):
            in_ch = cfg.in_channels if i == 0 else cfg.hidden_channels
            conv = Conv1d(in_ch, cfg.hidden_channels, cfg.kernel_size, padding=cfg.kernel_size // 2)
            layers.append(weight_norm(conv))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.hidden_channels, _F0_OUTPUTS)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"F0 predictor expects mel (B, {self.cfg.in_channels}, T), got {tuple(mel.shape)}")
        h = self.condnet(mel.to(self.classifier.weight.dtype))  # (B, H, T)
        logits = self.classifier(h.transpose(1, 2))  # (B, T, 1)
        # The sine source accumulates phase from this, so hand it over in float32 whatever the conv dtype.
        return logits.squeeze(-1).abs().float()  # (B, T)
