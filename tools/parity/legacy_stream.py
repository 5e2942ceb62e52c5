"""Upstream's streaming method (chatterbox-streaming ``_process_token_buffer``), kept as a baseline.

Every chunk re-renders ``context + new`` tokens from scratch (prompt included), crops the context's
share of samples by proportion and fades the remainder in linearly. It is what our streaming is
measured against (fidelity and work per token) and what the ``streaming_chunks`` fixture records.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from chatterbox.models.s3gen.s3gen import S3Gen, S3GenRef
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.text import drop_invalid_tokens


def legacy_stream_chunks(s3gen: S3Gen, ref: S3GenRef, token_chunks: Iterable[torch.Tensor], context_window: int,
                         fade_duration: float, cfm_noise: torch.Tensor,
                         source_noise: Callable[[int], SourceNoise] | None = None,
                         n_timesteps: int | None = None) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(audio (1, n), tokens rendered)`` per chunk of new speech tokens ((N,) each).

    ``cfm_noise`` is the fixed start-noise table every call slices from its start (as upstream's
    buffer); ``source_noise(L)`` gives the vocoder draws for an L-sample rendering (default: drawn
    from the global generator, as upstream).
    """
    history = torch.zeros(0, dtype=torch.long, device=s3gen.device)
    fade_samples = int(fade_duration * s3gen.cfg.sample_rate)
    for new_tokens in token_chunks:
        new_tokens = new_tokens.reshape(-1).to(s3gen.device)
        context = history[-context_window:] if context_window > 0 else history[:0]
        clean = drop_invalid_tokens(torch.cat([context, new_tokens]))
        history = torch.cat([history, new_tokens])
        if clean.numel() == 0:
            continue
        mel = s3gen.flow_inference(clean, ref, cfm_noise=cfm_noise, n_timesteps=n_timesteps)
        n_samples = mel.shape[-1] * s3gen.cfg.samples_per_mel_frame
        noise = source_noise(n_samples) if source_noise is not None else None
        wav, _ = s3gen.hift_inference(mel, noise)
        wav = s3gen.apply_trim_fade(wav)
        # upstream counts the context before dropping invalid ids, and crops by average samples per token
        skip = int(context.numel() * (wav.shape[-1] / clean.numel()))
        chunk = wav[:, skip:]
        if chunk.shape[-1] == 0:
            continue
        n_fade = min(fade_samples, chunk.shape[-1])
        if n_fade > 0:
            ramp = torch.linspace(0.0, 1.0, n_fade, device=chunk.device, dtype=chunk.dtype)
            chunk = torch.cat([chunk[:, :n_fade] * ramp, chunk[:, n_fade:]], dim=-1)
        yield chunk, int(clean.numel())
