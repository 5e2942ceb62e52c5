"""Chatterbox-Turbo and Chatterbox-Nano on the engine: the same sessions, streaming, scheduling and
serving, with what differs about these models.

* T3 is a GPT-2 backbone without guidance (one row per request), sampled with temperature, top-k,
  top-p and then the repetition penalty; the penalty looks at the start token on the first step and
  at the generated tokens after that, and the first token is never read as a stop (upstream's rules,
  ``models/t3_turbo``). ``EagerTurboRunner`` generates it per request.
* Speech codes: ids at or past the start token are dropped, and three silence codes follow the last
  chunk of a segment (``models.t3_turbo.sampling.SpeechTokenCleanup``).
* S3Gen is the meanflow variant: 2 linear Euler steps of its own (``OptConfig.cfm_steps`` does not
  apply: the estimator was distilled for those steps), no guidance.
* Text: GPT-2 BPE with the paralinguistic tags as single tokens (byte-level, so any text encodes);
  voices: loudness-normalised references of more than 5 s (``voice_turbo.py``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..conditionals import Conditionals
from ..models.t3.sampling import exponential_race, pick_by_race
from ..models.t3_turbo.sampling import SpeechTokenCleanup, TurboSamplingConfig, ids_mask, process_turbo_logits
from ..models.t3_turbo.t3_turbo import T3Turbo
from ..optim.modes import attention_context, autograd_context
from ..text import split_text
from ..text_turbo import punc_norm_turbo
from ..voice_turbo import TurboVoiceConfig, prepare_turbo_conditionals
from .engine import Engine
from .request import SynthesisRequest
from .t3_runner import T3Request
from .t3_stream import T3Stream, stepped_producer

# Turbo requests: one backbone row each (no classifier-free guidance).
TURBO_ROWS = 1


class EagerTurboRunner:
    """A Turbo request on its own state and cache, stepped eagerly. The draw is the exponential race
    (``argmax(p / E)``), which is ``torch.multinomial``'s draw and generator use without its host read."""

    def __init__(self, t3: T3Turbo) -> None:
        self.t3 = t3
        self.lock = contextlib.nullcontext()

    def start(self, req: T3Request) -> T3Stream:
        t3, cfg = self.t3, self.t3.cfg
        sampling: TurboSamplingConfig = req.sampling
        text = t3.check_text(req.text_tokens)
        steps = req.max_new_tokens
        if steps < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {steps}")
        embeds = t3.prompt_embeds(req.cond, text)  # (1, P, C)
        prefix = embeds.shape[1]
        if prefix + steps > cfg.gpt2.max_position_embeddings:
            raise ValueError(f"{prefix} prompt positions + {steps} tokens exceed the position table "
                             f"({cfg.gpt2.max_position_embeddings}); lower max_new_tokens")
        device = embeds.device
        cache = t3.init_cache(TURBO_ROWS, prefix + steps, device, embeds.dtype)
        start = torch.full((TURBO_ROWS, 1), cfg.start_speech_token, dtype=torch.long, device=device)
        state = {"logits": t3.prefill(embeds, cache), "penalised": ids_mask(TURBO_ROWS, cfg.speech_vocab_size, start),
                 "position": torch.full((1,), prefix, dtype=torch.long, device=device), "step": 0}
        generated = torch.zeros(TURBO_ROWS, cfg.speech_vocab_size, dtype=torch.bool, device=device)
        history = torch.zeros(1, steps, dtype=torch.long, device=device)

        def step() -> None:
            probs = process_turbo_logits(state["logits"], state["penalised"], sampling).softmax(dim=-1)
            token = pick_by_race(probs, exponential_race(probs, req.generator))  # (1, 1)
            history[:, state["step"]:state["step"] + 1] = token
            generated.scatter_(1, token, True)
            state["penalised"] = generated  # from the second step on: the generated tokens only
            state["logits"] = t3.decode_step(t3.next_token_embeds(token), state["position"], cache)
            state["position"] = state["position"] + 1
            state["step"] += 1

        return T3Stream(stepped_producer(history, 0, step, self.lock), steps, req.block_size, cfg.stop_speech_token,
                        device, keep=(cache,), first_may_stop=False)


class TurboEngine(Engine):
    def __init__(self, *args, voice_cfg: TurboVoiceConfig | None = None,
                 cleanup: SpeechTokenCleanup | None = None, **kwargs) -> None:
        self.voice_cfg = voice_cfg or TurboVoiceConfig.published()
        self.cleanup = cleanup or SpeechTokenCleanup.published()
        super().__init__(*args, **kwargs)

    def _t3_runner(self):
        return EagerTurboRunner(self.models.t3)

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
