"""Parity of the CAMPPlus speaker encoder: ``speaker_encoder.inference(wav16[None])`` and two intermediates."""
from __future__ import annotations

import torch

from .runner import Comparison, Fixture, ParityContext, compare

# FIXTURES.md accept tolerance for the CAMPPlus x-vector; the intermediates use the same.
RTOL = 1e-4
ATOL = 1e-6


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.s3gen.xvector import CAMPPlus, CAMPPlusConfig, campplus_features

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    with torch.device("meta"):
        model = CAMPPlus(CAMPPlusConfig.published())
    ctx.load(model, "s3gen", prefix="speaker_encoder.")
    wav = fx["wav16"].to(ctx.device)
    with torch.inference_mode():
        out = model.forward_with_intermediates(campplus_features(wav.unsqueeze(0)))
    return [
        compare("xvector", out.xvector, fx["xvector"], rtol=RTOL, atol=ATOL),
        compare("head_out", out.head_out, fx["head_out"], rtol=RTOL, atol=ATOL),
        compare("stats_pool", out.stats_pool, fx["stats_pool"], rtol=RTOL, atol=ATOL),
    ]
