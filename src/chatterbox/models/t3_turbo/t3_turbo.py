"""T3 of Chatterbox-Turbo (and Nano): text + conditioning -> speech tokens on a GPT-2 backbone.

Sequence layout (upstream's): [speaker (1) | prompt speech tokens (P) | text (n) | speech (m)], every
part a plain embedding lookup (no perceiver, no emotion, no per-part position tables): GPT-2's own
learned positions run over the whole sequence. Generation is batch 1 per request with no guidance:
the prefill ends with one start-of-speech token, and each sampled token is fed back at the next
backbone position.

Upstream quirks kept (``T3.inference_turbo``): the first token, sampled from the prefill, is never
checked for the stop token; the repetition penalty of the first step sees only the start token, and
later steps see the generated tokens only (see ``sampling.py``); at most ``1 + max_gen_len`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from ...constants import DEFAULT_STOP_CHECK_EVERY
from ..t3.cond import T3Cond
from ..t3.heads import T3Heads
from ..t3.llama import KVCache
from ..t3.sampling import Recorder
from ..t3.t3 import T3Output, token_blocks
from .gpt2 import GPT2Config, GPT2Model
from .sampling import TurboSamplingConfig, ids_mask, sample_turbo

# Requests are generated one row each; the reference loop runs batch 1.
GEN_BATCH = 1


@dataclass(frozen=True)
class T3TurboConfig:
    text_vocab_size: int
    speech_vocab_size: int
    start_speech_token: int
    stop_speech_token: int
    speaker_embed_size: int
    speech_cond_prompt_len: int  # prompt tokens prepare_conditionals keeps (any length is accepted)
    gpt2: GPT2Config = field(default_factory=GPT2Config.medium)

    def __post_init__(self) -> None:
        for name in ("start_speech_token", "stop_speech_token"):
            if not 0 <= getattr(self, name) < self.speech_vocab_size:
                raise ValueError(f"{name} outside the speech vocabulary")

    @property
    def dim(self) -> int:
        return self.gpt2.hidden_size

    @classmethod
    def turbo(cls) -> "T3TurboConfig":
        """``t3_turbo_v1.safetensors``: GPT-2 medium (about 350M parameters with the token tables)."""
        return cls(text_vocab_size=50276, speech_vocab_size=6563, start_speech_token=6561, stop_speech_token=6562,
                   speaker_embed_size=256, speech_cond_prompt_len=375, gpt2=GPT2Config.medium())

    @classmethod
    def nano(cls) -> "T3TurboConfig":
        """``t3_nano_v1.safetensors``: the same model on GPT-2 small."""
        return cls(text_vocab_size=50276, speech_vocab_size=6563, start_speech_token=6561, stop_speech_token=6562,
                   speaker_embed_size=256, speech_cond_prompt_len=375, gpt2=GPT2Config.small())

    @classmethod
    def tiny(cls, speaker_embed_size: int = 256) -> "T3TurboConfig":
        """A two-layer model with the published token ids, for fast unit tests."""
        return cls(text_vocab_size=50276, speech_vocab_size=6563, start_speech_token=6561, stop_speech_token=6562,
                   speaker_embed_size=speaker_embed_size, speech_cond_prompt_len=20, gpt2=GPT2Config.tiny())


class TurboCondEnc(nn.Module):
    """The speaker projection (checkpoint keys ``cond_enc.spkr_enc.*``)."""

    def __init__(self, speaker_embed_size: int, dim: int):
        super().__init__()
        self.speaker_embed_size = speaker_embed_size
        self.spkr_enc = nn.Linear(speaker_embed_size, dim)

    def forward(self, speaker_emb: Tensor) -> Tensor:
        """(B, speaker_embed_size) -> (B, 1, C)."""
        return self.spkr_enc(speaker_emb.reshape(-1, self.speaker_embed_size))[:, None]


class T3Turbo(T3Heads, nn.Module):
    def __init__(self, cfg: T3TurboConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.tfmr = GPT2Model(cfg.gpt2)
        self.cond_enc = TurboCondEnc(cfg.speaker_embed_size, dim)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, dim)
        self.speech_emb = nn.Embedding(cfg.speech_vocab_size, dim)
        self.text_head = nn.Linear(dim, cfg.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(dim, cfg.speech_vocab_size, bias=True)

    @property
    def device(self) -> torch.device:
        return self.speech_head.weight.device

    # ----------------------------------------------------------------- embeddings
    def prepare_conditioning(self, t3_cond: T3Cond) -> Tensor:
        """T3Cond -> [speaker | prompt speech embeddings] (B, 1 + P, C); ``emotion_adv`` is unused."""
        speaker = self.cond_enc(t3_cond.speaker_emb.to(self.device))
        prompt = t3_cond.cond_prompt_speech_emb
        if prompt is None and t3_cond.cond_prompt_speech_tokens is not None:
            prompt = self.speech_emb(t3_cond.cond_prompt_speech_tokens.to(self.device))
        if prompt is None:
            return speaker
        return torch.cat([speaker, prompt.to(speaker.dtype).expand(speaker.shape[0], -1, -1)], dim=1)

    def with_prompt_embeds(self, t3_cond: T3Cond) -> T3Cond:
        """A copy of ``t3_cond`` with ``cond_prompt_speech_emb`` filled in (explicit caching)."""
        if t3_cond.cond_prompt_speech_tokens is None or t3_cond.cond_prompt_speech_emb is not None:
            return t3_cond
        return t3_cond.replace(cond_prompt_speech_emb=self.speech_emb(t3_cond.cond_prompt_speech_tokens))

    def prepare_input_embeds(self, t3_cond: T3Cond, text_tokens: Tensor, speech_tokens: Tensor,
                             cond_emb: Tensor | None = None) -> tuple[Tensor, int]:
        """-> ([cond | text | speech] (B, L, C), L_cond). Conditioning of batch 1 is shared by all rows."""
        if cond_emb is None:
            cond_emb = self.prepare_conditioning(t3_cond)
        text = self.text_emb(text_tokens)
        speech = self.speech_emb(speech_tokens)
        b = text.shape[0]
        cond_emb = cond_emb.expand(b, -1, -1) if cond_emb.shape[0] != b else cond_emb
        return torch.cat((cond_emb, text, speech), dim=1), cond_emb.shape[1]

    # ------------------------------------------------------------ teacher forcing
    def forward(self, t3_cond: T3Cond, text_tokens: Tensor, speech_tokens: Tensor) -> T3Output:
        """Full causal pass (no cache) and both heads over every text and speech position."""
        embeds, len_cond = self.prepare_input_embeds(t3_cond, text_tokens, speech_tokens)
        hidden = self.tfmr(embeds)  # (B, L, C)
        n, m = text_tokens.shape[1], speech_tokens.shape[1]
        text_latents = hidden[:, len_cond:len_cond + n]
        speech_latents = hidden[:, len_cond + n:len_cond + n + m]
        return T3Output(self.text_logits(text_latents), self.speech_logits(speech_latents),
                        text_latents, speech_latents, hidden)

    # ----------------------------------------------------------------- generation
    def init_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        return self.tfmr.init_cache(batch, max_len, device, dtype)

    def prompt_embeds(self, t3_cond: T3Cond, text_tokens: Tensor) -> Tensor:
        """The generation prompt [cond | text | start of speech] (B, P, C); ``text_tokens`` (B, n)."""
        start = torch.full((text_tokens.shape[0], 1), self.cfg.start_speech_token, dtype=torch.long,
                           device=text_tokens.device)
        embeds, _ = self.prepare_input_embeds(t3_cond, text_tokens, start)
        return embeds

    def prefill(self, embeds: Tensor, cache: KVCache) -> Tensor:
        """Prefill positions 0..S-1 into ``cache``; -> speech logits of the last position (B, V)."""
        return self.speech_logits(self.tfmr(embeds, cache)[:, -1])

    def decode_step(self, embeds: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """One token (B, 1, C) at backbone ``position`` (1,) -> speech logits (B, V). Fixed shapes."""
        return self.speech_logits(self.tfmr.decode(embeds, position, cache)[:, -1])

    def next_token_embeds(self, token: Tensor) -> Tensor:
        """Sampled tokens (B, 1) -> the next input (B, 1, C)."""
        return self.speech_emb(token)

    def check_text(self, text_tokens: Tensor) -> Tensor:
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=self.device)
        if text_tokens.shape[0] != GEN_BATCH or text_tokens.shape[1] < 1:
            raise ValueError(f"text_tokens must be one non-empty row (1, n), got {tuple(text_tokens.shape)}")
        return text_tokens

    def generate_tokens(
        self, t3_cond: T3Cond, text_tokens: Tensor, max_new_tokens: int, *,
        sampling: TurboSamplingConfig = TurboSamplingConfig(), generator: torch.Generator | None = None,
        forced_tokens: Tensor | None = None, block_size: int = DEFAULT_STOP_CHECK_EVERY,
        recorder: Recorder | None = None, cache: KVCache | None = None,
    ) -> Iterator[Tensor]:
        """The reference generation loop (eager, batch 1): speech tokens in blocks (1, <= block_size),
        ending with the block that holds the stop token (kept) or when ``max_new_tokens`` tokens were
        sampled (upstream's ``max_gen_len`` + 1). One host sync per block, the stop check; steps
        sampled past a stop inside a block are discarded. ``forced_tokens`` (1, K) replays tokens
        instead of sampling (parity) and caps the steps at K.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        text_tokens = self.check_text(text_tokens)
        steps = max_new_tokens
        if forced_tokens is not None:
            forced_tokens = torch.atleast_2d(forced_tokens).to(dtype=torch.long, device=self.device)
            steps = min(steps, forced_tokens.shape[1])

        embeds = self.prompt_embeds(t3_cond, text_tokens)  # (1, P, C)
        prefix = embeds.shape[1]
        need = prefix + steps - 1  # the last sampled token is never fed back
        if need > self.cfg.gpt2.max_position_embeddings:
            raise ValueError(f"{prefix} prompt positions + {steps} tokens exceed the position table "
                             f"({self.cfg.gpt2.max_position_embeddings})")
        if cache is None:
            cache = self.init_cache(GEN_BATCH, need, embeds.device, embeds.dtype)
        elif cache.max_len < need or cache.batch != GEN_BATCH:
            raise ValueError(f"cache (batch {cache.batch}, length {cache.max_len}) is smaller than "
                             f"(batch {GEN_BATCH}, length {need})")
        logits = self.prefill(embeds, cache)  # (1, V)
        tokens = self._eager_tokens(logits, prefix, cache, sampling, generator, steps, forced_tokens, recorder)
        done = 0  # tokens yielded before this block
        for block in token_blocks(tokens, steps, block_size):
            stops = block[0] == self.cfg.stop_speech_token
            if done == 0:
                stops[0] = False  # the prefill's token is never checked (upstream)
            hits = stops.nonzero()  # the per-block host sync
            if hits.numel():
                yield block[:, :int(hits[0, 0]) + 1]
                return
            done += block.shape[1]
            yield block

    def _eager_tokens(self, logits: Tensor, prefix: int, cache: KVCache, sampling: TurboSamplingConfig,
                      generator: torch.Generator | None, steps: int, forced_tokens: Tensor | None,
                      recorder: Recorder | None) -> Iterator[Tensor]:
        """Sampled tokens (1, 1), one per step; a token is fed back only when the next one is asked for."""
        vocab = self.cfg.speech_vocab_size
        start = torch.full((GEN_BATCH, 1), self.cfg.start_speech_token, dtype=torch.long, device=logits.device)
        penalised = ids_mask(GEN_BATCH, vocab, start)  # first step: only the start token
        generated = torch.zeros_like(penalised)  # later steps: the generated tokens, without the start
        position = torch.full((1,), prefix, dtype=torch.long, device=logits.device)
        for step in range(steps):
            forced = None if forced_tokens is None else forced_tokens[:, step:step + 1]
            token = sample_turbo(logits, penalised, sampling, generator, forced, recorder)  # (1, 1)
            generated = generated.scatter(1, token, True)
            penalised = generated
            yield token
            if step == steps - 1:
                return
            logits = self.decode_step(self.next_token_embeds(token), position, cache)
            position = position + 1

    def inference(
        self, t3_cond: T3Cond, text_tokens: Tensor, max_new_tokens: int, *,
        sampling: TurboSamplingConfig = TurboSamplingConfig(), generator: torch.Generator | None = None,
        forced_tokens: Tensor | None = None, stop_check_every: int = DEFAULT_STOP_CHECK_EVERY,
        recorder: Recorder | None = None,
    ) -> Tensor:
        """Generate speech tokens (1, N), including the stop token when one was sampled (upstream strips
        it; ``sampling.clean_speech_tokens`` drops it with the other special ids)."""
        blocks = list(self.generate_tokens(
            t3_cond, text_tokens, max_new_tokens, sampling=sampling, generator=generator,
            forced_tokens=forced_tokens, block_size=stop_check_every, recorder=recorder))
        return torch.cat(blocks, dim=1)
