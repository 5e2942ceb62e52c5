"""1-D convolutions that can run as 4-D ``(B, C, 1, T)`` convolutions.

They keep ``nn.Conv1d`` / ``nn.ConvTranspose1d`` parameters, keys and shapes (weight-norm
parametrizations included), so checkpoints load unchanged. When ``run_as_4d`` is set (by the
channels-last optimisation pass, never by model code) the same weights are viewed as ``(O, I, 1, k)``
and the input as ``(B, C, 1, T)``, which makes ``torch.channels_last`` a legal layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .determinism import deterministic_cudnn


def _as_4d_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x4 = x.unsqueeze(2)  # (B, C, 1, T)
    if channels_last:
        x4 = x4.contiguous(memory_format=torch.channels_last)
    return x4


class Conv1d(nn.Conv1d):
    run_as_4d: bool = False
    channels_last: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.run_as_4d:
            return super().forward(x)
        if self.padding_mode != "zeros":
            raise NotImplementedError("4-D execution supports zero padding only")
        if isinstance(self.padding, str):
            raise NotImplementedError("4-D execution needs a numeric padding")
        weight = self.weight.unsqueeze(2)  # (O, I/groups, 1, k)
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(
            _as_4d_input(x, self.channels_last),
            weight,
            self.bias,
            stride=(1, self.stride[0]),
            padding=(0, self.padding[0]),
            dilation=(1, self.dilation[0]),
            groups=self.groups,
        )
        return y.squeeze(2)


class ConvTranspose1d(nn.ConvTranspose1d):
    run_as_4d: bool = False
    channels_last: bool = False

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if x.is_cuda:
            with deterministic_cudnn():  # same input, same bits (see nn/determinism.py)
                return self._forward(x, output_size)
        return self._forward(x, output_size)

    def _forward(self, x: torch.Tensor, output_size: list[int] | None) -> torch.Tensor:
        if not self.run_as_4d or output_size is not None:
            return super().forward(x, output_size)
        weight = self.weight.unsqueeze(2)  # (I, O/groups, 1, k)
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        y = F.conv_transpose2d(
            _as_4d_input(x, self.channels_last),
            weight,
            self.bias,
            stride=(1, self.stride[0]),
            padding=(0, self.padding[0]),
            output_padding=(0, self.output_padding[0]),
            groups=self.groups,
            dilation=(1, self.dilation[0]),
        )
        return y.squeeze(2)
