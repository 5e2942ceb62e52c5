"""Measurement primitives of the A/B harness: one timed call each, on a loaded ``ChatterboxTTS``.

Every wall-clock figure synchronises the device before reading the clock (host time = time the
caller waits). Stage times inside ``synthesize`` come from its own ``StageTimer`` (CUDA events).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from chatterbox.models.t3.sampling import RESEMBLE_ORDER
from chatterbox.opt import autograd_context
from chatterbox.text import drop_invalid_tokens
from chatterbox.timing import StageTimer

from .texts import TextCase

log = logging.getLogger(__name__)

GB = 1e9
# Sampling arguments of ``synthesize`` that a direct T3 call must repeat to draw the same tokens.
_SAMPLING_ARGS = ("temperature", "cfg_weight", "top_p", "min_p", "repetition_penalty")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory torch allocated on the GPU since the last reset, in GB (1e9 bytes); None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GB


# ---------------------------------------------------------------------------------------- T3
def _synthesize_defaults(tts) -> dict:
    params = inspect.signature(tts.synthesize).parameters
    return {name: params[name].default for name in _SAMPLING_ARGS if name in params}


def single_segment(tts, case: TextCase) -> str:
    segments = tts.text_segments(case.text)
    if len(segments) != 1:
        raise ValueError(f"text set {case.name!r} splits into {len(segments)} segments; the harness needs one")
    return segments[0]


def t3_tokens(tts, case: TextCase, seed: int, max_new_tokens: int | None = None) -> torch.Tensor:
    """The speech tokens ``synthesize(case.text, seed=seed)`` generates, raw (stop and invalid ids
    kept): (N,) long on the CPU. Same generator, sampling defaults and stop-check block as the
    pipeline, so N is the count its T3 stage produced."""
    segment = single_segment(tts, case)
    gen = torch.Generator(device=tts.device).manual_seed(seed)
    with autograd_context(tts.opt.autograd_mode):
        speech = tts.t3.inference(
            tts.conds.t3, tts.text_tokens(segment), max_new_tokens or case.max_new_tokens,
            order=RESEMBLE_ORDER, generator=gen, stop_check_every=tts.opt.stop_check_every,
            **_synthesize_defaults(tts))
    return speech[0].detach().to("cpu").clone()


def t3_prefill_seconds(tts, case: TextCase, seed: int) -> float:
    """One T3 call that stops after its first token: conditioning, prefill and one sampling step."""
    t0 = now(tts.device)
    t3_tokens(tts, case, seed, max_new_tokens=1)
    return now(tts.device) - t0


# ---------------------------------------------------------------------------------------- S3Gen
def render(tts, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech tokens (N,) through the current configuration's S3Gen with noise fixed by ``seed``
    -> (mel (80, T), wav (L,)) float32 CPU copies, for fidelity comparisons across configurations."""
    noise = tts.s3gen.draw_cfm_noise(torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=tts.device).manual_seed(seed)
    with autograd_context(tts.opt.autograd_mode):
        mel = tts.s3gen.flow_inference(tokens.to(tts.device), tts.conds.gen, cfm_noise=noise,
                                       n_timesteps=tts.opt.cfm_steps)
        wav, _ = tts.s3gen.hift_inference(mel, generator=gen)
        wav = tts.s3gen.apply_trim_fade(wav)
    return mel[0].detach().float().cpu().clone(), wav[0].detach().float().cpu().clone()


def flow_encoder_seconds(tts, tokens: torch.Tensor) -> float:
    """The flow's token encoder and CFM conditioning alone (the rest of the flow stage is the CFM)."""
    ref = tts.conds.gen
    t0 = now(tts.device)
    with autograd_context(tts.opt.autograd_mode):
        tts.s3gen.flow.prepare(tokens.to(tts.device)[None], ref.prompt_token, ref.prompt_feat, ref.embedding)
    return now(tts.device) - t0


# ---------------------------------------------------------------------------------------- runs
@dataclass
class SynthRun:
    total_s: float
    audio_s: float
    stages: dict[str, float]
    valid_tokens: torch.Tensor  # (M,) what S3Gen rendered
    wav: torch.Tensor  # (L,) float32 CPU
    generated: int | None  # tokens T3 generated (invalid ids and the stop token included), when known
    raw_tokens: torch.Tensor | None  # (N,) those tokens on the CPU, when seen


@contextlib.contextmanager
def _seen_t3_outputs(tts):
    """Collects what ``tts.t3.inference`` returns while the block runs (a pass-through wrapper on the
    instance, removed afterwards): the pipeline reports only the tokens it rendered, and tokens/s
    counts every generated one."""
    t3 = tts.t3
    had = "inference" in vars(t3)
    previous = vars(t3).get("inference")
    inner = t3.inference
    outputs: list[torch.Tensor] = []

    def inference(*args, **kwargs):
        out = inner(*args, **kwargs)
        outputs.append(out)
        return out

    object.__setattr__(t3, "inference", inference)
    try:
        yield outputs
    finally:
        if had:
            object.__setattr__(t3, "inference", previous)
        else:
            object.__delattr__(t3, "inference")


def run_synthesize(tts, case: TextCase, seed: int, watermark: bool) -> SynthRun:
    timer = StageTimer(tts.device)
    with _seen_t3_outputs(tts) as outputs:
        t0 = now(tts.device)
        res = tts.synthesize(case.text, seed=seed, max_new_tokens=case.max_new_tokens, watermark=watermark,
                             timer=timer)
        total = now(tts.device) - t0
    valid = torch.cat(res.speech_tokens) if res.speech_tokens else torch.zeros(0, dtype=torch.long)
    raw = torch.cat([o[0].detach().to("cpu") for o in outputs]) if outputs else None
    generated = getattr(res, "generated_tokens", None)  # int or per-segment list, where the pipeline has it
    if isinstance(generated, (list, tuple)):
        generated = sum(int(g) for g in generated)
    if generated is None and raw is not None:
        generated = raw.numel()
    return SynthRun(total_s=total, audio_s=res.wav.shape[-1] / tts.sr, stages=dict(res.timings), valid_tokens=valid,
                    wav=res.wav[0], generated=None if generated is None else int(generated), raw_tokens=raw)


def generated_token_count(tts, case: TextCase, seed: int, syn: SynthRun) -> tuple[int, bool, torch.Tensor | None]:
    """(tokens T3 generated in ``syn``, whether that count is exact, the raw ids when known).

    When the pipeline's T3 call was not seen (it no longer goes through ``t3.inference``), T3 is
    run again directly with the same seed and sampling; when that run's valid ids equal ``syn``'s,
    its length is the count. Otherwise the rendered count stands in (a lower bound), ``exact`` False.
    """
    if syn.generated is not None:
        return syn.generated, True, syn.raw_tokens
    raw = t3_tokens(tts, case, seed)
    if torch.equal(drop_invalid_tokens(raw), syn.valid_tokens):
        return raw.numel(), True, raw
    log.warning("direct T3 run of %r differs from the pipeline's tokens: counting rendered tokens", case.name)
    return syn.valid_tokens.numel(), False, None


def stream_supported(tts) -> str | None:
    """None when ``generate_stream`` can be measured, else why not."""
    fn = getattr(tts, "generate_stream", None)
    if fn is None:
        return "ChatterboxTTS.generate_stream is not available"
    params = inspect.signature(fn).parameters
    if "max_new_tokens" not in params:
        return "generate_stream takes no max_new_tokens (unbounded on synthetic weights)"
    return None


@dataclass
class StreamRun:
    ttfa_s: float
    total_s: float
    audio_s: float
    chunks: int
    metrics: dict  # what generate_stream's StreamingMetrics reported, as plain numbers


def run_stream(tts, case: TextCase, seed: int, chunk_size, context_window: int, watermark: bool) -> StreamRun:
    params = inspect.signature(tts.generate_stream).parameters
    kwargs = dict(chunk_size=chunk_size, context_window=context_window, print_metrics=False,
                  max_new_tokens=case.max_new_tokens, seed=seed, watermark=watermark)
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    samples, chunks, ttfa, metrics = 0, 0, math.nan, None
    t0 = now(tts.device)
    for audio, metrics in tts.generate_stream(case.text, **kwargs):
        if chunks == 0:
            ttfa = now(tts.device) - t0  # first audio in hand (device work finished)
        chunks += 1
        samples += int(audio.shape[-1])
    total = now(tts.device) - t0
    return StreamRun(ttfa_s=ttfa, total_s=total, audio_s=samples / tts.sr, chunks=chunks,
                     metrics=_metrics_dict(metrics))


def _metrics_dict(metrics) -> dict:
    if metrics is None:
        return {}
    out = {}
    for name in ("latency_to_first_chunk", "rtf", "total_generation_time", "total_audio_duration", "chunk_count"):
        value = getattr(metrics, name, None)
        if isinstance(value, (int, float)):
            out[name] = float(value)
    per_chunk = getattr(metrics, "chunks", None)
    if per_chunk:
        out["chunks"] = [{k: float(v) for k, v in _as_mapping(c).items() if isinstance(v, (int, float))}
                         for c in per_chunk]
    return out


def _as_mapping(obj) -> dict:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    return dict(vars(obj)) if hasattr(obj, "__dict__") else {}


def prepare_conditionals_seconds(tts, wav: np.ndarray, sample_rate: int) -> float:
    """Time making a voice from ``wav``; the voice in use before the call is put back."""
    saved = tts.conds
    try:
        t0 = now(tts.device)
        tts.prepare_conditionals(wav, sample_rate=sample_rate)
        return now(tts.device) - t0
    finally:
        tts.conds = saved


# ---------------------------------------------------------------------------------------- fidelity
def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |other - ref|^2) over the common length; +inf when equal."""
    a = reference.detach().double().flatten().numpy()
    b = other.detach().double().flatten().numpy()
    n = min(a.size, b.size)
    if n == 0:
        return math.nan
    a, b = a[:n], b[:n]
    noise = float(np.sum((b - a) ** 2))
    signal = float(np.sum(a ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# Magnitude-spectrogram comparison: insensitive to the phase drift a changed F0 or source phase
# accumulates, which drives the waveform SNR down while the sound is the same.
SPEC_N_FFT = 1024
SPEC_HOP = 256


def spectral_snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """SNR (dB) of STFT magnitudes (Hann, SPEC_N_FFT / SPEC_HOP) over the common length."""
    n = min(reference.numel(), other.numel())
    if n < SPEC_N_FFT:
        return math.nan
    window = torch.hann_window(SPEC_N_FFT, dtype=torch.float64)

    def mag(x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x.detach().double().flatten()[:n], SPEC_N_FFT, SPEC_HOP, window=window,
                          return_complex=True).abs()

    return snr_db(mag(reference), mag(other))


def token_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of positions holding the same token; a length difference counts as disagreement."""
    n = max(reference.numel(), other.numel())
    if n == 0:
        return 1.0
    m = min(reference.numel(), other.numel())
    same = int((reference.flatten()[:m] == other.flatten()[:m]).sum())
    return same / n

