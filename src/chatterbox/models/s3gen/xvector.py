"""CAMPPlus x-vector speaker encoder (S3Gen's ``speaker_encoder``) and its Kaldi fbank front end.

Pipeline: 16 kHz waveform -> Kaldi fbank (80 bins, mean removed) -> FCM 2-D head -> strided TDNN ->
three CAM dense blocks -> BN-ReLU -> mean/std pooling -> 1x1 projection + BatchNorm -> 192-d x-vector.

Batching follows the published model: each item's features are computed (and mean-normalised) on its
own, shorter items are zero-padded to the longest and the network runs unmasked, so a padded item gets
another x-vector than alone. Every BatchNorm is inference-only (running statistics whatever
``module.training`` says). Attribute names mirror the checkpoint's keys (``nonlinear.batchnorm``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ...nn.conv import Conv1d
from ...nn.dtype import as_float32, cast_floating, weight_dtype
from .kaldi_fbank import KaldiFbankConfig
from .kaldi_fbank import kaldi_fbank as _kaldi_fbank

# Kaldi fbank front end (torchaudio defaults otherwise: 25 ms Povey window, 10 ms shift, snip_edges).
_FBANK = KaldiFbankConfig.published()
FBANK_SAMPLE_RATE = _FBANK.sample_rate
FBANK_NUM_MEL_BINS = _FBANK.n_mels
FBANK_WINDOW_SAMPLES = _FBANK.window_samples  # 25 ms at 16 kHz: shorter input yields no frame at all
FBANK_HOP_SAMPLES = _FBANK.hop_samples
# The unbiased std of the statistics pooling needs two frames after the strided TDNN (with fewer,
# upstream silently returns NaN).
MIN_POOLED_FRAMES = 2


# Frequency-axis padding/kernel of the 2-D FCM convolutions, and of the 1x1 shortcut projection.
_HEAD_KERNEL = 3
_HEAD_PADDING = 1
_SHORTCUT_KERNEL = 1


class FrozenBatchNorm(nn.Module):
    """BatchNorm over dim 1 of (B, C, ...) that only ever uses its running statistics.

    Holds the same state-dict entries as ``nn.BatchNorm1d/2d`` (``num_batches_tracked`` included,
    unused) so published checkpoints load strictly.
    """

    def __init__(self, channels: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class NormAct(nn.Module):
    """BatchNorm, optionally followed by ReLU; the checkpoint nests the norm as ``.batchnorm``."""

    def __init__(self, channels: int, eps: float, affine: bool = True, relu: bool = True) -> None:
        super().__init__()
        self.batchnorm = FrozenBatchNorm(channels, eps, affine=affine)
        self.use_relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.batchnorm(x)
        return F.relu(y) if self.use_relu else y


class ResBlock2d(nn.Module):
    """Two 3x3 convs with a residual; the first conv (and the shortcut) may stride the frequency axis."""

    def __init__(self, in_channels: int, channels: int, freq_stride: int, eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, _HEAD_KERNEL, stride=(freq_stride, 1),
                               padding=_HEAD_PADDING, bias=False)
        self.bn1 = FrozenBatchNorm(channels, eps)
        self.conv2 = nn.Conv2d(channels, channels, _HEAD_KERNEL, stride=1, padding=_HEAD_PADDING, bias=False)
        self.bn2 = FrozenBatchNorm(channels, eps)
        if freq_stride != 1 or in_channels != channels:
            # Indexed children so the keys read shortcut.0 (conv) / shortcut.1 (norm).
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, channels, _SHORTCUT_KERNEL, stride=(freq_stride, 1), bias=False),
                FrozenBatchNorm(channels, eps),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, T) -> (B, C', F', T)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def strided_length(n: int, stride: int) -> int:
    """Output length of a kernel-3, padding-1 conv with this stride (also of the 1x1 shortcut)."""
    return (n - 1) // stride + 1


class FCMHead(nn.Module):
    """2-D residual front end over (frequency, time); flattens channels x frequency at the end."""

    def __init__(self, feat_dim: int, channels: int, layer_blocks: tuple[int, ...], freq_stride: int,
                 eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, _HEAD_KERNEL, stride=1, padding=_HEAD_PADDING, bias=False)
        self.bn1 = FrozenBatchNorm(channels, eps)
        freq = feat_dim
        for i, n_blocks in enumerate(layer_blocks):
            blocks = [ResBlock2d(channels, channels, freq_stride if j == 0 else 1, eps) for j in range(n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            freq = strided_length(freq, freq_stride)
        self.n_layers = len(layer_blocks)
        self.conv2 = nn.Conv2d(channels, channels, _HEAD_KERNEL, stride=(freq_stride, 1),
                               padding=_HEAD_PADDING, bias=False)
        self.bn2 = FrozenBatchNorm(channels, eps)
        self.out_channels = channels * strided_length(freq, freq_stride)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, F, T) -> (B, C*F', T)
        x = F.relu(self.bn1(self.conv1(feats.unsqueeze(1))))  # (B, C, F, T)
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        x = F.relu(self.bn2(self.conv2(x)))  # (B, C, F', T)
        return x.flatten(1, 2)


class TDNNLayer(nn.Module):
    """Strided 1-D conv (no bias) then BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, eps: float) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"TDNN kernel must be odd for symmetric padding, got {kernel_size}")
        self.linear = Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                             padding=(kernel_size - 1) // 2, bias=False)
        self.nonlinear = NormAct(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C', ceil(T/stride))
        return self.nonlinear(self.linear(x))


def segment_context(x: torch.Tensor, seg_len: int) -> torch.Tensor:
    """Average over consecutive ``seg_len``-frame segments, broadcast back to every frame.

    The last segment may be short; ``ceil_mode`` averages it over its real frames only.
    """
    seg = F.avg_pool1d(x, kernel_size=seg_len, stride=seg_len, ceil_mode=True)  # (B, C, S)
    return seg.repeat_interleave(seg_len, dim=-1)[..., : x.shape[-1]]  # (B, C, T)


class CAMLayer(nn.Module):
    """Local conv gated by a sigmoid of (utterance mean + segment mean) context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 reduction: int, seg_len: int) -> None:
        super().__init__()
        self.linear_local = Conv1d(bn_channels, out_channels, kernel_size, dilation=dilation,
                                   padding=(kernel_size - 1) // 2 * dilation, bias=False)
        self.linear1 = Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = Conv1d(bn_channels // reduction, out_channels, 1)
        self.seg_len = seg_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cb, T) -> (B, Co, T)
        local = self.linear_local(x)
        context = x.mean(-1, keepdim=True) + segment_context(x, self.seg_len)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return local * gate


class CAMDenseLayer(nn.Module):
    """BN-ReLU, 1x1 bottleneck, BN-ReLU, CAM layer: emits ``growth`` new channels."""

    def __init__(self, in_channels: int, growth: int, bn_channels: int, kernel_size: int, dilation: int,
                 reduction: int, seg_len: int, eps: float) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CAM kernel must be odd for symmetric padding, got {kernel_size}")
        self.nonlinear1 = NormAct(in_channels, eps)
        self.linear1 = Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = NormAct(bn_channels, eps)
        self.cam_layer = CAMLayer(bn_channels, growth, kernel_size, dilation, reduction, seg_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, T) -> (B, growth, T)
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseBlock(nn.Module):
    """DenseNet-style stack: each layer's output is concatenated onto its input."""

    def __init__(self, n_layers: int, in_channels: int, growth: int, bn_channels: int, kernel_size: int,
                 dilation: int, reduction: int, seg_len: int, eps: float) -> None:
        super().__init__()
        self.n_layers = n_layers
        for i in range(n_layers):
            layer = CAMDenseLayer(in_channels + i * growth, growth, bn_channels, kernel_size, dilation,
                                  reduction, seg_len, eps)
            self.add_module(f"tdnnd{i + 1}", layer)
        self.out_channels = in_channels + n_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C + n*growth, T)
        for i in range(self.n_layers):
            x = torch.cat([x, getattr(self, f"tdnnd{i + 1}")(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN-ReLU then a bias-free 1x1 conv that shrinks the channel count."""

    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.nonlinear = NormAct(in_channels, eps)
        self.linear = Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, T) -> (B, Cout, T)
        return self.linear(self.nonlinear(x))


def stats_pool(x: torch.Tensor) -> torch.Tensor:
    """Time mean and unbiased time std, concatenated: (B, C, T) -> (B, 2C)."""
    return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class DenseLayer(nn.Module):
    """Bias-free 1x1 projection of the pooled statistics, then a BatchNorm without affine."""

    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.linear = Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = NormAct(out_channels, eps, affine=False, relu=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, Cin) -> (B, Cout)
        return self.nonlinear(self.linear(pooled.unsqueeze(-1))).squeeze(-1)


@dataclass(frozen=True)
class CAMPPlusConfig:
    feat_dim: int = FBANK_NUM_MEL_BINS
    embedding_size: int = 192
    head_channels: int = 32
    head_layer_blocks: tuple[int, ...] = (2, 2)
    head_freq_stride: int = 2
    init_channels: int = 128
    tdnn_kernel: int = 5
    tdnn_stride: int = 2
    growth_rate: int = 32
    bn_size: int = 4  # bottleneck width = bn_size * growth_rate
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    cam_reduction: int = 2
    cam_seg_len: int = 100
    bn_eps: float = 1e-5
    fbank: KaldiFbankConfig = field(default_factory=KaldiFbankConfig.published)

    @classmethod
    def published(cls) -> "CAMPPlusConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "CAMPPlusConfig":
        """A ~12k-parameter model with the same topology, for fast unit tests."""
        return cls(embedding_size=16, head_channels=4, head_layer_blocks=(1, 1), init_channels=16,
                   growth_rate=8, bn_size=2, block_layers=(2, 2, 2), cam_seg_len=10)

    def __post_init__(self) -> None:
        n = len(self.block_layers)
        if len(self.block_kernels) != n or len(self.block_dilations) != n:
            raise ValueError("block_layers, block_kernels and block_dilations must have the same length")
        if self.fbank.n_mels != self.feat_dim:
            raise ValueError(f"fbank.n_mels ({self.fbank.n_mels}) must equal feat_dim ({self.feat_dim})")


class CAMPPlusOutputs(NamedTuple):
    head_out: torch.Tensor  # (B, head channels * reduced freq, T) FCM head output
    stats_pool: torch.Tensor  # (B, 2 * C) mean ++ unbiased std over time
    xvector: torch.Tensor  # (B, embedding_size)


def kaldi_fbank(wav: torch.Tensor, cfg: KaldiFbankConfig | None = None, mel_banks: torch.Tensor | None = None,
                window: torch.Tensor | None = None) -> torch.Tensor:
    """Kaldi log-mel fbank of one 16 kHz float waveform: (L,) -> (1 + (L - 400) // 160, 80).

    Equal to ``torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=80)``; see ``kaldi_fbank.py``.
    """
    return _kaldi_fbank(wav, cfg or _FBANK, mel_banks, window)


def campplus_features(wav: torch.Tensor | Sequence[torch.Tensor], cfg: KaldiFbankConfig | None = None,
                      mel_banks: torch.Tensor | None = None, window: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-normalised fbank features of a batch: (B, L) or a list of (L_i,) -> (B, T_max, 80).

    Each item is mean-normalised over its own frames; shorter items are then zero-padded at the end.
    ``mel_banks`` / ``window``: prebuilt fbank constants (``CAMPPlus`` passes its buffers).
    """
    if isinstance(wav, torch.Tensor):
        if wav.dim() != 2:
            raise ValueError(f"campplus_features expects (B, L) or a list of (L,) waveforms, got {tuple(wav.shape)}")
        items = wav.unbind(0)
    else:
        items = list(wav)
    if len(items) == 0:
        raise ValueError("campplus_features got an empty batch")
    cfg = cfg or _FBANK
    if mel_banks is None:
        mel_banks = cfg.mel_banks()
    if window is None:
        window = cfg.window()
    feats = []
    for item in items:
        fb = _kaldi_fbank(item, cfg, mel_banks, window)  # (T_i, 80)
        feats.append(fb - fb.mean(dim=0, keepdim=True))
    if len(feats) == 1:
        return feats[0].unsqueeze(0)
    return pad_sequence(feats, batch_first=True, padding_value=0.0)  # (B, T_max, 80)


class XVectorTrunk(nn.Module):
    """Frame-level TDNN/CAM trunk plus the segment-level projection (checkpoint prefix ``xvector.``)."""

    def __init__(self, cfg: CAMPPlusConfig, in_channels: int) -> None:
        super().__init__()
        self.n_blocks = len(cfg.block_layers)
        self.tdnn = TDNNLayer(in_channels, cfg.init_channels, cfg.tdnn_kernel, cfg.tdnn_stride, cfg.bn_eps)
        channels = cfg.init_channels
        bn_channels = cfg.bn_size * cfg.growth_rate
        for i, (n_layers, kernel, dilation) in enumerate(zip(cfg.block_layers, cfg.block_kernels,
                                                             cfg.block_dilations)):
            block = CAMDenseBlock(n_layers, channels, cfg.growth_rate, bn_channels, kernel, dilation,
                                  cfg.cam_reduction, cfg.cam_seg_len, cfg.bn_eps)
            self.add_module(f"block{i + 1}", block)
            channels = block.out_channels
            self.add_module(f"transit{i + 1}", TransitLayer(channels, channels // 2, cfg.bn_eps))
            channels //= 2
        self.out_nonlinear = NormAct(channels, cfg.bn_eps)
        self.dense = DenseLayer(2 * channels, cfg.embedding_size, cfg.bn_eps)
        self.frame_channels = channels

    def frames(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_head, T) -> (B, C, T')
        x = self.tdnn(x)
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i + 1}")(x)
            x = getattr(self, f"transit{i + 1}")(x)
        return self.out_nonlinear(x)


class CAMPPlus(nn.Module):
    """CAMPPlus speaker encoder; inference-only (BatchNorm always uses running statistics)."""

    def __init__(self, cfg: CAMPPlusConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = FCMHead(cfg.feat_dim, cfg.head_channels, cfg.head_layer_blocks, cfg.head_freq_stride,
                            cfg.bn_eps)
        self.xvector = XVectorTrunk(cfg, self.head.out_channels)
        # Fbank constants, built once on the host (also under a meta-device construction) and moved
        # with the module; not checkpoint entries. A dtype pass may lower them with the weights:
        # the features are still computed in the waveform's dtype.
        self.register_buffer("fbank_mel_banks", cfg.fbank.mel_banks(), persistent=False)
        self.register_buffer("fbank_window", cfg.fbank.window(), persistent=False)

    @property
    def min_feature_frames(self) -> int:
        """Fewest fbank frames that leave ``MIN_POOLED_FRAMES`` frames after the strided TDNN."""
        return (MIN_POOLED_FRAMES - 1) * self.cfg.tdnn_stride + 1

    def forward_with_intermediates(self, feats: torch.Tensor) -> CAMPPlusOutputs:
        """(B, T, feat_dim) mean-normalised fbank -> head output, pooled statistics and x-vector."""
        if feats.dim() != 3 or feats.shape[-1] != self.cfg.feat_dim:
            raise ValueError(f"CAMPPlus expects features (B, T, {self.cfg.feat_dim}), got {tuple(feats.shape)}")
        min_frames = self.min_feature_frames
        if feats.shape[1] < min_frames:
            raise ValueError(f"CAMPPlus needs at least {min_frames} fbank frames "
                             f"({FBANK_WINDOW_SAMPLES + (min_frames - 1) * FBANK_HOP_SAMPLES} samples at "
                             f"{FBANK_SAMPLE_RATE} Hz) for its std pooling, got {feats.shape[1]}")
        feats = cast_floating(feats, weight_dtype(self.head))
        head_out = self.head(feats.transpose(1, 2))  # (B, C_head, T)
        pooled = stats_pool(self.xvector.frames(head_out))  # (B, 2C)
        return CAMPPlusOutputs(as_float32(head_out), as_float32(pooled), as_float32(self.xvector.dense(pooled)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, T, 80) -> (B, 192)
        return self.forward_with_intermediates(feats).xvector

    def features(self, wav: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``campplus_features`` with this module's fbank buffers: waveforms on its device -> (B, T, 80)."""
        return campplus_features(wav, self.cfg.fbank, self.fbank_mel_banks, self.fbank_window)

    def inference(self, wav: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """16 kHz float waveforms, (B, L) or a list of (L_i,), -> x-vectors (B, 192)."""
        return self.forward(self.features(wav))
