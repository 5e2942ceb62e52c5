"""Configuration of the S3 speech tokenizer (S3TokenizerV2), shared by the tokenizer and its encoder."""
from __future__ import annotations

from dataclasses import dataclass

from ..constants import S3_SR

S3_HOP = 160  # 100 mel frames per second
S3_TOKEN_RATE = 25
SPEECH_VOCAB_SIZE = 3 ** 8


@dataclass(frozen=True)
class S3TokenizerConfig:
    sample_rate: int = S3_SR
    n_fft: int = 400
    hop_length: int = S3_HOP
    n_mels: int = 128
    mel_fmax: float = 8000.0
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    mlp_ratio: int = 4
    conv_kernel: int = 3
    conv_strides: tuple[int, int] = (2, 2)
    fsmn_kernel: int = 31
    ln_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_max_positions: int = 2048
    mask_bias: float = -1.0e10
    fsq_dim: int = 8
    fsq_levels: int = 3
    fsq_scale: float = 0.9990000128746033  # 0.999 as stored in float32
    token_rate: int = S3_TOKEN_RATE
    window_seconds: int = 30
    window_overlap_seconds: int = 4

    def __post_init__(self) -> None:
        if self.n_state % self.n_head or (self.n_state // self.n_head) % 2:
            raise ValueError("n_state must split into heads of even width (rotary pairs)")
        if self.fsmn_kernel % 2 == 0 or self.conv_kernel % 2 == 0:
            raise ValueError("fsmn_kernel and conv_kernel must be odd (symmetric zero padding)")

    @classmethod
    def published(cls) -> "S3TokenizerConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "S3TokenizerConfig":
        """A narrow, shallow encoder with the published front end, for fast unit tests."""
        return cls(n_state=64, n_head=4, n_layer=2)

    @property
    def mel_frames_per_token(self) -> int:
        return self.conv_strides[0] * self.conv_strides[1]

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels ** self.fsq_dim

    @property
    def window_frames(self) -> int:
        return self.window_seconds * self.sample_rate // self.hop_length

    @property
    def window_stride_frames(self) -> int:
        return self.window_frames - self.window_overlap_seconds * self.sample_rate // self.hop_length

    @property
    def seam_drop_tokens(self) -> int:
        """Ids dropped on each side of a seam: half the overlap (whole seconds, as upstream)."""
        return (self.window_overlap_seconds // 2) * self.token_rate
