"""T3: text + conditioning -> speech tokens, on a Llama backbone fed with embeddings.

Sequence layout (upstream's): [cond (34) | text + text positions | speech + speech positions].
Classifier-free guidance runs a batch of 2: row 1 is row 0 with the text *token* embeddings zeroed
(text positions, conditioning and speech stay). Generation prefills [cond | text | BOS] followed by a
second BOS (both at learned speech position 0); generated token i is fed at speech position i + 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import Tensor, nn

from ...constants import DEFAULT_STOP_CHECK_EVERY
from .cond import T3Cond
from .cond_enc import T3CondEnc, T3CondEncConfig
from .heads import T3Heads
from .llama import KVCache, LlamaConfig, LlamaModel
from .sampling import STREAM_ORDER, Recorder, SamplingConfig, mark_seen, new_seen, sample_next

# The CFG batch: row 0 conditional, row 1 unconditional (text token embeddings zeroed).
CFG_BATCH = 2
UNCOND_ROW = 1


@dataclass(frozen=True)
class T3Config:
    text_vocab_size: int
    speech_vocab_size: int
    start_text_token: int
    stop_text_token: int
    start_speech_token: int
    stop_speech_token: int
    max_text_tokens: int
    max_speech_tokens: int
    text_pos_emb_len: int  # learned text position table (upstream: max_text_tokens + 2)
    speech_pos_emb_len: int  # learned speech position table (upstream: max_speech_tokens + 4)
    speech_cond_prompt_len: int
    llama: LlamaConfig = field(default_factory=LlamaConfig.published)
    cond_enc: T3CondEncConfig = field(default_factory=T3CondEncConfig.published)

    def __post_init__(self) -> None:
        if self.cond_enc.dim != self.llama.hidden_size:
            raise ValueError(f"cond_enc dim {self.cond_enc.dim} != backbone width {self.llama.hidden_size}")
        for name in ("start_speech_token", "stop_speech_token"):
            if not 0 <= getattr(self, name) < self.speech_vocab_size:
                raise ValueError(f"{name} outside the speech vocabulary")
        for name in ("start_text_token", "stop_text_token"):
            if not 0 <= getattr(self, name) < self.text_vocab_size:
                raise ValueError(f"{name} outside the text vocabulary")

    @property
    def dim(self) -> int:
        return self.llama.hidden_size

    @classmethod
    def published(cls) -> "T3Config":
        return cls(
            text_vocab_size=704, speech_vocab_size=8194, start_text_token=255, stop_text_token=0,
            start_speech_token=6561, stop_speech_token=6562, max_text_tokens=2048, max_speech_tokens=4096,
            text_pos_emb_len=2050, speech_pos_emb_len=4100, speech_cond_prompt_len=150,
            llama=LlamaConfig.published(), cond_enc=T3CondEncConfig.published(),
        )

    @classmethod
    def tiny_pipeline(cls, speaker_embed_size: int) -> "T3Config":
        """A tiny backbone with the published vocabularies and special tokens (it reads the real text
        tokenizer and S3 speech codes), for fast end-to-end tests."""
        cond = T3CondEncConfig.tiny()
        return replace(cls.published(), llama=LlamaConfig.tiny(),
                       cond_enc=replace(cond, speaker_embed_size=speaker_embed_size))

    @classmethod
    def tiny(cls) -> "T3Config":
        return cls(
            text_vocab_size=32, speech_vocab_size=40, start_text_token=30, stop_text_token=0,
            start_speech_token=37, stop_speech_token=38, max_text_tokens=64, max_speech_tokens=128,
            text_pos_emb_len=66, speech_pos_emb_len=132, speech_cond_prompt_len=8,
            llama=LlamaConfig.tiny(), cond_enc=T3CondEncConfig.tiny(),
        )


class LearnedPositions(nn.Module):
    """Learned absolute position table (checkpoint key ``<name>.emb.weight``)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(length, dim)

    def first(self, n: int, device: torch.device) -> Tensor:
        """Positions 0..n-1 -> (n, C)."""
        return self.emb(torch.arange(n, device=device))

    def at(self, positions: Tensor) -> Tensor:
        return self.emb(positions)


@dataclass
class T3Output:
    text_logits: Tensor  # (B, n, text_vocab), zero past each row's text length
    speech_logits: Tensor  # (B, m, speech_vocab), zero past each row's speech length
    text_latents: Tensor  # (B, n, C)
    speech_latents: Tensor  # (B, m, C)
    hidden_states: Tensor  # (B, L_cond + n + m, C), after the final norm


class T3(T3Heads, nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.tfmr = LlamaModel(cfg.llama)
        self.cond_enc = T3CondEnc(cfg.cond_enc)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, dim)
        self.speech_emb = nn.Embedding(cfg.speech_vocab_size, dim)
        self.text_pos_emb = LearnedPositions(cfg.text_pos_emb_len, dim)
        self.speech_pos_emb = LearnedPositions(cfg.speech_pos_emb_len, dim)
        self.text_head = nn.Linear(dim, cfg.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(dim, cfg.speech_vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.speech_head.weight.device

    # ----------------------------------------------------------------- embeddings
    def prompt_speech_embeds(self, prompt_tokens: Tensor) -> Tensor:
        """Speech-prompt tokens (B, P) -> speech_emb + speech positions 0..P-1, (B, P, C)."""
        return self.speech_emb(prompt_tokens) + self.speech_pos_emb.first(prompt_tokens.shape[1], prompt_tokens.device)

    def prepare_conditioning(self, t3_cond: T3Cond) -> Tensor:
        """T3Cond -> conditioning prefix (B, L_cond, C). The caller's T3Cond is left untouched."""
        prompt_emb = t3_cond.cond_prompt_speech_emb
        if prompt_emb is None and t3_cond.cond_prompt_speech_tokens is not None:
            prompt_emb = self.prompt_speech_embeds(t3_cond.cond_prompt_speech_tokens.to(self.device))
        return self.cond_enc(t3_cond.speaker_emb, prompt_emb, t3_cond.emotion_adv)

    def with_prompt_embeds(self, t3_cond: T3Cond) -> T3Cond:
        """A copy of ``t3_cond`` with ``cond_prompt_speech_emb`` filled in (explicit caching)."""
        if t3_cond.cond_prompt_speech_tokens is None or t3_cond.cond_prompt_speech_emb is not None:
            return t3_cond
        return t3_cond.replace(cond_prompt_speech_emb=self.prompt_speech_embeds(t3_cond.cond_prompt_speech_tokens))

    def text_embeds(self, text_tokens: Tensor) -> Tensor:
        """(B, n) -> (B, n, C); for B >= 2 row 1 is the CFG row with its token embeddings zeroed."""
        tok = self.text_emb(text_tokens)
        rows = torch.arange(text_tokens.shape[0], device=text_tokens.device)
        tok = torch.where((rows != UNCOND_ROW)[:, None, None], tok, torch.zeros_like(tok))
        return tok + self.text_pos_emb.first(text_tokens.shape[1], text_tokens.device)

    def speech_embeds(self, speech_tokens: Tensor) -> Tensor:
        """(B, m) at speech positions 0..m-1 -> (B, m, C)."""
        return self.speech_emb(speech_tokens) + self.speech_pos_emb.first(speech_tokens.shape[1], speech_tokens.device)

    def prepare_input_embeds(self, t3_cond: T3Cond, text_tokens: Tensor, speech_tokens: Tensor,
                             cond_emb: Tensor | None = None) -> tuple[Tensor, int]:
        """-> ([cond | text | speech] (B, L, C), L_cond). Conditioning of batch 1 is shared by all rows."""
        if cond_emb is None:
            cond_emb = self.prepare_conditioning(t3_cond)
        text = self.text_embeds(text_tokens)
        speech = self.speech_embeds(speech_tokens)
        b = text.shape[0]
        cond_emb = cond_emb.expand(b, -1, -1) if cond_emb.shape[0] != b else cond_emb
        return torch.cat((cond_emb, text, speech), dim=1), cond_emb.shape[1]

    # ------------------------------------------------------------ teacher forcing
    def forward(self, t3_cond: T3Cond, text_tokens: Tensor, speech_tokens: Tensor,
                text_token_lens: Tensor | None = None, speech_token_lens: Tensor | None = None) -> T3Output:
        """Full causal pass (no cache) and both heads; positions past a row's length get zero latents."""
        embeds, len_cond = self.prepare_input_embeds(t3_cond, text_tokens, speech_tokens)
        hidden = self.tfmr(embeds)  # (B, L, C)
        n, m = text_tokens.shape[1], speech_tokens.shape[1]
        text_latents = _mask_tail(hidden[:, len_cond:len_cond + n], text_token_lens)
        speech_latents = _mask_tail(hidden[:, len_cond + n:len_cond + n + m], speech_token_lens)
        return T3Output(self.text_logits(text_latents), self.speech_logits(speech_latents),
                        text_latents, speech_latents, hidden)

    # ----------------------------------------------------------------- generation
    def init_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """A zeroed static cache; create it in the autograd mode it will be used in (see llama.py)."""
        return KVCache.allocate(self.cfg.llama, batch, max_len, device, dtype)

    def prefill(self, embeds: Tensor, cache: KVCache) -> Tensor:
        """Prefill positions 0..S-1 into ``cache``; -> speech logits of the last position (B, V)."""
        hidden = self.tfmr(embeds, cache)
        return self.speech_logits(hidden[:, -1])

    def decode_step(self, embeds: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """One token (B, 1, C) at backbone ``position`` (1,) -> speech logits (B, V). Fixed shapes."""
        hidden = self.tfmr.decode(embeds, position, cache)
        return self.speech_logits(hidden[:, -1])

    def next_token_embeds(self, token: Tensor, speech_position: Tensor) -> Tensor:
        """Sampled tokens (B, 1) at learned speech positions (B,) -> the CFG pairs' input (2B, 1, C),
        rows 2i and 2i + 1 both request i's."""
        emb = self.speech_emb(token) + self.speech_pos_emb.at(speech_position)[:, None]  # (B, 1, C)
        b, _, c = emb.shape
        return emb[:, None].expand(b, CFG_BATCH, 1, c).reshape(b * CFG_BATCH, 1, c)

    def prompt_embeds(self, t3_cond: T3Cond, text_tokens: Tensor) -> Tensor:
        """The generation prompt (2, P, C): [cond | text | BOS] followed by a second BOS, both BOS at
        learned speech position 0 (upstream's layout). ``text_tokens`` is the checked CFG pair."""
        sos = torch.full((text_tokens.shape[0], 1), self.cfg.start_speech_token, dtype=torch.long,
                         device=text_tokens.device)
        embeds, _ = self.prepare_input_embeds(t3_cond, text_tokens, sos)
        zero = torch.zeros(1, dtype=torch.long, device=text_tokens.device)
        bos = self.next_token_embeds(sos[:1], zero)  # second BOS, also at speech position 0
        return torch.cat((embeds, bos), dim=1)

    def check_text(self, text_tokens: Tensor) -> Tensor:
        """The CFG pair (2, n) as int64 on this model's device; raises unless every row holds the start
        and stop text tokens. One host sync per call (not per token), as upstream's _ensure_BOT_EOT."""
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=self.device)
        if text_tokens.shape[0] != CFG_BATCH:
            raise ValueError(f"text_tokens must be the CFG pair (2, n), got {tuple(text_tokens.shape)}")
        counts = torch.stack(((text_tokens == self.cfg.start_text_token).sum(),
                              (text_tokens == self.cfg.stop_text_token).sum())).tolist()
        if counts[0] < CFG_BATCH or counts[1] < CFG_BATCH:
            raise ValueError("text_tokens must contain the start and stop text tokens in every row")
        return text_tokens

    def check_new_tokens(self, max_new_tokens: int) -> int:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens > self.cfg.speech_pos_emb_len:
            raise ValueError(f"{max_new_tokens} new tokens exceed the speech position table "
                             f"({self.cfg.speech_pos_emb_len})")
        return max_new_tokens

    def generate_tokens(
        self, t3_cond: T3Cond, text_tokens: Tensor, max_new_tokens: int, *,
        temperature: float = 0.8, cfg_weight: float = 0.5, top_p: float = 0.8, min_p: float = 0.0,
        repetition_penalty: float = 2.0, order: tuple[str, ...] = STREAM_ORDER,
        generator: torch.Generator | None = None, forced_tokens: Tensor | None = None,
        block_size: int = DEFAULT_STOP_CHECK_EVERY, recorder: Recorder | None = None,
        cache: KVCache | None = None,
    ) -> Iterator[Tensor]:
        """The reference generation loop (eager, batch 1): new speech tokens in blocks (1, <= block_size),
        ending with the block that holds the stop token (kept) or the last block when ``max_new_tokens``
        is reached. One host sync per block (the stop check); steps sampled after a stop token inside
        a block are discarded. ``forced_tokens`` (1, K) replays tokens instead of sampling (parity
        replays) and caps the steps at K. The engine's runners (``chatterbox.engine``) generate with
        the same math on their own state.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        sampling = SamplingConfig(temperature=temperature, cfg_weight=cfg_weight, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty, order=tuple(order))
        text_tokens = self.check_text(text_tokens)
        steps = self.check_new_tokens(max_new_tokens)
        if forced_tokens is not None:
            forced_tokens = torch.atleast_2d(forced_tokens).to(dtype=torch.long, device=self.device)
            steps = min(steps, forced_tokens.shape[1])

        embeds = self.prompt_embeds(t3_cond, text_tokens)  # (2, P, C)
        prefix = embeds.shape[1]
        need = prefix + steps - 1  # the last sampled token is never fed back
        if cache is None:
            cache = self.init_cache(CFG_BATCH, need, embeds.device, embeds.dtype)
        elif cache.max_len < need or cache.batch != CFG_BATCH:
            raise ValueError(f"cache (batch {cache.batch}, length {cache.max_len}) is smaller than "
                             f"(batch {CFG_BATCH}, length {need})")
        logits = self.prefill(embeds, cache)  # (2, V)
        sos = torch.full((1, 1), self.cfg.start_speech_token, dtype=torch.long, device=embeds.device)
        seen = new_seen(1, self.cfg.speech_vocab_size, sos)  # the initial BOS counts as generated
        position = torch.full((1,), prefix, dtype=torch.long, device=embeds.device)
        speech_position = torch.ones(1, dtype=torch.long, device=embeds.device)
        tokens = self._eager_tokens(logits, seen, position, speech_position, cache, sampling, generator,
                                    steps, forced_tokens, recorder)
        for block in token_blocks(tokens, steps, block_size):
            stops = (block[0] == self.cfg.stop_speech_token).nonzero()  # the per-block host sync
            if stops.numel():
                yield block[:, :int(stops[0, 0]) + 1]
                return
            yield block

    def _eager_tokens(self, logits: Tensor, seen: Tensor, position: Tensor, speech_position: Tensor,
                      cache: KVCache, sampling: SamplingConfig, generator: torch.Generator | None, steps: int,
                      forced_tokens: Tensor | None, recorder: Recorder | None) -> Iterator[Tensor]:
        """Sampled tokens (1, 1), one per step; a token is fed back only when the next one is asked for."""
        for step in range(steps):
            forced = None if forced_tokens is None else forced_tokens[:, step:step + 1]
            token = sample_next(logits, seen, sampling, generator, forced, recorder)  # (1, 1)
            seen = mark_seen(seen, token)
            yield token
            if step == steps - 1:
                return
            logits = self.decode_step(self.next_token_embeds(token, speech_position), position, cache)
            position = position + 1
            speech_position = speech_position + 1

    def inference(
        self, t3_cond: T3Cond, text_tokens: Tensor, max_new_tokens: int, *,
        temperature: float = 0.8, cfg_weight: float = 0.5, top_p: float = 0.8, min_p: float = 0.0,
        repetition_penalty: float = 2.0, order: tuple[str, ...] = STREAM_ORDER,
        generator: torch.Generator | None = None, forced_tokens: Tensor | None = None,
        stop_check_every: int = DEFAULT_STOP_CHECK_EVERY, recorder: Recorder | None = None,
    ) -> Tensor:
        """Generate speech tokens (1, N), including the stop token when one was sampled."""
        blocks = list(self.generate_tokens(
            t3_cond, text_tokens, max_new_tokens, temperature=temperature, cfg_weight=cfg_weight,
            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, order=order,
            generator=generator, forced_tokens=forced_tokens, block_size=stop_check_every, recorder=recorder))
        return torch.cat(blocks, dim=1)


def token_blocks(tokens: Iterator[Tensor], steps: int, block_size: int) -> Iterator[Tensor]:
    """Tokens (1, 1) joined into blocks (1, <= block_size); the last block ends at step ``steps``."""
    block: list[Tensor] = []
    for step, token in enumerate(tokens):
        block.append(token)
        if len(block) == block_size or step == steps - 1:
            yield torch.cat(block, dim=1)
            block = []


def _mask_tail(latents: Tensor, lens: Tensor | None) -> Tensor:
    """Zero positions at or past each row's length (B, n, C); ``None`` keeps everything."""
    if lens is None:
        return latents
    idx = torch.arange(latents.shape[1], device=latents.device)
    keep = idx[None, :] < lens.to(latents.device)[:, None]  # (B, n)
    return torch.where(keep[..., None], latents, torch.zeros_like(latents))
