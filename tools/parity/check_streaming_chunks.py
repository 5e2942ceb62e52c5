"""streaming_chunks.safetensors: upstream's re-synthesis streaming, reproduced by ``legacy_stream``.

Chunking (``chunk_size``), the re-rendered context (``context_window``) and the fade-in
(``fade_duration``, seconds) are the fixture's call parameters.
"""
from __future__ import annotations

from .runner import Comparison, Fixture, ParityContext, compare
from .s3gen_loader import load_s3gen


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.s3gen.s3gen import S3GenRef
    from chatterbox.models.s3gen.source import SourceNoise

    from .legacy_stream import legacy_stream_chunks

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_s3gen(ctx)
    ref = S3GenRef(prompt_token=fx["ref_prompt_token"], prompt_token_len=fx["ref_prompt_token_len"],
                   prompt_feat=fx["ref_prompt_feat"], embedding=fx["ref_embedding"])
    tokens = fx["speech_tokens"]
    chunk_size = int(fx.param("chunk_size"))
    context_window = int(fx.param("context_window"))
    fade = float(fx.param("fade_duration"))
    if chunk_size <= 0:
        raise ValueError(f"fixture {fx.stem!r}: chunk_size must be positive, got {chunk_size}")
    pieces = [tokens[i:i + chunk_size] for i in range(0, tokens.shape[0], chunk_size)]
    chunks = legacy_stream_chunks(s3gen, ref, pieces, context_window, fade, fx["cfm_noise"],
                                  source_noise=lambda n: SourceNoise.zeros(1, n, device=s3gen.device))
    results = []
    for i, (audio, _) in enumerate(chunks):
        # end-to-end waveforms: the loose absolute tolerance of FIXTURES.md
        results.append(compare(f"chunk_{i}_audio", audio, fx[f"chunk_{i}_audio"], rtol=0.0, atol=3e-3))
    expected = sum(1 for k in fx.tensors if k.startswith("chunk_"))
    if len(results) != expected:
        results.append(Comparison(f"chunk count {len(results)} != {expected}", float("inf"), 0.0, False, exact=True))
    return results
