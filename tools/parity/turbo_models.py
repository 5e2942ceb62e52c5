"""Turbo/Nano models for the parity checkers, built once per set of weights (salt or checkpoint)."""
from __future__ import annotations

import torch

from .runner import ComponentMissing, Comparison, Fixture, ParityContext, compare


def _reference_only(ctx: ParityContext) -> None:
    if not ctx.is_reference:
        raise ComponentMissing("the Turbo/Nano models have no optimisation passes yet (reference only)")


def _cached(ctx: ParityContext, name: str, build):
    key = ctx.cache_key(name)
    if key not in ctx.cache:
        ctx.cache[key] = build()
    return ctx.cache[key]


def load_turbo_t3(ctx: ParityContext, model: str):
    """T3 of ``model`` (``turbo`` or ``nano``) with the context's weights."""
    from chatterbox.checkpoint import find_checkpoint_file, load_strict
    from chatterbox.loader_turbo import load_t3_turbo, t3_config, t3_stem
    from chatterbox.models.t3_turbo.t3_turbo import T3Turbo
    from chatterbox.synthetic import synth_state_dict

    _reference_only(ctx)
    if model not in ("turbo", "nano"):
        raise ValueError(f"fixture model must be 'turbo' or 'nano', got {model!r}")
    nano = model == "nano"

    def build():
        if ctx.ckpt_dir is not None:
            return load_t3_turbo(find_checkpoint_file(ctx.ckpt_dir, t3_stem(nano)), nano, ctx.device)
        with torch.device("meta"):
            t3 = T3Turbo(t3_config(nano))
        load_strict(t3, synth_state_dict(t3.state_dict(), salt=ctx.weights_salt), f"synthetic {model} T3")
        return t3.to(ctx.device).eval()

    return _cached(ctx, f"t3_{model}", build)


def fixture_cond(fx: Fixture, device: str):
    """The fixture's speaker embedding and prompt tokens as a T3Cond on ``device``."""
    from chatterbox.models.t3.cond import T3Cond

    return T3Cond(speaker_emb=fx["speaker_emb"], cond_prompt_speech_tokens=fx["cond_prompt_speech_tokens"]).to(device)


def load_meanflow_s3gen(ctx: ParityContext):
    from chatterbox.loader_turbo import S3GEN_MEANFLOW_STEM
    from chatterbox.models.s3gen.s3gen import S3Gen, S3GenConfig

    _reference_only(ctx)

    def build():
        with torch.device("meta"):
            s3gen = S3Gen(S3GenConfig.published_meanflow())
        return ctx.load(s3gen, S3GEN_MEANFLOW_STEM if ctx.ckpt_dir is not None else "s3gen")

    return _cached(ctx, "s3gen_meanflow", build)


def load_turbo_ve(ctx: ParityContext):
    from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    _reference_only(ctx)

    def build():
        with torch.device("meta"):
            ve = VoiceEncoder(VoiceEncoderConfig.published())
        return ctx.load(ve, "ve")

    return _cached(ctx, "ve", build)


def compare_scores(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                   atol: float) -> list[Comparison]:
    """Processed scores hold ``-inf`` for filtered ids: the filtered set must match exactly, and the
    finite scores within tolerance."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.shape != expected.shape:
        return [compare(name, actual, expected)]
    kept = torch.isfinite(expected)
    results = [compare(f"{name} (filtered ids)", torch.isfinite(actual), kept)]
    both = kept & torch.isfinite(actual)
    results.append(compare(f"{name} (kept scores)", actual[both], expected[both], rtol, atol))
    return results
