"""Parity of T3 conditioning, input assembly and the teacher-forced forward (CFG batch 2)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .runner import Comparison, Fixture, ParityContext, compare

if TYPE_CHECKING:
    from chatterbox.models.t3.cond import T3Cond
    from chatterbox.models.t3.t3 import T3

# FIXTURES.md accept tolerance for every T3 float tensor of this fixture.
RTOL = 1e-4
ATOL = 1e-5


def load_t3(ctx: ParityContext) -> T3:
    """The published-size T3, built on meta and materialised by ``ctx.load`` (about 2.1 GB in fp32)."""
    from chatterbox.models.t3.t3 import T3, T3Config

    with torch.device("meta"):
        model = T3(T3Config.published())
    return ctx.load(model, "t3_cfg")


def fixture_cond(fx: Fixture, device: str) -> T3Cond:
    from chatterbox.models.t3.cond import T3Cond

    return T3Cond(speaker_emb=fx["speaker_emb"], cond_prompt_speech_tokens=fx["cond_prompt_speech_tokens"],
                  emotion_adv=fx["emotion_adv"]).to(device)


def check(fx: Fixture, ctx: ParityContext, t3: T3 | None = None) -> list[Comparison]:
    """``t3``: an already loaded published-size model (tests share one); loaded from ``ctx`` if None."""
    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    t3 = load_t3(ctx) if t3 is None else t3
    cond = fixture_cond(fx, ctx.device)
    text = fx["text_tokens"].to(ctx.device)
    speech = fx["speech_tokens"].to(ctx.device)
    full = torch.tensor([text.shape[1]] * text.shape[0], device=ctx.device)
    full_speech = torch.tensor([speech.shape[1]] * speech.shape[0], device=ctx.device)
    with torch.inference_mode():
        prompt_emb = t3.prompt_speech_embeds(cond.cond_prompt_speech_tokens)
        cond_emb = t3.prepare_conditioning(cond)
        embeds, _ = t3.prepare_input_embeds(cond, text, speech, cond_emb=cond_emb)
        out = t3(cond, text, speech, text_token_lens=full, speech_token_lens=full_speech)
    results = [
        compare("cond_prompt_speech_emb", prompt_emb, fx["cond_prompt_speech_emb"], RTOL, ATOL),
        compare("cond_emb", cond_emb, fx["cond_emb"], RTOL, ATOL),
        compare("input_embeds", embeds, fx["input_embeds"], RTOL, ATOL),
        compare("hidden_states_last", out.hidden_states, fx["hidden_states_last"], RTOL, ATOL),
        compare("speech_logits", out.speech_logits, fx["speech_logits"], RTOL, ATOL),
        compare("text_logits", out.text_logits, fx["text_logits"], RTOL, ATOL),
    ]
    del t3, out
    return results
