"""embed_ref.safetensors: S3Gen.embed_ref on a 2.02 s, 24 kHz reference (odd mel length)."""
from __future__ import annotations

from .runner import Comparison, Fixture, ParityContext, compare
from .s3gen_loader import load_s3gen


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.audio import resample_torchaudio

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_s3gen(ctx)
    wav = fx["wav24"]
    ref = s3gen.embed_ref(wav, 24000)
    wav16 = resample_torchaudio(wav.unsqueeze(0), 24000, 16000)
    tokens_full, _ = s3gen.tokenizer(wav16)
    return [
        compare("ref_wav_16", wav16, fx["ref_wav_16"]),
        compare("tokens_before_truncation", tokens_full, fx["tokens_before_truncation"]),
        compare("prompt_feat", ref.prompt_feat, fx["prompt_feat"]),
        compare("prompt_token", ref.prompt_token, fx["prompt_token"]),
        compare("prompt_token_len", ref.prompt_token_len, fx["prompt_token_len"]),
        compare("embedding", ref.embedding, fx["embedding"], rtol=1e-4, atol=1e-6),
    ]
