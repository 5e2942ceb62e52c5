"""s3gen_e2e.safetensors: the whole S3Gen.inference (flow + HiFT + trim fade) with recorded noise."""
from __future__ import annotations

from .runner import Comparison, Fixture, ParityContext, compare
from .s3gen_loader import load_s3gen


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.s3gen.s3gen import S3GenRef
    from chatterbox.models.s3gen.source import SourceNoise

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_s3gen(ctx)
    ref = S3GenRef(prompt_token=fx["ref_prompt_token"], prompt_token_len=fx["ref_prompt_token_len"],
                   prompt_feat=fx["ref_prompt_feat"], embedding=fx["ref_embedding"])
    mel = s3gen.flow_inference(fx["speech_tokens"], ref, cfm_noise=fx["cfm_noise"])
    noise = SourceNoise(phase_uniform=fx["rand_000_rand"], sine_noise=fx["rand_001_randn_like"])
    wav, source = s3gen.hift_inference(mel, noise)
    decoded = s3gen.mel2wav.decode(fx["mel"], fx["sources"])
    return [
        compare("mel", mel, fx["mel"]),
        compare("trim_fade", s3gen.trim_fade, fx["trim_fade"]),
        compare("wav_before_trim_fade", decoded, fx["wav_before_trim_fade"]),
        compare("sources", source, fx["sources"], rtol=0.0, atol=2e-4),
        compare("wav", s3gen.apply_trim_fade(wav), fx["wav"], rtol=0.0, atol=3e-3),
    ]
