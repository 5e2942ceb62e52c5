"""Measurement primitives of the A/B harness: one timed call each, on a loaded ``ChatterboxTTS``.

Everything goes through public APIs of the facade and of its engine (``tts.engine``): ``synthesize``
and ``generate_stream`` for the pipeline, the engine's T3 runner (``tts.engine.t3_runner``) for T3
alone, and the engine's own modules (``tts.s3gen``: its dtype, compiled code and CUDA-graph wrappers)
for S3Gen alone, inside the engine's autograd mode and attention backend. Nothing is patched.

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

from chatterbox.engine import SynthesisRequest
from chatterbox.engine.t3_runner import T3Request
from chatterbox.family import DEFAULT_FAMILY, request_defaults
from chatterbox.optim import attention_context, autograd_context
from chatterbox.timing import StageTimer

from .texts import TextCase

log = logging.getLogger(__name__)

GB = 1e9


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


def engine_context(tts) -> contextlib.ExitStack:
    """The contexts the engine runs a request's work in: its autograd mode and attention backend."""
    opt = tts.engine.opt
    stack = contextlib.ExitStack()
    stack.enter_context(autograd_context(opt.autograd_mode))
    stack.enter_context(attention_context(opt.attention_backend))
    return stack


def _plain_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that is an ordinary tensor whatever mode made ``t``."""
    with torch.inference_mode(False):
        return t.detach().to("cpu").clone()


# ---------------------------------------------------------------------------------------- T3
def single_segment(tts, case: TextCase) -> str:
    segments = tts.text_segments(case.text)
    if len(segments) != 1:
        raise ValueError(f"text set {case.name!r} splits into {len(segments)} segments; the harness needs one")
    return segments[0]


def family_request(tts, text: str, **kw) -> SynthesisRequest:
    """A request with the default sampling of ``tts``'s model family (what its ``synthesize`` uses)."""
    return SynthesisRequest(text, **{**request_defaults(getattr(tts, "family", DEFAULT_FAMILY)), **kw})


def start_t3(tts, segment: str, seed: int, max_new_tokens: int):
    """A ``T3Stream`` from the engine's T3 runner for one text segment, set up as a ``synthesize``
    call with ``seed`` and the default sampling sets up its T3 request (same voice and exaggeration,
    same sampling generator state, same stop-check block). Call inside ``engine_context``; consume
    ``.blocks()`` or ``.close()`` it."""
    engine = tts.engine
    request = family_request(tts, segment, seed=seed, max_new_tokens=max_new_tokens)
    conds = tts.conds.to(engine.device).with_exaggeration(request.exaggeration)
    generator = torch.Generator(device=engine.device).manual_seed(request.resolved_seed())
    return engine.t3_runner.start(T3Request(
        cond=conds.t3, text_tokens=engine.text_tokens(segment), sampling=engine.t3_sampling(request),
        max_new_tokens=request.max_new_tokens, generator=generator, block_size=engine.opt.stop_check_every))


def t3_generate(tts, segment: str, seed: int, max_new_tokens: int) -> torch.Tensor:
    """The speech tokens the engine's T3 runner generates for ``segment``, raw (stop and invalid ids
    kept): (N,) long on the CPU."""
    with engine_context(tts):
        stream = start_t3(tts, segment, seed, max_new_tokens)
        try:
            speech = torch.cat(list(stream.blocks()), dim=1)
        finally:
            stream.close()
    return _plain_cpu(speech[0])


def t3_tokens(tts, case: TextCase, seed: int, max_new_tokens: int | None = None) -> torch.Tensor:
    """The speech tokens ``synthesize(case.text, seed=seed)`` generates, raw (stop and invalid ids
    kept): (N,) long on the CPU, from the engine's T3 runner (the one the pipeline uses)."""
    return t3_generate(tts, single_segment(tts, case), seed, max_new_tokens or case.max_new_tokens)


def t3_prefill_seconds(tts, case: TextCase, seed: int) -> float:
    """One T3 request of a single token through the engine's runner: conditioning, prefill and one
    decode step (the pick and the step that feeds it back), so that the rest of the T3 stage divided
    by the other tokens is the per-token decode cost."""
    t0 = now(tts.device)
    t3_tokens(tts, case, seed, max_new_tokens=1)
    return now(tts.device) - t0


# ---------------------------------------------------------------------------------------- S3Gen
def render(tts, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech tokens (N,) through the engine's S3Gen (the modules and graph wrappers ``synthesize``
    times) with noise fixed by ``seed`` -> (mel (80, T), wav (L,)) float32 CPU copies, for fidelity
    comparisons across configurations."""
    engine = tts.engine
    s3gen = tts.s3gen
    ref = tts.conds.to(engine.device).gen
    gen = torch.Generator(device=engine.device).manual_seed(seed)
    with engine_context(tts):
        noise = engine.cfm_noise(torch.Generator().manual_seed(seed))
        mel = s3gen.flow_inference(tokens.to(engine.device), ref, cfm_noise=noise, n_timesteps=engine.cfm_steps)
        wav, _ = s3gen.hift_inference(mel, generator=gen)
        wav = s3gen.apply_trim_fade(wav)
    return _plain_cpu(mel[0].float()), _plain_cpu(wav[0].float())


def flow_encoder_seconds(tts, tokens: torch.Tensor) -> float:
    """The flow's token encoder and CFM conditioning alone (the rest of the flow stage is the CFM)."""
    ref = tts.conds.to(tts.device).gen
    tokens = tokens.to(tts.device)[None]
    t0 = now(tts.device)
    with engine_context(tts):
        tts.s3gen.flow.prepare(tokens, ref.prompt_token, ref.prompt_feat, ref.embedding)
    return now(tts.device) - t0


# ---------------------------------------------------------------------------------------- runs
@dataclass
class SynthRun:
    total_s: float
    audio_s: float
    stages: dict[str, float]
    valid_tokens: torch.Tensor  # (M,) what S3Gen rendered
    wav: torch.Tensor  # (L,) float32 CPU
    generated: int  # tokens T3 generated (invalid ids and the stop token included)


def generated_token_count(result) -> int:
    """Tokens T3 generated for a ``SynthesisResult`` (every segment, invalid ids and stop tokens included)."""
    return sum(int(n) for n in result.generated_tokens)


def run_synthesize(tts, case: TextCase, seed: int, watermark: bool) -> SynthRun:
    timer = StageTimer(tts.device)
    t0 = now(tts.device)
    res = tts.synthesize(case.text, seed=seed, max_new_tokens=case.max_new_tokens, watermark=watermark, timer=timer)
    total = now(tts.device) - t0
    valid = torch.cat(res.speech_tokens) if res.speech_tokens else torch.zeros(0, dtype=torch.long)
    return SynthRun(total_s=total, audio_s=res.wav.shape[-1] / tts.sr, stages=dict(res.timings), valid_tokens=valid,
                    wav=res.wav[0], generated=generated_token_count(res))


def pipeline_t3_tokens(tts, case: TextCase, seed: int, syn: SynthRun) -> torch.Tensor | None:
    """The raw ids (N,) T3 generated in ``syn`` (which reports only the rendered ones): the engine's
    T3 runner run again with the same seed and sampling. None (with a warning) when that run's
    count or rendered codes (the engine's ``valid_tokens``) differ from the pipeline's."""
    raw = t3_tokens(tts, case, seed)
    if raw.numel() == syn.generated and torch.equal(tts.engine.valid_tokens(raw[None]).cpu(), syn.valid_tokens):
        return raw
    log.warning("T3 runner alone gave %d tokens for %r, the pipeline %d (or other valid ids): raw ids unknown",
                raw.numel(), case.name, syn.generated)
    return None


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

