"""Chatterbox-Turbo and Chatterbox-Nano on the engine: the same sessions, streaming, scheduling and
serving, with what differs about these models.

* T3 is a GPT-2 backbone without guidance (one row per request), sampled with temperature, top-k,
  top-p and then the repetition penalty; the penalty looks at the start token on the first step and
  at the generated tokens after that, and the first token is never read as a stop (upstream's rules,
  ``models/t3_turbo``). ``turbo_runner`` generates it: eagerly per request, or (CUDA graphs on) in
  slots of one pool stepped by captured graphs, batched across requests with ``t3_batching``.
* Speech codes: ids at or past the start token are dropped, and three silence codes follow the last
  chunk of a segment (``models.t3_turbo.sampling.SpeechTokenCleanup``).
* S3Gen is the meanflow variant: 2 linear Euler steps of its own (``OptConfig.cfm_steps`` does not
  apply: the estimator was distilled for those steps), no guidance.
* Text: GPT-2 BPE with the paralinguistic tags as single tokens (byte-level, so any text encodes);
  voices: loudness-normalised references of more than 5 s (``voice_turbo.py``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..conditionals import Conditionals
from ..models.t3_turbo.sampling import SpeechTokenCleanup, TurboSamplingConfig
from ..models.t3_turbo.table_decode import GPT2TableDecoder, block_outputs, first_norm
from ..optim.modes import attention_context, autograd_context
from ..text import split_text
from ..text_turbo import punc_norm_turbo
from ..voice_turbo import TurboVoiceConfig, prepare_turbo_conditionals
from .engine import Engine, allow_recompiles, graph_safe_compile
from .request import SynthesisRequest
from .slot_runner import T3Request, T3RunnerConfig
from .t3_stream import T3Stream
from .turbo_runner import TURBO_GRAPHED_MAX_TOKENS, EagerTurboRunner, GraphedTurboRunner, turbo_pick

log = logging.getLogger(__name__)


class TurboEngine(Engine):
    def __init__(self, *args, voice_cfg: TurboVoiceConfig | None = None,
                 cleanup: SpeechTokenCleanup | None = None, **kwargs) -> None:
        self.voice_cfg = voice_cfg or TurboVoiceConfig.published()
        self.cleanup = cleanup or SpeechTokenCleanup.published()
        super().__init__(*args, **kwargs)

    def _t3_runner(self):
        opt, t3 = self.opt, self.models.t3
        if not (opt.t3.cuda_graphs and self.graphs.enabled):
            return EagerTurboRunner(t3)
        cfg = self._runner_config()
        with torch.inference_mode(False), torch.no_grad():
            decoder = GPT2TableDecoder.of(t3.tfmr)
        pick = turbo_pick
        if opt.t3.compile is not None:
            allow_recompiles(len(cfg.batch_buckets) + cfg.max_prefill // cfg.prefill_bucket)
            decoder = decoder.with_kernels(graph_safe_compile(block_outputs, opt.t3.compile),
                                           graph_safe_compile(first_norm, opt.t3.compile))
            pick = graph_safe_compile(turbo_pick, opt.t3.compile)
        return GraphedTurboRunner(t3, decoder, self.graphs, cfg, pick)

    def t3_start(self, req: T3Request) -> T3Stream:
        """As ``Engine.t3_start``; a request longer than the graphed runner covers runs eagerly (on the
        same weights) rather than being refused."""
        runner = self.t3_runner
        if isinstance(runner, GraphedTurboRunner) and not runner.covers(req):
            log.info("a request of %d tokens is longer than the captured decode covers: eager T3",
                     req.max_new_tokens)
            return EagerTurboRunner(self.models.t3).start(req)
        return super().t3_start(req)

    def _runner_config(self) -> T3RunnerConfig:
        cfg = self.cfg.t3
        if cfg == T3RunnerConfig.published():  # left at the default: Turbo's own
            cfg = T3RunnerConfig.turbo()
        if not self.opt.t3_batching:
            cfg = dataclasses.replace(cfg, batch_buckets=(1,))
        table = self.models.t3.cfg.gpt2.max_position_embeddings
        if cfg.max_prefill + TURBO_GRAPHED_MAX_TOKENS > table:  # a small position table: a quarter for prompts
            bucket = cfg.prefill_bucket
            cfg = dataclasses.replace(cfg, max_prefill=max(bucket, table // 4 // bucket * bucket))
        return cfg

    # ------------------------------------------------------------------ model family
    @property
    def cfm_steps(self) -> int | None:
        return None  # the meanflow CFM's own two steps

    def t3_sampling(self, request: SynthesisRequest) -> TurboSamplingConfig:
        return TurboSamplingConfig(temperature=float(request.temperature), top_k=int(request.top_k),
                                   top_p=float(request.top_p), repetition_penalty=float(request.repetition_penalty))

    def valid_tokens(self, speech: Tensor) -> Tensor:
        return self._codes(speech.reshape(-1), final=True)

    def chunk_codes(self, tokens: Tensor | None, final: bool) -> Tensor:
        flat = torch.zeros(0, dtype=torch.long, device=self.device) if tokens is None else tokens.reshape(-1)
        return self._codes(flat, final)

    def _codes(self, flat: Tensor, final: bool) -> Tensor:
        kept = flat[flat < self.cleanup.first_special]
        if not final:
            return kept
        silence = torch.full((self.cleanup.trailing_silence,), self.cleanup.silence_token, dtype=kept.dtype,
                             device=kept.device)
        return torch.cat([kept, silence])

    # ------------------------------------------------------------------ text and voice
    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(punc_norm_turbo(text)))

    def text_segments(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("no text to speak (empty input)")
        return split_text(text, self.count_text_tokens, self.cfg.text_split)  # byte-level BPE: all text encodes

    def text_tokens(self, text: str) -> Tensor:
        return self.tokenizer.text_to_tokens(punc_norm_turbo(text)).to(self.device)  # (1, n)

    def prepare_conditionals(self, wav_or_path: str | Path | np.ndarray | Tensor, exaggeration: float = 0.0,
                             sample_rate: int | None = None, timer=None, norm_loudness: bool = True) -> Conditionals:
        with autograd_context(self.opt.autograd_mode), attention_context(self.opt.attention_backend):
            conds = prepare_turbo_conditionals(self.models.s3gen, self.models.ve, wav_or_path, exaggeration,
                                               sample_rate, norm_loudness=norm_loudness, cfg=self.voice_cfg,
                                               timer=timer)
        with torch.inference_mode(False):
            return conds.clone()
