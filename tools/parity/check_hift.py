"""hift.safetensors: the HiFT vocoder, checked stage by stage (see FIXTURES.md, "HiFT sensitivity").

Each stage starts from the *stored* upstream input of that stage, because the sine phase amplifies
tiny F0 differences; only ``wav_end_to_end`` chains them, with a loose absolute tolerance.
"""
from __future__ import annotations

import torch

from chatterbox.models.s3gen.hift import HiFTConfig, HiFTGenerator, fold_weight_norm
from chatterbox.models.s3gen.source import SourceNoise

from .runner import Comparison, Fixture, ParityContext, compare

F0_TOL = dict(rtol=1e-4, atol=1e-3)
SOURCE_TOL = dict(rtol=0.0, atol=2e-4)
DECODE_TOL = dict(rtol=1e-4, atol=1e-5)
END_TO_END_TOL = dict(rtol=0.0, atol=3e-3)


def recorded_noise(fx: Fixture) -> SourceNoise:
    """Upstream's recorded draws; the third one (``rand_002_randn_like``) is never consumed."""
    return SourceNoise(phase_uniform=fx["rand_000_rand"], sine_noise=fx["rand_001_randn_like"])


def build(ctx: ParityContext) -> HiFTGenerator:
    with torch.device("meta"):
        hift = HiFTGenerator(HiFTConfig.published())
    ctx.load(hift, "s3gen", prefix="mel2wav.")
    # As the production loader does.
    return fold_weight_norm(hift)


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    hift = build(ctx)
    dev = ctx.device
    mel = fx["mel"].to(dev)
    noise = recorded_noise(fx)
    noise = SourceNoise(noise.phase_uniform.to(dev), noise.sine_noise.to(dev))
    with torch.inference_mode():
        f0 = hift.f0(mel)
        source = hift.source_from_f0(fx["f0"].to(dev), noise)
        spec = hift.decode_spec(mel, fx["source"].to(dev))
        wav = hift.spec_to_wav(spec)
        wav_e2e, _ = hift(mel, noise)
    return [
        compare("f0", f0, fx["f0"], **F0_TOL),
        compare("source", source, fx["source"], **SOURCE_TOL),
        compare("conv_post_out", spec, fx["conv_post_out"], **DECODE_TOL),
        compare("wav", wav, fx["wav"], **DECODE_TOL),
        compare("wav_end_to_end", wav_e2e, fx["wav"], **END_TO_END_TOL),
    ]
