"""turbo_prepare_conditionals: a 15.6 s 16-bit reference file -> loudness-normalised Turbo voice."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .check_prepare_conditionals import compare_conditionals
from .runner import Comparison, Fixture, ParityContext, compare
from .turbo_models import load_meanflow_s3gen, load_turbo_ve

# pyloudnorm's value to fp32 noise: the gain enters every derived tensor.
LOUDNESS_ATOL_DB = 1e-4


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    import soundfile as sf

    from chatterbox.audio import load_reference
    from chatterbox.loudness import integrated_loudness
    from chatterbox.voice_turbo import TurboVoiceConfig, prepare_turbo_conditionals

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_meanflow_s3gen(ctx)
    ve = load_turbo_ve(ctx)
    cfg = TurboVoiceConfig(target_lufs=float(fx.param("target_lufs")))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.wav"
        # upstream was handed the file path of this 16-bit 24 kHz WAV
        sf.write(str(path), fx["wav24_pcm16"].numpy().astype(np.int16), cfg.s3gen_sample_rate, subtype="PCM_16")
        loudness = integrated_loudness(load_reference(path, None, cfg.s3gen_sample_rate), cfg.s3gen_sample_rate)
        with torch.inference_mode():
            conds = prepare_turbo_conditionals(s3gen, ve, path, exaggeration=float(fx.param("exaggeration")),
                                               norm_loudness=bool(fx.param("norm_loudness")), cfg=cfg)
    return [
        compare("loudness_lufs", torch.tensor([loudness], dtype=torch.float64), fx["loudness_lufs"], 0.0,
                LOUDNESS_ATOL_DB),
        *compare_conditionals(conds, fx),
    ]
