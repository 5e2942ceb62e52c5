"""Parity of the T3 sampling loop with the static KV cache, multinomial replaced by forced tokens."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .check_t3_forward import fixture_cond, load_t3
from .runner import Comparison, Fixture, ParityContext, compare

if TYPE_CHECKING:
    from chatterbox.models.t3.t3 import T3

# FIXTURES.md accept tolerances: logits 1e-4 rel / 1e-5 abs; probabilities 1e-4 abs.
RTOL = 1e-4
ATOL = 1e-5
PROBS_ATOL = 1e-4


def check(fx: Fixture, ctx: ParityContext, t3: T3 | None = None) -> list[Comparison]:
    """``t3``: an already loaded published-size model (tests share one); loaded from ``ctx`` if None."""
    from chatterbox.models.t3.sampling import REC_BEFORE_TOP_P, REC_PROBS, REC_RAW_LOGITS, StepRecorder

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    # The fixture's call: T3.inference(cond, text, max_new_tokens, temperature=, cfg_weight=, top_p=,
    # repetition_penalty=), every value as recorded in its meta["params"].
    max_new_tokens = int(fx.param("max_new_tokens"))
    sampling = dict(temperature=float(fx.param("temperature")), cfg_weight=float(fx.param("cfg_weight")),
                    top_p=float(fx.param("top_p")), repetition_penalty=float(fx.param("repetition_penalty")))
    t3 = load_t3(ctx) if t3 is None else t3
    cond = fixture_cond(fx, ctx.device)
    rec = StepRecorder()
    with torch.inference_mode():
        tokens = t3.inference(cond, fx["text_tokens"].to(ctx.device), max_new_tokens, **sampling,
                              forced_tokens=fx["forced_tokens"], recorder=rec)
    n = tokens.shape[1]  # steps recorded past the stop (inside the last stop-check block) are dropped
    results = [
        compare("predicted_tokens", tokens, fx["predicted_tokens"]),
        compare("step_raw_logits", rec.stacked(REC_RAW_LOGITS)[:n], fx["step_raw_logits"], RTOL, ATOL),
        compare("step_logits_before_top_p", rec.stacked(REC_BEFORE_TOP_P)[:n, 0], fx["step_logits_before_top_p"],
                RTOL, ATOL),
        compare("step_probs", rec.stacked(REC_PROBS)[:n, 0], fx["step_probs"], rtol=0.0, atol=PROBS_ATOL),
    ]
    del t3, rec
    return results
