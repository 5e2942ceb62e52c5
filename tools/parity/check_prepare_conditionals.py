"""prepare_conditionals.safetensors: a 7 s reference file -> T3 conditioning + S3Gen reference."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .runner import Comparison, Fixture, ParityContext, compare
from .s3gen_loader import load_s3gen


def compare_conditionals(conds, fx: Fixture) -> list[Comparison]:
    """Every tensor of a ``Conditionals`` against the fixture's (both model families record the same keys)."""
    return [
        compare("t3_speaker_emb", conds.t3.speaker_emb, fx["t3_speaker_emb"], rtol=1e-4, atol=1e-6),
        compare("t3_cond_prompt_speech_tokens", conds.t3.cond_prompt_speech_tokens, fx["t3_cond_prompt_speech_tokens"]),
        compare("t3_emotion_adv", conds.t3.emotion_adv, fx["t3_emotion_adv"]),
        compare("gen_prompt_token", conds.gen.prompt_token, fx["gen_prompt_token"]),
        compare("gen_prompt_token_len", conds.gen.prompt_token_len, fx["gen_prompt_token_len"]),
        compare("gen_prompt_feat", conds.gen.prompt_feat, fx["gen_prompt_feat"]),
        compare("gen_embedding", conds.gen.embedding, fx["gen_embedding"], rtol=1e-4, atol=1e-6),
    ]


def _load_ve(ctx: ParityContext):
    from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    with torch.device("meta"):
        ve = VoiceEncoder(VoiceEncoderConfig.published())
    return ctx.load(ve, "ve")


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    import soundfile as sf

    from chatterbox.voice import prepare_conditionals

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_s3gen(ctx)
    ve = _load_ve(ctx)
    exaggeration = float(fx.param("exaggeration"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.wav"
        # upstream was handed the file path of this float32 24 kHz WAV
        sf.write(str(path), fx["wav24"].numpy(), 24000, subtype="FLOAT")
        conds = prepare_conditionals(s3gen, ve, path, exaggeration=exaggeration)
    return compare_conditionals(conds, fx)
