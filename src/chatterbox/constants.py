"""Constants of the published Chatterbox pipeline that several layers need: one definition each."""
from __future__ import annotations

# Output audio, S3Gen's mel and the HiFT vocoder run at this rate.
S3GEN_SR = 24_000
# The S3 speech tokenizer, the voice encoder and CAMPPlus read audio at this rate.
S3_SR = 16_000
# T3 generation checks for the stop token once per this many sampled tokens (one host read each).
DEFAULT_STOP_CHECK_EVERY = 8
