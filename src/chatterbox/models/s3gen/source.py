"""Neural-source-filter excitation of the HiFT vocoder: harmonic sines driven by F0, plus noise.

The source is random in two places, and both draws are explicit here (``SourceNoise``):

* one phase offset per harmonic, uniform in [-pi, pi), except the fundamental, whose phase is 0;
* additive Gaussian noise on every harmonic and sample.

Upstream's source module makes a third draw (a (B, L, 1) Gaussian "noise branch") that nothing
downstream reads; it only advances the global RNG. We never draw it, so a global-RNG run of ours
and one of upstream agree on the two draws above and diverge afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...constants import S3GEN_SR

# The phase draw is U[0, 1) mapped onto [-pi, pi).
_PHASE_LOW = -math.pi
_PHASE_SPAN = 2.0 * math.pi
_TWO_PI = 2.0 * math.pi
# In unvoiced regions the noise std is sine_amp / 3, so its peaks stay around the sine amplitude.
_UNVOICED_STD_DIVISOR = 3
# The harmonics are merged into a single excitation channel.
_SOURCE_CHANNELS = 1


@dataclass(frozen=True)
class SourceConfig:
    sample_rate: int = S3GEN_SR
    num_harmonics: int = 9  # the fundamental plus 8 overtones
    sine_amp: float = 0.1
    voiced_noise_std: float = 0.003
    voiced_threshold_hz: float = 10.0

    @classmethod
    def published(cls) -> "SourceConfig":
        return cls(sample_rate=S3GEN_SR, num_harmonics=9, sine_amp=0.1, voiced_noise_std=0.003,
                   voiced_threshold_hz=10.0)


@dataclass
class SourceNoise:
    """The random inputs of the sine source for a batch of ``B`` signals of ``L`` samples.

    ``phase_uniform`` (B, H, 1) holds raw U[0, 1) draws (phase = -pi + 2*pi*u; the fundamental's
    entry is ignored); ``sine_noise`` (B, H, L) holds N(0, 1) draws before scaling.
    """

    phase_uniform: torch.Tensor
    sine_noise: torch.Tensor

    @classmethod
    def draw(cls, batch: int, length: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None, num_harmonics: int = SourceConfig.num_harmonics) -> "SourceNoise":
        """Draw in upstream's order (phases, then noise). ``generator=None`` uses torch's global RNG."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        phase = torch.rand((batch, num_harmonics, 1), generator=generator, device=device, dtype=torch.float32)
        noise = torch.randn((batch, num_harmonics, length), generator=generator, device=device, dtype=torch.float32)
        return cls(phase, noise)

    @classmethod
    def zeros(cls, batch: int, length: int, device: torch.device | str | None = None,
              num_harmonics: int = SourceConfig.num_harmonics) -> "SourceNoise":
        """All-zero draws: harmonic phases -pi, fundamental phase 0, no additive noise."""
        return cls(torch.zeros((batch, num_harmonics, 1), device=device, dtype=torch.float32),
                   torch.zeros((batch, num_harmonics, length), device=device, dtype=torch.float32))

    def check(self, batch: int, num_harmonics: int, length: int) -> None:
        want_phase = (batch, num_harmonics, 1)
        want_noise = (batch, num_harmonics, length)
        if tuple(self.phase_uniform.shape) != want_phase or tuple(self.sine_noise.shape) != want_noise:
            raise ValueError(
                f"SourceNoise shapes phase_uniform {tuple(self.phase_uniform.shape)}, sine_noise "
                f"{tuple(self.sine_noise.shape)} do not fit the signal: expected {want_phase} and {want_noise}"
            )


def harmonic_cycles(f0: torch.Tensor, cfg: SourceConfig) -> torch.Tensor:
    """Sample-rate F0 (B, L) in Hz -> cycles advanced per sample by each harmonic, (B, H, L) float32."""
    f0 = f0.float().unsqueeze(1)  # (B, 1, L)
    multiples = torch.arange(1, cfg.num_harmonics + 1, device=f0.device, dtype=torch.float32).view(1, -1, 1)
    return f0 * multiples / cfg.sample_rate


def running_cycles(cycles: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Per-harmonic running sum of ``cycles`` (B, H, L), in float64: (B, H, L).

    ``start`` (B, H) float64 is the sum over every sample before the first one (a stream's carried
    phase); None means the signal starts here. Summing in float64 on every device makes a split sum
    (carried start, then the rest) repeat the one-shot additions exactly, and on CPU equals torch's
    float32 cumsum (which accumulates in double) once rounded, so the one-shot numerics are unchanged.
    """
    cycles = cycles.double()
    if start is None:
        return torch.cumsum(cycles, dim=-1)
    if start.shape != cycles.shape[:2]:
        raise ValueError(f"running_cycles: start {tuple(start.shape)} does not fit cycles {tuple(cycles.shape)}")
    # Prepending the start keeps one sequential chain of additions, as in the unsplit sum.
    return torch.cumsum(torch.cat([start.double().unsqueeze(-1), cycles], dim=-1), dim=-1)[..., 1:]


def harmonic_sines(f0: torch.Tensor, noise: SourceNoise, cfg: SourceConfig,
                   cycles_start: torch.Tensor | None = None) -> torch.Tensor:
    """Sample-rate F0 (B, L) in Hz -> noisy harmonic sines (B, H, L), float32.

    The per-harmonic phase is the running sum of F0 / sample_rate, rounded to float32 and taken
    modulo 1 *after* the sum (upstream's order and rounding). ``cycles_start`` (B, H) float64
    continues a signal whose earlier samples summed to it (see ``running_cycles``).
    """
    if f0.dim() != 2:
        raise ValueError(f"harmonic_sines expects f0 (B, L), got {tuple(f0.shape)}")
    batch, length = f0.shape
    noise.check(batch, cfg.num_harmonics, length)
    theta = _TWO_PI * (running_cycles(harmonic_cycles(f0, cfg), cycles_start).float() % 1)  # (B, H, L)

    phase = _PHASE_LOW + noise.phase_uniform.float() * _PHASE_SPAN  # (B, H, 1)
    phase = torch.cat([torch.zeros_like(phase[:, :1]), phase[:, 1:]], dim=1)
    sines = cfg.sine_amp * torch.sin(theta + phase)

    voiced = (f0.float().unsqueeze(1) > cfg.voiced_threshold_hz).float()  # (B, 1, L)
    noise_amp = voiced * cfg.voiced_noise_std + (1 - voiced) * cfg.sine_amp / _UNVOICED_STD_DIVISOR
    return sines * voiced + noise_amp * noise.sine_noise.float()  # (B, H, L)


class SineSource(nn.Module):
    """Sample-rate F0 (B, L) + noise -> excitation (B, 1, L): harmonic sines merged by Linear + tanh."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.num_harmonics, _SOURCE_CHANNELS)

    def forward(self, f0_samples: torch.Tensor, noise: SourceNoise,
                cycles_start: torch.Tensor | None = None) -> torch.Tensor:
        sines = harmonic_sines(f0_samples, noise, self.cfg, cycles_start)  # (B, H, L)
        merged = self.l_linear(sines.transpose(1, 2).to(self.l_linear.weight.dtype))  # (B, L, 1)
        return torch.tanh(merged).transpose(1, 2)  # (B, 1, L)
