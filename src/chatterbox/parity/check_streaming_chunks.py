"""streaming_chunks.safetensors: upstream's re-synthesis streaming, reproduced by legacy_stream."""
from __future__ import annotations

from .runner import Comparison, Fixture, ParityContext, compare
from .s3gen_loader import load_s3gen


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from ..legacy_stream import legacy_stream_chunks
    from ..models.s3gen.s3gen import S3GenRef
    from ..models.s3gen.source import SourceNoise

    s3gen = load_s3gen(ctx)
    ref = S3GenRef(prompt_token=fx["ref_prompt_token"], prompt_token_len=fx["ref_prompt_token_len"],
                   prompt_feat=fx["ref_prompt_feat"], embedding=fx["ref_embedding"])
    tokens = fx["speech_tokens"]
    chunk_size = int(fx.meta.get("chunk_size", 25))
    context_window = int(fx.meta.get("context_window", 50))
    fade = float(fx.meta.get("fade_duration", 0.02))
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
