"""HiFT vocoder (mel -> 24 kHz waveform): neural-source-filter excitation + iSTFT HiFi-GAN.

Stages, kept separate so a streaming driver can carry state between chunks later:

1. ``f0(mel)``: per-frame pitch in Hz;
2. ``source_from_f0(f0, noise)``: sample-rate harmonic excitation (B, 1, L), L = T * samples_per_frame;
3. ``decode(mel, source)``: mel convs + upsampling, fused with a down-sampled STFT of the source,
   ending in a tiny-hop log-magnitude / phase spectrogram (``decode_spec``) that ``spec_to_wav``
   turns into audio with an inverse STFT.

Checkpoint keys live under ``mel2wav.`` in ``s3gen.safetensors``. Convolutions carry torch's
weight-norm parametrization (``...parametrizations.weight.original0/1``); ``fold_weight_norm``
bakes it into plain weights after loading.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from ...nn.conv import Conv1d, ConvTranspose1d
from .f0 import F0Predictor, F0PredictorConfig
from .source import SineSource, SourceConfig, SourceNoise

# The mel branch is padded by one sample on the left after the last upsampler, so its length
# matches the STFT frame count of the source (T * hop_product + 1, from the centred STFT).
_LAST_STAGE_LEFT_PAD = (1, 0)
# A strided source down-sampler sees two strides of STFT frames per output step.
_SOURCE_DOWN_KERNEL_STRIDES = 2


@dataclass(frozen=True)
class HiFTConfig:
    n_mels: int = 80
    base_channels: int = 512
    conv_pre_kernel: int = 7
    conv_post_kernel: int = 7
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    istft_n_fft: int = 16
    istft_hop: int = 4
    lrelu_slope: float = 0.1
    post_lrelu_slope: float = 0.01  # torch's default slope, which upstream uses before conv_post
    snake_eps: float = 1e-9
    max_magnitude: float = 100.0
    audio_limit: float = 0.99
    # Evaluate the F0 predictor in float64 (result rounded to float32). The sine phase integrates
    # F0 over the whole utterance, so a one-ulp F0 difference becomes a growing phase drift; fp32
    # conv kernels (oneDNN, cuDNN, TF32) round differently depending on the sequence length, which
    # would make a streamed F0 (computed on windows) differ from the one-shot one. In float64
    # those differences vanish once rounded, and the F0 stays within its fixture tolerance.
    f0_float64: bool = True
    f0: F0PredictorConfig = field(default_factory=F0PredictorConfig.published)
    source: SourceConfig = field(default_factory=SourceConfig.published)

    @classmethod
    def published(cls) -> "HiFTConfig":
        return cls(
            n_mels=80, base_channels=512, conv_pre_kernel=7, conv_post_kernel=7,
            upsample_rates=(8, 5, 3), upsample_kernel_sizes=(16, 11, 7),
            resblock_kernel_sizes=(3, 7, 11), resblock_dilations=((1, 3, 5),) * 3,
            source_resblock_kernel_sizes=(7, 7, 11), source_resblock_dilations=((1, 3, 5),) * 3,
            istft_n_fft=16, istft_hop=4, lrelu_slope=0.1, post_lrelu_slope=0.01, snake_eps=1e-9,
            max_magnitude=100.0, audio_limit=0.99, f0_float64=True,
            f0=F0PredictorConfig.published(), source=SourceConfig.published(),
        )

    @classmethod
    def tiny(cls, n_mels: int = 8) -> "HiFTConfig":
        """A few-thousand-parameter variant (24 samples per frame) for fast shape/behaviour tests."""
        return cls(
            n_mels=n_mels, base_channels=16, conv_pre_kernel=7, conv_post_kernel=7,
            upsample_rates=(2, 3), upsample_kernel_sizes=(4, 5),
            resblock_kernel_sizes=(3, 5), resblock_dilations=((1, 2), (1, 2)),
            source_resblock_kernel_sizes=(3, 3), source_resblock_dilations=((1, 2), (1, 2)),
            f0=dataclasses.replace(F0PredictorConfig.tiny(), in_channels=n_mels), source=SourceConfig.published(),
        )

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.istft_hop

    @property
    def spec_channels(self) -> int:
        # real and imaginary parts (or log-magnitude and phase) of n_fft // 2 + 1 bins
        return 2 * (self.istft_n_fft // 2 + 1)

    def stage_channels(self, stage: int) -> int:
        return self.base_channels // (2 ** (stage + 1))

    def source_down_rates(self) -> tuple[int, ...]:
        """Stride of each stage's source down-sampler: the upsampling still to come after that stage."""
        return tuple(math.prod(self.upsample_rates[i + 1:]) for i in range(len(self.upsample_rates)))


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _wn_conv(in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1) -> Conv1d:
    conv = Conv1d(in_ch, out_ch, kernel_size, dilation=dilation, padding=_same_padding(kernel_size, dilation))
    return weight_norm(conv)


class Snake(nn.Module):
    """x + sin^2(alpha * x) / alpha, with a learned linear-scale alpha per channel."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, 1)  # (1, C, 1)
        return x + (1.0 / (alpha + self.eps)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation: Snake -> dilated conv -> Snake -> conv, added back onto the input."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], snake_eps: float) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_wn_conv(channels, channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_wn_conv(channels, channels, kernel_size) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels, snake_eps) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels, snake_eps) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class HiFTGenerator(nn.Module):
    """mel (B, n_mels, T) -> 24 kHz waveform (B, T * samples_per_frame); see the module docstring."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        n_stages = len(cfg.upsample_rates)
        if len(cfg.upsample_kernel_sizes) != n_stages or len(cfg.source_resblock_kernel_sizes) != n_stages:
            raise ValueError("HiFTConfig: upsample rates, upsample kernels and source resblocks must have one entry per stage")
        if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilations):
            raise ValueError("HiFTConfig: resblock kernel sizes and dilations differ in length")
        if any((k - u) % 2 for k, u in zip(cfg.upsample_kernel_sizes, cfg.upsample_rates)):
            raise ValueError("HiFTConfig: each upsample kernel minus its rate must be even to scale lengths exactly")
        if cfg.f0.in_channels != cfg.n_mels:
            raise ValueError(f"HiFTConfig: f0 predictor takes {cfg.f0.in_channels} mels, vocoder {cfg.n_mels}")
        self.cfg = cfg
        self.m_source = SineSource(cfg.source)
        self.conv_pre = _wn_conv(cfg.n_mels, cfg.base_channels, cfg.conv_pre_kernel)
        self.ups = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            in_ch = cfg.base_channels if i == 0 else cfg.stage_channels(i - 1)
            up = ConvTranspose1d(in_ch, cfg.stage_channels(i), kernel, rate, padding=(kernel - rate) // 2)
            self.ups.append(weight_norm(up))
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (rate, kernel, dils) in enumerate(zip(cfg.source_down_rates(), cfg.source_resblock_kernel_sizes,
                                                     cfg.source_resblock_dilations)):
            ch = cfg.stage_channels(i)
            if rate == 1:
                self.source_downs.append(Conv1d(cfg.spec_channels, ch, 1))
            else:
                self.source_downs.append(Conv1d(cfg.spec_channels, ch, _SOURCE_DOWN_KERNEL_STRIDES * rate, rate, padding=rate // 2))
            self.source_resblocks.append(ResBlock(ch, kernel, dils, cfg.snake_eps))
        self.resblocks = nn.ModuleList(
            ResBlock(cfg.stage_channels(i), k, d, cfg.snake_eps)
            for i in range(n_stages)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilations)
        )
        self.conv_post = _wn_conv(cfg.stage_channels(n_stages - 1), cfg.spec_channels, cfg.conv_post_kernel)
        self.f0_predictor = F0Predictor(cfg.f0)

    def stft_window(self, device: torch.device) -> torch.Tensor:
        # Made per call (16 values) rather than held as a buffer: it must stay float32 even when a
        # mixed-precision pass casts the module, and a meta-built module has no data to move.
        # Evaluated in float64 and rounded once, which equals upstream's scipy window bit for bit
        # (torch's float32 Hann is off by one ulp in places).
        # Built on the target device (no host-to-device copy inside the forward).
        window = torch.hann_window(self.cfg.istft_n_fft, periodic=True, dtype=torch.float64, device=device)
        return window.float()

    # -- stage 1 ---------------------------------------------------------------------------------
    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) -> F0 in Hz (B, T), float32 (see ``HiFTConfig.f0_float64``)."""
        predictor = self.f0_predictor
        if not self.cfg.f0_float64:
            return predictor(mel)
        if mel.dim() != 3 or mel.shape[1] != predictor.cfg.in_channels:
            raise ValueError(f"F0 predictor expects mel (B, {predictor.cfg.in_channels}, T), got {tuple(mel.shape)}")
        # The effective (weight-normed) weights are taken in their own dtype and cast per call, so a
        # folded and a parametrized module agree, and no float64 copy is kept on the module.
        x = mel.double()  # (B, n_mels, T)
        for layer in predictor.condnet:
            if isinstance(layer, nn.Conv1d):
                x = F.conv1d(x, layer.weight.double(), layer.bias.double(), layer.stride, layer.padding,
                             layer.dilation, layer.groups)
            else:
                x = layer(x)
        logits = F.linear(x.transpose(1, 2), predictor.classifier.weight.double(),
                          predictor.classifier.bias.double())  # (B, T, 1)
        return logits.squeeze(-1).abs().float()  # (B, T), as F0Predictor.forward

    # -- stage 2 ---------------------------------------------------------------------------------
    def f0_samples(self, f0: torch.Tensor) -> torch.Tensor:
        """Per-frame F0 (B, T) -> per-sample F0 (B, T * samples_per_frame), float32."""
        if f0.dim() != 2:
            raise ValueError(f"HiFT expects f0 (B, T), got {tuple(f0.shape)}")
        # nearest-neighbour upsampling by an integer factor, bit-equal to upstream's nn.Upsample
        return f0.float().repeat_interleave(self.cfg.samples_per_frame, dim=-1)

    def source_from_f0(self, f0: torch.Tensor, noise: SourceNoise,
                       cycles_start: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame F0 (B, T) -> excitation (B, 1, T * samples_per_frame).

        ``cycles_start`` (B, num_harmonics) float64 continues the sine phase of a signal whose
        earlier samples are not part of ``f0`` (streaming; see ``source.running_cycles``).
        """
        return self.m_source(self.f0_samples(f0), noise, cycles_start)

    # -- stage 3 ---------------------------------------------------------------------------------
    def source_spectrum(self, source: torch.Tensor) -> torch.Tensor:
        """Source (B, 1, L) -> [real; imag] of its centred STFT, (B, spec_channels, L / hop + 1), float32."""
        cfg = self.cfg
        spec = torch.stft(source.squeeze(1).float(), cfg.istft_n_fft, cfg.istft_hop, cfg.istft_n_fft,
                          window=self.stft_window(source.device), center=True, return_complex=True)  # (B, bins, frames)
        return torch.cat([spec.real, spec.imag], dim=1)

    def decode_spec(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) + source (B, 1, T * samples_per_frame) -> conv_post output (B, spec_channels, F).

        Channels [0, bins) are log-magnitudes, [bins, 2 * bins) phase pre-activations;
        F = T * samples_per_frame / hop + 1.
        """
        cfg = self.cfg
        if mel.dim() != 3 or mel.shape[1] != cfg.n_mels:
            raise ValueError(f"HiFT expects mel (B, {cfg.n_mels}, T), got {tuple(mel.shape)}")
        want = (mel.shape[0], 1, mel.shape[2] * cfg.samples_per_frame)
        if tuple(source.shape) != want:
            raise ValueError(f"HiFT source must be {want} for mel {tuple(mel.shape)}, got {tuple(source.shape)}")
        dtype = self.conv_pre.bias.dtype
        s_spec = self.source_spectrum(source).to(dtype)  # (B, spec_channels, F)
        x = self.conv_pre(mel.to(dtype))  # (B, base, T)
        n_kernels = len(cfg.resblock_kernel_sizes)
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == last:
                x = F.pad(x, _LAST_STAGE_LEFT_PAD, mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_spec))
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / n_kernels
        return self.conv_post(F.leaky_relu(x, cfg.post_lrelu_slope))

    def spec_to_wav(self, spec: torch.Tensor) -> torch.Tensor:
        """conv_post output (B, spec_channels, F) -> waveform (B, hop * (F - 1)) in [-limit, limit], float32."""
        cfg = self.cfg
        bins = cfg.spec_channels // 2
        spec = spec.float()
        magnitude = torch.exp(spec[:, :bins]).clamp(max=cfg.max_magnitude)
        phase = torch.sin(spec[:, bins:])  # upstream's sin, kept for parity
        stft = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(stft, cfg.istft_n_fft, cfg.istft_hop, cfg.istft_n_fft,
                          window=self.stft_window(spec.device), center=True)  # (B, L)
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) + source (B, 1, L) -> waveform (B, L), L = T * samples_per_frame."""
        return self.spec_to_wav(self.decode_spec(mel, source))

    def forward(self, mel: torch.Tensor, noise: SourceNoise | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, n_mels, T) -> (wav (B, L), source (B, 1, L)).

        Without ``noise`` the source draws are made from ``generator`` (torch's global RNG when
        that is None too), in upstream's order; see ``SourceNoise``.
        """
        if mel.dim() != 3 or mel.shape[1] != self.cfg.n_mels:
            raise ValueError(f"HiFT expects mel (B, {self.cfg.n_mels}, T), got {tuple(mel.shape)}")
        batch, _, frames = mel.shape
        f0 = self.f0(mel)  # (B, T)
        if noise is None:
            noise = SourceNoise.draw(batch, frames * self.cfg.samples_per_frame, generator,
                                     device=mel.device, num_harmonics=self.cfg.source.num_harmonics)
        source = self.source_from_f0(f0, noise)  # (B, 1, L)
        return self.decode(mel, source), source


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Replace every weight-norm parametrization under ``module`` by its current effective weight.

    Done once after loading: the parametrized forward recomputes g * v / ||v|| on every call.
    The state-dict keys change to plain ``weight`` afterwards, so load checkpoints first. Call it
    where the weights were loaded, outside ``torch.inference_mode()``: folded there, the weights
    become inference tensors that grad-enabled callers cannot use.
    """
    for sub in list(module.modules()):
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
    return module
