"""A request's T3 tokens cut into streaming chunks, and the S3Gen state that renders them.

* ``t3_chunks`` cuts T3's stop-checked token blocks of one text segment into chunks of the chunk
  schedule's sizes.
* ``SegmentRenderer`` renders the chunks of one segment: incremental flow (``streaming.flow_stream_step``:
  bounded left context, start noise by absolute frame), then the exact-state vocoder
  (``HiFTStreamer``) and the trim fade; it carries the flow and vocoder state from chunk to chunk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..models.s3gen.hift_stream import HiFTStreamer, StreamNoise
from ..models.s3gen.s3gen import S3Gen, S3GenRef
from ..streaming import FlowStepPlan, FlowStreamConfig, flow_stream_step, init_flow_stream, plan_flow_step
from ..text import drop_invalid_tokens


@dataclass(frozen=True)
class ChunkTokens:
    """One chunk's share of T3's output, ready for S3Gen."""

    tokens: torch.Tensor | None  # (1, n) as sampled; None when T3 ended exactly at a chunk boundary
    valid: torch.Tensor  # (M,) the codes S3Gen can render
    final: bool  # the segment's last chunk: S3Gen flushes
    t3_s: float  # wall seconds spent waiting on T3 for this chunk

    @property
    def n_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]


def t3_chunks(blocks: Iterator[torch.Tensor], schedule: Iterator[int], stop_token: int, device: torch.device,
              codes: Callable[[torch.Tensor | None, bool], torch.Tensor] | None = None) -> Iterator[ChunkTokens]:
    """Chunks of ``schedule`` sizes from T3's blocks (1, <= block) of one segment; the last has
    ``final=True`` (T3 hit ``stop_token`` or ran out of steps). ``codes(tokens, final)`` turns a chunk's
    tokens into the codes S3Gen renders (default: ``drop_invalid_tokens``)."""
    pending: list[torch.Tensor] = []
    done = False
    while not done:
        want = next(schedule)
        t0 = time.perf_counter()
        while not done and sum(p.shape[1] for p in pending) < want:
            block = next(blocks, None)
            if block is None:
                done = True
            else:
                pending.append(block)
        arrived = torch.cat(pending, dim=1) if pending else None
        n = 0 if arrived is None else min(arrived.shape[1], want)
        tokens = arrived[:, :n] if arrived is not None else None
        pending = [arrived[:, n:]] if arrived is not None and arrived.shape[1] > n else []
        done = done or (tokens is not None and bool((tokens == stop_token).any()))
        if codes is not None:
            valid = codes(tokens, done)
        else:
            valid = drop_invalid_tokens(tokens) if tokens is not None else torch.zeros(0, dtype=torch.long, device=device)
        yield ChunkTokens(tokens=tokens, valid=valid, final=done, t3_s=time.perf_counter() - t0)


class SegmentRenderer:
    """Flow + vocoder state of one text segment of one request."""

    def __init__(self, s3gen: S3Gen, ref: S3GenRef, streamer: HiFTStreamer, cfm_noise: torch.Tensor,
                 flow_cfg: FlowStreamConfig, n_timesteps: int, noise: StreamNoise) -> None:
        self.s3gen, self.ref, self.streamer = s3gen, ref, streamer
        self.cfm_noise, self.flow_cfg, self.n_timesteps = cfm_noise, flow_cfg, n_timesteps
        self.flow_state = init_flow_stream(s3gen, ref)
        self.voc_state = streamer.init_state(1, s3gen.device, noise)
        self.samples = 0  # rendered so far in this segment: the trim fade's offset

    def flow(self, valid: torch.Tensor, final: bool) -> torch.Tensor:
        """Codes (M,) -> the mel frames now ready (1, n_mels, k)."""
        mel, self.flow_state = flow_stream_step(self.s3gen, self.ref, self.flow_state, valid, self.cfm_noise,
                                                self.flow_cfg, final=final, n_timesteps=self.n_timesteps)
        return mel

    def plan(self, valid: torch.Tensor, final: bool) -> FlowStepPlan | None:
        """``flow`` in two halves, for a scheduler that decodes several requests at once: what to render
        (None when no frame is ready yet); the state moves on as ``flow`` moves it."""
        plan, self.flow_state = plan_flow_step(self.s3gen, self.ref, self.flow_state, valid, self.cfm_noise,
                                               self.flow_cfg, final=final)
        return plan

    def empty_mel(self) -> torch.Tensor:
        return self.cfm_noise.new_zeros((1, self.s3gen.cfg.flow.n_mels, 0))

    def vocode(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        """Mel frames -> the waveform samples now final (1, n), trim fade applied, float32."""
        wav, self.voc_state = self.streamer.push(mel, self.voc_state, final=final)
        wav = self.s3gen.apply_trim_fade(wav, offset=self.samples)
        self.samples += wav.shape[-1]
        return wav.detach().float()
