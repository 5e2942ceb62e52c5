"""Parity of the S3 speech tokenizer against ``s3tokenizer.safetensors``."""
from __future__ import annotations

import torch

from .runner import Comparison, Fixture, ParityContext, compare

HIDDEN_RTOL, HIDDEN_ATOL = 1e-4, 1e-5


def _compare_valid_prefixes(name: str, tokens: torch.Tensor, lens: torch.Tensor,
                            ref_tokens: torch.Tensor, ref_lens: torch.Tensor) -> Comparison:
    """One exact comparison over the valid ``[:len]`` ids of every row (padding tails are free)."""
    if tuple(lens.tolist()) != tuple(ref_lens.tolist()):
        return Comparison(f"{name} (lengths {lens.tolist()} != {ref_lens.tolist()})", float("inf"), 0.0,
                          False, exact=True)
    ours = torch.cat([tokens[b, :n] for b, n in enumerate(ref_lens.tolist())])
    ref = torch.cat([ref_tokens[b, :n] for b, n in enumerate(ref_lens.tolist())])
    return compare(f"{name}[:len]", ours, ref)


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.s3tokenizer import S3Tokenizer, S3TokenizerConfig

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    max_len = int(fx.param("max_len"))  # tokens_maxlen: forward([wav16], max_len=max_len)
    with torch.device("meta"):
        tok = S3Tokenizer(S3TokenizerConfig.published())
    ctx.load(tok, "s3gen", prefix="tokenizer.")

    wav = fx["wav16"].to(ctx.device)
    wav_b = fx["wav16_b"].to(ctx.device)
    results = []
    with torch.inference_mode():
        tokens, lens = tok([wav])
        mel = tok.log_mel(wav[None])
        hidden, _ = tok.encoder(mel, torch.tensor([mel.shape[-1]], device=mel.device))
        projected = tok.quantizer.project(hidden[0])
        tokens_ml, lens_ml = tok([wav], max_len=max_len)
        tokens_b2, lens_b2 = tok([wav, wav_b])

    results.append(compare("tokens", tokens, fx["tokens"]))
    results.append(compare("token_lens", lens, fx["token_lens"]))
    results.append(compare("encoder_hidden", hidden, fx["encoder_hidden"], rtol=HIDDEN_RTOL, atol=HIDDEN_ATOL))
    results.append(compare("fsq_project_down", projected, fx["fsq_project_down"],
                           rtol=HIDDEN_RTOL, atol=HIDDEN_ATOL))
    results.append(compare("tokens_maxlen", tokens_ml, fx["tokens_maxlen"]))
    results.append(compare("token_lens_maxlen", lens_ml, fx["token_lens_maxlen"]))
    results.append(_compare_valid_prefixes("tokens_batch2", tokens_b2.cpu(), lens_b2.cpu(),
                                           fx["tokens_batch2"], fx["token_lens_batch2"]))
    results.append(compare("token_lens_batch2", lens_b2, fx["token_lens_batch2"]))
    return results
