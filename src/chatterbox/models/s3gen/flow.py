"""S3Gen flow: speech tokens + reference prompt -> mel (CosyVoice2 ``CausalMaskedDiffWithXvec``).

The prompt tokens are prepended to the speech tokens, embedded, run through the upsampling Conformer
encoder (2 mel frames per token) and projected to 80 mel channels (``mu``). The CFM then denoises
from caller-given noise, conditioned on ``mu``, the projected x-vector and the prompt mel, and the
prompt's frames are cut off the result.

Published quirk kept on purpose: the number of prompt frames cut is ``prompt_feat``'s length F, not
2*P. ``embed_ref`` may give F = 2P + 1, and then the output has 2N - 1 frames.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cfm import CausalCFM, CFMConfig
from .encoder import UpsampleConformerEncoder, UpsampleConformerEncoderConfig


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = 6561
    spk_embed_dim: int = 192
    n_mels: int = 80
    encoder: UpsampleConformerEncoderConfig = field(default_factory=UpsampleConformerEncoderConfig.published)
    cfm: CFMConfig = field(default_factory=CFMConfig.published)

    def __post_init__(self) -> None:
        est = self.cfm.estimator
        if est.n_feats != self.n_mels or est.spk_dim != self.n_mels:
            raise ValueError(f"CFM estimator works on {est.n_feats} mel bins / {est.spk_dim}-d speaker vectors, "
                             f"the flow on {self.n_mels}")

    @classmethod
    def published(cls) -> "FlowConfig":
        return cls()

    @classmethod
    def tiny(cls, n_mels: int | None = None) -> "FlowConfig":
        """Small encoder and estimator for fast unit tests (not a published model)."""
        cfm = CFMConfig.small()
        if n_mels is not None:
            cfm = CFMConfig(estimator=dataclasses.replace(cfm.estimator, n_feats=n_mels, spk_dim=n_mels))
        return cls(spk_embed_dim=16, n_mels=cfm.estimator.n_feats, encoder=UpsampleConformerEncoderConfig.tiny(),
                   cfm=cfm)

    @property
    def token_mel_ratio(self) -> int:
        return self.encoder.upsample_stride

    @property
    def lookahead_frames(self) -> int:
        """Mel frames at the end that depend on (missing) future tokens; dropped when not final."""
        return self.encoder.pre_lookahead_len * self.encoder.upsample_stride


@dataclass(frozen=True)
class FlowConditioning:
    """Everything the CFM is conditioned on, plus the encoder output it came from."""

    encoder_out: torch.Tensor  # (1, ratio*(P+N), d), before the finalize trim and the projection
    mu: torch.Tensor  # (1, mel, T)
    spks: torch.Tensor  # (1, mel)
    cond: torch.Tensor  # (1, mel, T): prompt mel in the first F frames, zeros after
    mask: torch.Tensor  # (1, 1, T)
    prompt_frames: int  # F, the frames cut from the CFM output

    @property
    def total_frames(self) -> int:
        return self.mu.shape[2]

    @property
    def new_frames(self) -> int:
        return self.total_frames - self.prompt_frames


def check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str) -> None:
    """Raise ValueError unless ``tokens`` is an integer (1, N) tensor with ids in [0, vocab_size).

    The range check reads the tensor on the host once per call (not per step).
    """
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"{what} must have shape (1, N), got {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        return
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        first = tokens[bad][0].item()
        raise ValueError(
            f"{what} holds ids outside [0, {vocab_size}) (e.g. {first}); drop the T3 special tokens "
            f"(start/stop of speech) before the flow")


class S3GenFlow(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.encoder.input_dim)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.n_mels)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.d_model, cfg.n_mels)
        self.decoder = CausalCFM(cfg.cfm)

    def total_frames(self, n_prompt_tokens: int, n_speech_tokens: int, finalize: bool = True) -> int:
        """Frames the CFM runs on (prompt included): the length ``noise`` must at least have."""
        frames = self.cfg.token_mel_ratio * (n_prompt_tokens + n_speech_tokens)
        return frames if finalize else max(frames - self.cfg.lookahead_frames, 0)

    def encode(self, tokens: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """tokens (1, M) (prompt already prepended) -> encoder output (1, ratio*M, d)."""
        if validate:
            check_token_ids(tokens, self.cfg.vocab_size, "flow tokens")
        return self.encoder(self.input_embedding(tokens))

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """x-vector (1, spk_embed_dim) -> spks (1, mel)."""
        if embedding.dim() != 2 or embedding.shape[0] != 1 or embedding.shape[1] != self.cfg.spk_embed_dim:
            raise ValueError(f"speaker embedding must be (1, {self.cfg.spk_embed_dim}), "
                             f"got {tuple(embedding.shape)}")
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def prepare(self, speech_tokens: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                embedding: torch.Tensor, finalize: bool = True, validate: bool = True) -> FlowConditioning:
        """Build the CFM conditioning.

        speech_tokens (1, N), prompt_token (1, P), prompt_feat (1, F, mel), embedding (1, spk_embed_dim).
        ``finalize=False`` drops the last ``lookahead_frames`` frames, whose tokens lack right context.
        """
        if validate:
            check_token_ids(speech_tokens, self.cfg.vocab_size, "speech_tokens")
            check_token_ids(prompt_token, self.cfg.vocab_size, "prompt_token")
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != self.cfg.n_mels:
            raise ValueError(f"prompt_feat must be (1, F, {self.cfg.n_mels}), got {tuple(prompt_feat.shape)}")
        if speech_tokens.shape[1] < 1:
            raise ValueError("speech_tokens is empty")

        spks = self.speaker(embedding)  # (1, mel)
        tokens = torch.cat([prompt_token, speech_tokens], dim=1)  # (1, P+N)
        h = self.encode(tokens, validate=False)  # (1, ratio*(P+N), d)
        h_used = h if finalize else h[:, : h.shape[1] - self.cfg.lookahead_frames]
        total = h_used.shape[1]
        n_prompt = prompt_feat.shape[1]
        if n_prompt > total:
            raise ValueError(
                f"prompt_feat has {n_prompt} frames but the encoder gives only {total} "
                f"({'final' if finalize else 'non-final'} call with {tokens.shape[1]} tokens); "
                f"prompt_feat should have about {self.cfg.token_mel_ratio}x the prompt tokens")
        mu = self.encoder_proj(h_used).transpose(1, 2).contiguous()  # (1, mel, T)
        cond = F.pad(prompt_feat.transpose(1, 2).to(mu.dtype), (0, total - n_prompt))  # (1, mel, T)
        mask = torch.ones(1, 1, total, dtype=mu.dtype, device=mu.device)
        return FlowConditioning(encoder_out=h, mu=mu, spks=spks, cond=cond, mask=mask, prompt_frames=n_prompt)

    def decode(self, c: FlowConditioning, noise: torch.Tensor, n_timesteps: int | None = None,
               on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run the CFM from ``noise`` (1, mel, >=T; its first T frames are used) -> mel (1, mel, T-F)."""
        total = c.total_frames
        if noise.dim() != 3 or noise.shape[1] != self.cfg.n_mels or noise.shape[2] < total:
            raise ValueError(f"noise must be (1, {self.cfg.n_mels}, >= {total}), got {tuple(noise.shape)}")
        if c.new_frames == 0:
            return c.mu.new_zeros(1, self.cfg.n_mels, 0)
        z = noise[:, :, :total].to(device=c.mu.device, dtype=c.mu.dtype)
        feat = self.decoder(c.mu, c.mask, c.spks, c.cond, z, n_timesteps=n_timesteps, on_step=on_step)
        return feat[:, :, c.prompt_frames:]

    def decode_batch(self, conds: list[FlowConditioning], noises: list[torch.Tensor],
                     n_timesteps: int | None = None) -> list[torch.Tensor]:
        """``decode`` of several requests in one CFM call: their frames padded to the longest with mask 0
        (the estimator keeps valid frames blind to padding), each result cut back to its own frames.
        The numbers equal one call per request up to the GEMMs' and convolutions' batch-dependent
        rounding."""
        totals = [c.total_frames for c in conds]
        longest = max(totals)
        for c, noise in zip(conds, noises):
            if noise.dim() != 3 or noise.shape[1] != self.cfg.n_mels or noise.shape[2] < c.total_frames:
                raise ValueError(f"noise must be (1, {self.cfg.n_mels}, >= {c.total_frames}), got {tuple(noise.shape)}")

        def padded(t: torch.Tensor, frames: int) -> torch.Tensor:
            return F.pad(t, (0, longest - frames))

        mu = torch.cat([padded(c.mu, t) for c, t in zip(conds, totals)])
        cond = torch.cat([padded(c.cond, t) for c, t in zip(conds, totals)])
        mask = torch.cat([padded(c.mask, t) for c, t in zip(conds, totals)])
        z = torch.cat([padded(n[:, :, :t].to(device=mu.device, dtype=mu.dtype), t) for n, t in zip(noises, totals)])
        feat = self.decoder(mu, mask, torch.cat([c.spks for c in conds]), cond, z, n_timesteps=n_timesteps)
        return [feat[i:i + 1, :, c.prompt_frames:t] for i, (c, t) in enumerate(zip(conds, totals))]

    def forward(self, speech_tokens: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                embedding: torch.Tensor, noise: torch.Tensor, finalize: bool = True,
                n_timesteps: int | None = None,
                on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                validate: bool = True) -> torch.Tensor:
        """Speech tokens (1, N) + reference prompt -> mel (1, mel, T_total - F).

        T_total = ratio*(P+N), minus ``lookahead_frames`` when ``finalize`` is False. ``noise`` is the
        CFM start noise (upstream: a fixed randn buffer, temperature 1), at least T_total frames.
        """
        total = self.total_frames(prompt_token.shape[-1], speech_tokens.shape[-1], finalize)
        if noise.dim() != 3 or noise.shape[1] != self.cfg.n_mels or noise.shape[2] < total:
            raise ValueError(f"noise must be (1, {self.cfg.n_mels}, >= {total}), got {tuple(noise.shape)}")
        c = self.prepare(speech_tokens, prompt_token, prompt_feat, embedding, finalize=finalize, validate=validate)
        return self.decode(c, noise, n_timesteps=n_timesteps, on_step=on_step)
