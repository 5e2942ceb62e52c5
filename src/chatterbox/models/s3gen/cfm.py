"""Conditional flow matching sampler of S3Gen: Euler ODE steps with classifier-free guidance.

A meanflow estimator (Chatterbox-Turbo, ``CFMConfig.meanflow``) is distilled with guidance baked in:
it runs plain Euler steps over the interval pairs (t, r) of a linear schedule (two steps,
t = 0, 0.5, 1), batch B, no guidance batch, each step x += (r - t) * v(x, t, r).

Start noise is an input (the caller owns the noise buffer and its temperature), so the sampler is
deterministic. The estimator submodule is named ``estimator`` so that, inside the flow module's
``decoder`` slot, keys read ``decoder.estimator.*`` as in the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .decoder import ConditionalDecoder, ConditionalDecoderConfig

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class CFMConfig:
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7  # v = (1 + r) v_cond - r v_uncond
    t_scheduler: str = "cosine"
    estimator: ConditionalDecoderConfig = field(default_factory=ConditionalDecoderConfig.published)

    def __post_init__(self) -> None:
        if self.t_scheduler not in SCHEDULES:
            raise ValueError(f"t_scheduler must be one of {SCHEDULES}, got {self.t_scheduler!r}")
        if self.n_timesteps < 1:
            raise ValueError(f"n_timesteps must be >= 1, got {self.n_timesteps}")

    @classmethod
    def published(cls) -> "CFMConfig":
        return cls()

    @classmethod
    def small(cls) -> "CFMConfig":
        """Tiny estimator for fast unit tests (not a published model)."""
        return cls(estimator=ConditionalDecoderConfig.small())

    @property
    def meanflow(self) -> bool:
        return self.estimator.meanflow

    @classmethod
    def published_meanflow(cls) -> "CFMConfig":
        """Chatterbox-Turbo's distilled flow: 2 linear steps of the meanflow estimator, no guidance."""
        return cls(n_timesteps=2, t_scheduler="linear", estimator=ConditionalDecoderConfig.published_meanflow())

    @classmethod
    def small_meanflow(cls) -> "CFMConfig":
        """Tiny meanflow estimator for fast unit tests (not a published model)."""
        return cls(n_timesteps=2, t_scheduler="linear",
                   estimator=replace(ConditionalDecoderConfig.small(), meanflow=True))


def cosine_timesteps(n: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """(n+1,) times 1 - cos(k/n * pi/2), k = 0..n, computed in the same order of ops as upstream."""
    lin = torch.linspace(0, 1, n + 1, device=device, dtype=dtype)
    return 1 - torch.cos(lin * 0.5 * math.pi)


def linear_timesteps(n: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.linspace(0, 1, n + 1, device=device, dtype=dtype)


class CausalCFM(nn.Module):
    def __init__(self, cfg: CFMConfig):
        super().__init__()
        self.cfg = cfg
        self.estimator = ConditionalDecoder(cfg.estimator)

    def timesteps(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.cfg.t_scheduler == "cosine":
            return cosine_timesteps(n, device, dtype)
        return linear_timesteps(n, device, dtype)

    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor | None,
        spks: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
        n_timesteps: int | None = None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Integrate from ``noise`` (t=0) to the mel (t=1).

        mu, cond, noise: (B, n_feats, T) (upstream uses B=1); mask: (B, 1, T), or None when no frame
        is padded; spks: (B, spk_dim). ``on_step(k, x, t)`` is called before the k-th estimator call
        (k from 0) with the x it receives and the 0-d time t. Returns x at t=1, (B, n_feats, T).
        """
        n = self.cfg.n_timesteps if n_timesteps is None else int(n_timesteps)
        if n < 1:
            raise ValueError(f"n_timesteps must be >= 1, got {n}")
        if noise.shape != mu.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have mu's shape {tuple(mu.shape)}")
        if self.cfg.meanflow:
            return self._mean_euler(mu, mask, spks, cond, noise, n, on_step)
        rate = self.cfg.inference_cfg_rate
        b = mu.shape[0]

        # Guidance batch: rows [0, b) conditional, rows [b, 2b) with mu, spks and cond zeroed.
        # These halves do not change across steps, so they are built once.
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)  # (2B, F, T)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)  # (2B, S)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0)  # (2B, F, T)
        mask_in = None if mask is None else torch.cat([mask, mask], dim=0)  # (2B, 1, T)

        t_span = self.timesteps(n, mu.device, mu.dtype)  # (n+1,)
        # Time is accumulated (t += dt, dt re-derived from the schedule) in upstream's order of ops;
        # for float32 cosine schedules up to 39 steps this lands exactly on t_span, but keeping the
        # order makes that a non-issue for other dtypes and devices.
        t = t_span[0]
        dt = t_span[1] - t_span[0]
        x = noise
        for k in range(n):
            if on_step is not None:
                on_step(k, x, t)
            x_in = torch.cat([x, x], dim=0)  # (2B, F, T)
            t_in = t.expand(2 * b)  # (2B,)
            v = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in)
            v_cond, v_uncond = v[:b], v[b:]
            v = (1.0 + rate) * v_cond - rate * v_uncond
            x = x + dt * v
            t = t + dt
            if k + 1 < n:
                dt = t_span[k + 2] - t
        return x

    def _mean_euler(self, mu: torch.Tensor, mask: torch.Tensor | None, spks: torch.Tensor, cond: torch.Tensor,
                    noise: torch.Tensor, n: int, on_step: StepCallback | None) -> torch.Tensor:
        """Meanflow sampling: for consecutive (t, r) of the schedule, x += (r - t) * v(x, t, r)."""
        b = mu.shape[0]
        t_span = self.timesteps(n, mu.device, mu.dtype)  # (n+1,)
        x = noise
        for k in range(n):
            t, r = t_span[k], t_span[k + 1]
            if on_step is not None:
                on_step(k, x, t)
            v = self.estimator(x, mask, mu, t.expand(b), spks, cond, r=r.expand(b))
            x = x + (r - t) * v
        return x
