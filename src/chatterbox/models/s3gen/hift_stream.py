"""Streaming HiFT: mel chunks in, final waveform samples out, equal to one ``HiFTGenerator`` call.

Scheme: overlap-recompute with carried source state.

* The waveform of a mel frame depends on a bounded window of mel frames (the conv stacks) and of
  source-excitation frames (the source branch), and the source of a frame depends on the F0 of that
  frame (a bounded window of mel frames again) and on the sine phase, a running sum over *every*
  earlier sample. ``receptive_field`` derives those bounds from the config by propagating index
  intervals through each layer (no weights needed); tests confirm them by perturbation.
* The phase is carried in the state as the float64 running sum of cycles at the first sample whose
  source is not final yet (``source.running_cycles``); source samples whose F0 is final are kept
  in the state, so F0 near a window's left edge, computed without its left context, is never used.
* Each push runs ``decode`` on ``[left context | new frames | right context]`` and returns the
  frames whose whole receptive field was inside the window; the first window starts at the true
  sequence start and the final one ends at the true end, so both edges are padded as in one-shot.

Noise: ``StreamNoise`` hands out the source's random draws by absolute sample range, each range
once, in order; the drawn-but-not-yet-final part is kept in the state. Zeros and injected tensors
reproduce a one-shot call exactly. Generator draws are made block by block per push, which equals
a one-shot ``SourceNoise.draw`` only when everything arrives in a single push.

The trim fade at the start of an utterance stays the caller's job.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .hift import _LAST_STAGE_LEFT_PAD, _SOURCE_DOWN_KERNEL_STRIDES, HiFTConfig, HiFTGenerator
from .source import SourceNoise, harmonic_cycles, running_cycles

log = logging.getLogger(__name__)

# Probe length (frames) for the interval analysis; doubled until the centre frame is clear of edges.
_PROBE_FRAMES = 16
_PROBE_MAX_FRAMES = 4096


# ------------------------------------------------------------------------------------------------
# Receptive field, by interval propagation over positions (host-side integer arithmetic)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HiFTReceptiveField:
    """How far (in mel frames) the waveform of one frame reaches, per input; see ``receptive_field``."""

    mel_left: int
    mel_right: int
    source_left: int
    source_right: int
    f0_left: int
    f0_right: int


# A dependency map: for each position, the lowest and highest input frame it reads (inf = none).
_Deps = tuple[np.ndarray, np.ndarray]


def _window_reduce(deps: _Deps, kernel: int, stride: int, dilation: int, pad_left: int, pad_right: int) -> _Deps:
    lo, hi = deps
    lo = np.pad(lo, (pad_left, pad_right), constant_values=np.inf)  # zero padding reads nothing
    hi = np.pad(hi, (pad_left, pad_right), constant_values=-np.inf)
    span = dilation * (kernel - 1) + 1
    lo_w = np.lib.stride_tricks.sliding_window_view(lo, span)[::stride, ::dilation]
    hi_w = np.lib.stride_tricks.sliding_window_view(hi, span)[::stride, ::dilation]
    return lo_w.min(axis=1), hi_w.max(axis=1)


def _conv(deps: _Deps, kernel: int, stride: int = 1, dilation: int = 1, padding: int = 0) -> _Deps:
    return _window_reduce(deps, kernel, stride, dilation, padding, padding)


def _conv_transpose(deps: _Deps, kernel: int, stride: int, padding: int) -> _Deps:
    # Insert stride - 1 empty positions between inputs; the transposed conv is then a plain conv.
    def spread(a: np.ndarray, empty: float) -> np.ndarray:
        grid = np.concatenate([a[:, None], np.full((a.shape[0], stride - 1), empty)], axis=1)
        return grid.reshape(-1)[: stride * (a.shape[0] - 1) + 1]

    lo, hi = deps
    edge = kernel - 1 - padding
    return _window_reduce((spread(lo, np.inf), spread(hi, -np.inf)), kernel, 1, 1, edge, edge)


def _union(a: _Deps, b: _Deps) -> _Deps:
    return np.minimum(a[0], b[0]), np.maximum(a[1], b[1])


def _resblock(deps: _Deps, kernel: int, dilations: tuple[int, ...]) -> _Deps:
    for d in dilations:
        inner = _conv(deps, kernel, dilation=d, padding=d * (kernel - 1) // 2)
        deps = _union(deps, _conv(inner, kernel, padding=(kernel - 1) // 2))
    return deps


def _decode_deps(cfg: HiFTConfig, mel: _Deps, source: _Deps) -> _Deps:
    """Mirror of ``HiFTGenerator.decode`` on dependency maps: mel (T) and source (L) -> wav (L)."""
    n_fft, hop = cfg.istft_n_fft, cfg.istft_hop
    s_spec = _conv(source, n_fft, stride=hop, padding=n_fft // 2)  # the centred STFT's frames
    x = _conv(mel, cfg.conv_pre_kernel, padding=cfg.conv_pre_kernel // 2)
    last = len(cfg.upsample_rates) - 1
    for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        x = _conv_transpose(x, kernel, rate, (kernel - rate) // 2)
        if i == last:
            left = _LAST_STAGE_LEFT_PAD[0]
            x = tuple(np.concatenate([a[1:left + 1][::-1], a]) for a in x)  # reflection
        down = cfg.source_down_rates()[i]
        if down == 1:
            s = _conv(s_spec, 1)
        else:
            s = _conv(s_spec, _SOURCE_DOWN_KERNEL_STRIDES * down, stride=down, padding=down // 2)
        x = _union(x, _resblock(s, cfg.source_resblock_kernel_sizes[i], cfg.source_resblock_dilations[i]))
        branches = [_resblock(x, k, d) for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilations)]
        x = branches[0]
        for b in branches[1:]:
            x = _union(x, b)
    x = _conv(x, cfg.conv_post_kernel, padding=cfg.conv_post_kernel // 2)
    return _conv_transpose(x, n_fft, hop, n_fft // 2)  # the centred inverse STFT


def _reach(deps: _Deps, centre: int, samples_per_frame: int) -> tuple[int, int]:
    lo = deps[0][centre * samples_per_frame:(centre + 1) * samples_per_frame]
    hi = deps[1][centre * samples_per_frame:(centre + 1) * samples_per_frame]
    return int(centre - lo.min()), int(hi.max() - centre)


@functools.lru_cache(maxsize=16)  # plain integers from a frozen (hashable) config
def receptive_field(cfg: HiFTConfig) -> HiFTReceptiveField:
    """Interior receptive field of the waveform, in whole mel frames either side of a frame.

    ``mel_*``: mel frames read through the mel branch; ``source_*``: frames of source excitation
    read through the source branch; ``f0_*``: mel frames read by the F0 of one frame. The sine phase,
    which depends on all earlier frames, is excluded: the streamer carries it.
    """
    spf = cfg.samples_per_frame
    frames = _PROBE_FRAMES
    while frames <= _PROBE_MAX_FRAMES:
        centre = frames // 2
        idx = np.arange(frames, dtype=np.float64)
        empty_mel = (np.full(frames, np.inf), np.full(frames, -np.inf))
        src_idx = np.repeat(idx, spf)
        empty_src = (np.full(frames * spf, np.inf), np.full(frames * spf, -np.inf))
        via_mel = _decode_deps(cfg, (idx, idx), empty_src)
        via_src = _decode_deps(cfg, empty_mel, (src_idx, src_idx))
        if via_mel[0].shape[0] != frames * spf:
            raise AssertionError(f"receptive_field: derived {via_mel[0].shape[0]} samples for {frames} frames")
        f0 = (idx, idx)
        for _ in range(cfg.f0.num_layers):
            f0 = _conv(f0, cfg.f0.kernel_size, padding=cfg.f0.kernel_size // 2)
        reaches = (*_reach(via_mel, centre, spf), *_reach(via_src, centre, spf), *_reach(f0, centre, 1))
        if max(reaches) < centre // 2:
            return HiFTReceptiveField(*reaches)
        frames *= 2
    raise ValueError(f"receptive_field: HiFT reach exceeds {_PROBE_MAX_FRAMES // 4} frames")


# ------------------------------------------------------------------------------------------------
# Config, noise, state
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HiFTStreamConfig:
    """Contexts, in mel frames, around the frames a push emits.

    ``left_context``: frames kept before the first frame still to emit (mel and source branches);
    ``right_context``: frames that must follow a frame before it is final (the source branch's reach
    plus the F0 reach of the source frames it reads); ``f0_context``: the F0 predictor's reach
    either side, which says whose F0 in a window is final.
    """

    left_context: int = 15
    right_context: int = 20
    f0_context: int = 5

    @classmethod
    def published(cls) -> "HiFTStreamConfig":
        # receptive_field(HiFTConfig.published()): mel 14/14, source 15/15, F0 5/5 frames
        return cls(left_context=15, right_context=20, f0_context=5)

    @classmethod
    def for_hift(cls, cfg: HiFTConfig) -> "HiFTStreamConfig":
        """The minimum exact contexts for a HiFT config."""
        rf = receptive_field(cfg)
        return cls(left_context=max(rf.mel_left, rf.source_left),
                   right_context=max(rf.mel_right, rf.source_right + rf.f0_right),
                   f0_context=max(rf.f0_left, rf.f0_right))

    def covers(self, other: "HiFTStreamConfig") -> bool:
        return (self.left_context >= other.left_context and self.right_context >= other.right_context
                and self.f0_context >= other.f0_context)


_NOISE_MODES = ("zeros", "injected", "generator")


@dataclass(frozen=True)
class StreamNoise:
    """Source draws of a stream, by absolute sample range (see the module docstring).

    Build with ``zeros()``, ``injected(SourceNoise)`` (a one-shot draw covering the whole
    utterance) or ``drawn(generator)`` (``torch.rand`` phases at ``init_state``, then one
    ``torch.randn`` block per push; this cannot equal a one-shot draw once split).
    """

    mode: str = "zeros"
    injected_noise: SourceNoise | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.mode not in _NOISE_MODES:
            raise ValueError(f"StreamNoise mode must be one of {_NOISE_MODES}, got {self.mode!r}")
        if (self.mode == "injected") != (self.injected_noise is not None):
            raise ValueError("StreamNoise: injected noise goes with mode 'injected' only")

    @classmethod
    def zeros(cls) -> "StreamNoise":
        return cls("zeros")

    @classmethod
    def injected(cls, noise: SourceNoise) -> "StreamNoise":
        return cls("injected", injected_noise=noise)

    @classmethod
    def drawn(cls, generator: torch.Generator | None) -> "StreamNoise":
        """``generator=None`` draws from torch's global RNG."""
        return cls("generator", generator=generator)

    def phases(self, batch: int, num_harmonics: int, device: torch.device) -> torch.Tensor:
        """Raw U[0, 1) phase draws (B, H, 1)."""
        shape = (batch, num_harmonics, 1)
        if self.mode == "injected":
            got = self.injected_noise.phase_uniform
            if tuple(got.shape) != shape:
                raise ValueError(f"StreamNoise: injected phase_uniform is {tuple(got.shape)}, stream needs {shape}")
            return got.to(device)
        if self.mode == "generator":
            return torch.rand(shape, generator=self.generator, device=device, dtype=torch.float32)
        return torch.zeros(shape, device=device, dtype=torch.float32)

    def block(self, start: int, stop: int, batch: int, num_harmonics: int, device: torch.device) -> torch.Tensor:
        """N(0, 1) draws for samples [start, stop): (B, H, stop - start)."""
        shape = (batch, num_harmonics, stop - start)
        if self.mode == "injected":
            full = self.injected_noise.sine_noise
            if full.shape[:2] != shape[:2] or full.shape[2] < stop:
                raise ValueError(f"StreamNoise: injected sine_noise {tuple(full.shape)} does not cover samples "
                                 f"[{start}, {stop}) of a batch of {batch}")
            return full[:, :, start:stop].to(device)
        if self.mode == "generator":
            return torch.randn(shape, generator=self.generator, device=device, dtype=torch.float32)
        return torch.zeros(shape, device=device, dtype=torch.float32)


@dataclass(frozen=True)
class HiFTStreamState:
    """Everything a stream carries between pushes; each push returns a new one (nothing is mutated).

    Frame counters are absolute: ``base`` <= ``emitted``; ``base`` <= ``source_frames`` <= ``received``.
    """

    mel: torch.Tensor  # (B, n_mels, received - base): mel frames [base, received)
    source: torch.Tensor  # (B, 1, spf * (source_frames - base)): final excitation of frames [base, source_frames)
    cycles: torch.Tensor  # (B, H) float64: running cycles over samples [0, spf * source_frames)
    phase_uniform: torch.Tensor  # (B, H, 1): the stream's phase draws
    noise: torch.Tensor  # (B, H, spf * (received - source_frames)): draws of samples not final yet
    noise_source: StreamNoise
    base: int = 0
    received: int = 0
    emitted: int = 0
    source_frames: int = 0
    finished: bool = False

    @property
    def batch(self) -> int:
        return self.mel.shape[0]


# ------------------------------------------------------------------------------------------------
# Streamer
# ------------------------------------------------------------------------------------------------
class HiFTStreamer:
    """Push mel chunks (B, n_mels, n); get back the waveform samples that are final.

    Concatenating every output of a stream equals ``hift(mel_full, noise)[0]`` (same noise), for any
    chunking, up to float rounding of the conv kernels on windows of different lengths.
    """

    def __init__(self, hift: HiFTGenerator, cfg: HiFTStreamConfig | None = None) -> None:
        needed = HiFTStreamConfig.for_hift(hift.cfg)
        cfg = needed if cfg is None else cfg
        if not cfg.covers(needed):
            raise ValueError(f"HiFTStreamConfig {cfg} is smaller than this HiFT's receptive field needs: {needed}")
        if not hift.cfg.f0_float64:
            log.warning("HiFTStreamer: with a float32 F0 predictor the streamed sine phase drifts from the "
                        "one-shot one (window-length dependent conv rounding); set HiFTConfig.f0_float64")
        self.hift = hift
        self.cfg = cfg
        self.samples_per_frame = hift.cfg.samples_per_frame
        self.num_harmonics = hift.cfg.source.num_harmonics

    def init_state(self, batch: int = 1, device: torch.device | str = "cpu",
                   noise: StreamNoise | None = None) -> HiFTStreamState:
        if batch < 1:
            raise ValueError(f"init_state: batch must be positive, got {batch}")
        device = torch.device(device)
        noise = StreamNoise.zeros() if noise is None else noise
        h = self.num_harmonics
        return HiFTStreamState(
            mel=torch.zeros((batch, self.hift.cfg.n_mels, 0), device=device),
            source=torch.zeros((batch, 1, 0), device=device),
            cycles=torch.zeros((batch, h), device=device, dtype=torch.float64),
            phase_uniform=noise.phases(batch, h, device),
            noise=torch.zeros((batch, h, 0), device=device),
            noise_source=noise,
        )

    def _check(self, mel_chunk: torch.Tensor, state: HiFTStreamState) -> None:
        n_mels = self.hift.cfg.n_mels
        if state.finished:
            raise RuntimeError("HiFTStreamer.push: this stream was already flushed with final=True")
        if mel_chunk.dim() != 3 or mel_chunk.shape[1] != n_mels:
            raise ValueError(f"HiFTStreamer.push expects mel (B, {n_mels}, n), got {tuple(mel_chunk.shape)}")
        if mel_chunk.shape[0] != state.batch:
            raise ValueError(f"HiFTStreamer.push: chunk batch {mel_chunk.shape[0]} != stream batch {state.batch}")
        if not mel_chunk.is_floating_point():
            raise TypeError(f"HiFTStreamer.push expects a floating-point mel, got {mel_chunk.dtype}")
        if mel_chunk.device != state.mel.device:
            raise ValueError(f"HiFTStreamer.push: chunk on {mel_chunk.device}, stream on {state.mel.device}")

    def push(self, mel_chunk: torch.Tensor, state: HiFTStreamState,
             final: bool = False) -> tuple[torch.Tensor, HiFTStreamState]:
        """mel_chunk (B, n_mels, n), n >= 0 -> (wav (B, spf * k), new state), k frames now final.

        ``final=True`` flushes every remaining frame and closes the stream.
        """
        self._check(mel_chunk, state)
        spf, ctx = self.samples_per_frame, self.cfg
        batch, device = state.batch, state.mel.device
        received = state.received + mel_chunk.shape[2]
        new_noise = state.noise_source.block(spf * state.received, spf * received, batch, self.num_harmonics, device)
        mel = torch.cat([state.mel.to(mel_chunk.dtype), mel_chunk], dim=2)  # frames [base, received)
        noise = torch.cat([state.noise, new_noise], dim=2)  # samples of frames [source_frames, received)
        emit_to = received if final else max(state.emitted, received - ctx.right_context)
        if emit_to == state.emitted:
            # Nothing becomes final: keep the frames, defer all compute to a later push.
            wav = mel_chunk.new_zeros((batch, 0), dtype=torch.float32)
            return wav, dataclasses.replace(state, mel=mel.detach(), noise=noise.detach(), received=received,
                                            finished=final)

        f0 = self.hift.f0(mel)  # (B, received - base); final from base + f0_context unless base == 0
        src_from = state.source_frames - state.base
        fresh = self.hift.source_from_f0(f0[:, src_from:], SourceNoise(state.phase_uniform, noise),
                                         cycles_start=state.cycles)  # (B, 1, spf * (received - source_frames))
        source = torch.cat([state.source, fresh], dim=2)  # frames [base, received)
        wav = self.hift.decode(mel, source)  # (B, spf * (received - base))
        # A copy, so a caller keeping the chunks does not keep every decoded window alive.
        out = wav[:, spf * (state.emitted - state.base):spf * (emit_to - state.base)].clone()

        # Frames whose F0 (and so source and phase) is now final.
        source_frames = received if final else max(state.source_frames, received - ctx.f0_context)
        n_new = source_frames - state.source_frames
        f0_new = self.hift.f0_samples(f0[:, src_from:src_from + n_new])  # (B, spf * n_new)
        cycles = running_cycles(harmonic_cycles(f0_new, self.hift.cfg.source), state.cycles)[..., -1] \
            if n_new > 0 else state.cycles
        base = max(state.base, min(emit_to - ctx.left_context, source_frames - ctx.f0_context))
        drop = base - state.base
        new_state = HiFTStreamState(
            mel=mel[:, :, drop:].detach(),
            source=source[:, :, spf * drop:spf * (source_frames - state.base)].detach(),
            cycles=cycles.detach(),
            phase_uniform=state.phase_uniform,
            noise=noise[:, :, spf * n_new:].detach(),
            noise_source=state.noise_source,
            base=base, received=received, emitted=emit_to, source_frames=source_frames, finished=final,
        )
        return out, new_state

    def window_frames(self, chunk: int) -> int:
        """Mel frames decoded per push in steady state when pushing ``chunk`` frames at a time."""
        return self.cfg.left_context + chunk + self.cfg.right_context
