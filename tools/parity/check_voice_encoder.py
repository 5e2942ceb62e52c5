"""Parity of the voice encoder (``voice_encoder`` fixture): utterance, partial and speaker embeddings."""
from __future__ import annotations

import torch

from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig

from .runner import Comparison, Fixture, ParityContext, compare

# FIXTURES.md accept tolerance for VE embeddings.
EMBED_RTOL = 1e-4
EMBED_ATOL = 1e-6
FIXTURE_SR = 16000


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    with torch.device("meta"):
        ve = VoiceEncoder(VoiceEncoderConfig.published())
    ctx.load(ve, "ve", prefix="")
    wav = fx["wav16"].numpy()
    with torch.inference_mode():
        mels = ve.mels_from_wavs([wav], FIXTURE_SR)
        partials, _ = ve.partial_embeds(mels)
        embeds = ve.embeds_from_wavs([wav], FIXTURE_SR)
        spk = ve.embeds_from_wavs([wav], FIXTURE_SR, as_spk=True)
        no_trim = ve.embeds_from_wavs([wav], FIXTURE_SR, trim_top_db=None)
    tol = dict(rtol=EMBED_RTOL, atol=EMBED_ATOL)
    return [
        compare("embeds", embeds, fx["embeds"], **tol),
        compare("partial_embeds", partials, fx["partial_embeds"], **tol),
        compare("embeds_as_spk", spk, fx["embeds_as_spk"], **tol),
        compare("embeds_no_trim", no_trim, fx["embeds_no_trim"], **tol),
    ]
