"""Incremental S3Gen for streaming: the flow rendered chunk by chunk over a bounded left context.

Frames are addressed in absolute *mu-frame* coordinates of the one-shot call: frames [0, 2P) belong
to the P prompt tokens, speech token j owns frames [2P + 2j, 2P + 2j + 2), and the output starts at
frame F (the prompt mel length, 2P or 2P + 1). The CFM start noise is sliced from one table by these
absolute indices, so a chunk sees the very noise the one-shot call gives the same frames.

Each step runs the flow on [prompt | context | tokens so far], where the context is the last
``context_window`` tokens before the first frame still to emit. Frames of the last
``lookahead_tokens`` tokens wait for their right context (the encoder's pre-lookahead reaches three
tokens ahead) unless the stream is final. The encoder and the CFM attend over the whole window, so a
frame rendered before later tokens exist differs slightly from the one-shot frame: the fidelity is
measured (SNR against one-shot), not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models.s3gen.s3gen import S3Gen, S3GenRef


@dataclass(frozen=True)
class FlowStreamConfig:
    context_window: int = 50  # tokens of left context re-encoded with each chunk
    lookahead_tokens: int = 3  # the encoder's pre-lookahead: frames of the newest tokens wait for these

    def __post_init__(self) -> None:
        if self.context_window < 0:
            raise ValueError(f"context_window must be >= 0, got {self.context_window}")
        if self.lookahead_tokens < 0:
            raise ValueError(f"lookahead_tokens must be >= 0, got {self.lookahead_tokens}")

    @classmethod
    def published(cls) -> "FlowStreamConfig":
        return cls()


@dataclass(frozen=True)
class FlowStreamState:
    """What a flow stream carries between chunks (a new object per step; nothing is mutated)."""

    tokens: torch.Tensor  # (N,) valid speech codes received so far
    emitted_frame: int  # absolute mu frame of the next mel frame to emit
    finished: bool = False


def init_flow_stream(s3gen: S3Gen, ref: S3GenRef) -> FlowStreamState:
    return FlowStreamState(tokens=torch.zeros(0, dtype=torch.long, device=s3gen.device),
                           emitted_frame=int(ref.prompt_feat.shape[1]))


@dataclass(frozen=True)
class FlowStepPlan:
    """What one flow step renders: the token window and its noise, and which output frames to keep."""

    window: torch.Tensor  # (W,) speech codes: left context + the tokens so far
    noise: torch.Tensor  # (1, n_mels, >= frames) the start noise of the window's frames, prompt first
    start: int  # output frames [start, stop) of the flow's result are the ones now ready
    stop: int


def plan_flow_step(s3gen: S3Gen, ref: S3GenRef, state: FlowStreamState, new_tokens: torch.Tensor,
                   cfm_noise: torch.Tensor, cfg: FlowStreamConfig,
                   final: bool = False) -> tuple[FlowStepPlan | None, FlowStreamState]:
    """Add valid speech codes ``new_tokens`` (M,) -> (the flow call to make, or None when no frame is
    ready yet; the new state). ``flow_stream_step`` runs the plan; a scheduler may run several
    requests' plans in one batched CFM call (``S3GenFlow.decode_batch``)."""
    if state.finished:
        raise RuntimeError("flow stream already finished")
    tokens = torch.cat([state.tokens, new_tokens.reshape(-1).to(state.tokens.device)])
    n_prompt_tokens = ref.prompt_token.shape[1]
    ratio = s3gen.cfg.mel_frames_per_token
    prompt_frames = ratio * n_prompt_tokens
    n_tokens = tokens.shape[0]
    ready_tokens = n_tokens if final else max(n_tokens - cfg.lookahead_tokens, 0)
    emit_to = max(prompt_frames + ratio * ready_tokens, state.emitted_frame)
    new_state = FlowStreamState(tokens=tokens, emitted_frame=emit_to, finished=final)
    if emit_to == state.emitted_frame:
        return None, new_state

    first_token = max((state.emitted_frame - prompt_frames) // ratio, 0)
    context_start = max(first_token - cfg.context_window, 0)
    prompt_feat_frames = ref.prompt_feat.shape[1]
    if context_start > 0 and prompt_feat_frames > prompt_frames:
        # An odd-length prompt mel covers the first frame after the prompt; keep at least one
        # context token there so no emitted frame falls under the prompt conditioning.
        context_start = min(context_start, first_token - 1)
    shift = ratio * context_start  # absolute frame = local frame + shift, for frames after the prompt
    noise = torch.cat([cfm_noise[:, :, :prompt_frames],
                       cfm_noise[:, :, prompt_frames + shift:prompt_frames + ratio * n_tokens]], dim=2)
    plan = FlowStepPlan(window=tokens[context_start:], noise=noise,
                        start=state.emitted_frame - shift - prompt_feat_frames,
                        stop=emit_to - shift - prompt_feat_frames)
    return plan, new_state


def flow_stream_step(s3gen: S3Gen, ref: S3GenRef, state: FlowStreamState, new_tokens: torch.Tensor,
                     cfm_noise: torch.Tensor, cfg: FlowStreamConfig, final: bool = False,
                     n_timesteps: int | None = None) -> tuple[torch.Tensor, FlowStreamState]:
    """Add valid speech codes ``new_tokens`` (M,) -> (mel frames now ready (1, 80, k), new state)."""
    plan, new_state = plan_flow_step(s3gen, ref, state, new_tokens, cfm_noise, cfg, final)
    if plan is None:
        return cfm_noise.new_zeros((1, s3gen.cfg.flow.n_mels, 0)), new_state
    mel = s3gen.flow_inference(plan.window, ref, cfm_noise=plan.noise, n_timesteps=n_timesteps)  # local frames [F, ...)
    return mel[:, :, plan.start:plan.stop], new_state


@dataclass
class ChunkTiming:
    index: int
    tokens: int  # speech tokens that arrived with this chunk (valid or not)
    samples: int  # audio samples yielded
    t3_s: float  # T3 time spent producing this chunk's tokens
    flow_s: float
    vocoder_s: float
    emitted_at_s: float  # since the call started


@dataclass
class StreamingMetrics:
    """Upstream's fields plus per-chunk timings."""

    latency_to_first_chunk: float | None = None
    rtf: float | None = None
    total_generation_time: float | None = None
    total_audio_duration: float | None = None
    chunk_count: int = 0
    chunks: list[ChunkTiming] = field(default_factory=list)


def chunk_schedule(chunk_size: int | list[int] | tuple[int, ...]):
    """Token counts per chunk: an int repeats; a list is used in order, its last value repeating."""
    sizes = [chunk_size] if isinstance(chunk_size, int) else list(chunk_size)
    if not sizes or any((not isinstance(s, int)) or s < 1 for s in sizes):
        raise ValueError(f"chunk_size must be a positive int or a non-empty list of them, got {chunk_size!r}")
    index = 0
    while True:
        yield sizes[min(index, len(sizes) - 1)]
        index += 1
