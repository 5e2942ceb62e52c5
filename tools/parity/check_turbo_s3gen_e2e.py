"""Parity of the meanflow S3Gen end to end (flow noise injected; HiFT source draws zero, as upstream's run)."""
from __future__ import annotations

import torch

from .runner import Comparison, Fixture, ParityContext, compare
from .turbo_models import load_meanflow_s3gen


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.s3gen.s3gen import S3GenRef, meanflow_start_noise
    from chatterbox.models.s3gen.source import SourceNoise

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_meanflow_s3gen(ctx)
    ref = S3GenRef(prompt_token=fx["ref_prompt_token"], prompt_token_len=fx["ref_prompt_token_len"],
                   prompt_feat=fx["ref_prompt_feat"], embedding=fx["ref_embedding"])
    noise = meanflow_start_noise(fx["frame_noise"], fx["speech_noise"])
    zeros = SourceNoise.zeros(1, fx["wav"].shape[-1], num_harmonics=s3gen.cfg.hift.source.num_harmonics)
    with torch.inference_mode():
        mel = s3gen.flow_inference(fx["speech_tokens"], ref, cfm_noise=noise,
                                   n_timesteps=int(fx.param("n_cfm_timesteps")))
        wav, source = s3gen.hift_inference(mel, zeros)
        decoded = s3gen.apply_trim_fade(s3gen.mel2wav.decode(fx["mel"], fx["sources"]))
    # FIXTURES.md: flow 1e-4 rel; HiFT decode of the stored mel/source 1e-4 rel; end to end 3e-3 abs
    return [
        compare("mel", mel, fx["mel"], 1e-4, 1e-5),
        compare("wav_from_stored_mel_and_sources", decoded, fx["wav"], 1e-4, 1e-5),
        compare("sources", source, fx["sources"], 0.0, 2e-4),
        compare("wav", s3gen.apply_trim_fade(wav), fx["wav"], 0.0, 3e-3),
    ]
