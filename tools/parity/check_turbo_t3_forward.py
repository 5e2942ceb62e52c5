"""Parity of the Turbo T3's input assembly and teacher-forced forward (batch 1, no guidance)."""
from __future__ import annotations

import torch

from .runner import Comparison, Fixture, ParityContext, compare
from .turbo_models import fixture_cond, load_turbo_t3

# FIXTURES.md accept tolerance for T3 float tensors.
RTOL = 1e-4
ATOL = 1e-5


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    t3 = load_turbo_t3(ctx, fx.param("model"))
    stride = int(fx.param("text_logits_column_stride"))
    cond = fixture_cond(fx, ctx.device)
    text = fx["text_tokens"].to(ctx.device)
    speech = fx["speech_tokens"].to(ctx.device)
    with torch.inference_mode():
        embeds, _ = t3.prepare_input_embeds(cond, text, speech)
        out = t3(cond, text, speech)
    return [
        compare("input_embeds", embeds, fx["input_embeds"], RTOL, ATOL),
        compare("hidden_states_last", out.hidden_states, fx["hidden_states_last"], RTOL, ATOL),
        compare("speech_logits", out.speech_logits, fx["speech_logits"], RTOL, ATOL),
        compare("text_logits_strided", out.text_logits[..., ::stride], fx["text_logits_strided"], RTOL, ATOL),
    ]
