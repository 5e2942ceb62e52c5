"""Parity of the Turbo T3 sampling loop (static KV cache), the draws replaced by upstream's forced tokens.

Two calls per fixture: ``stop`` (the prefill's token is a stop, which upstream never checks; repeated
tokens exercise the penalty; a later stop ends the loop) and ``cap`` (``max_gen_len`` reached).
"""
from __future__ import annotations

import torch

from .runner import Comparison, Fixture, ParityContext, compare
from .turbo_models import compare_scores, fixture_cond, load_turbo_t3

# FIXTURES.md accept tolerances: logits 1e-4 rel / 1e-5 abs; probabilities 1e-4 abs.
RTOL = 1e-4
ATOL = 1e-5
PROBS_ATOL = 1e-4
CALLS = ("stop", "cap")


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.t3.sampling import REC_PROBS, REC_RAW_LOGITS, StepRecorder
    from chatterbox.models.t3_turbo.sampling import REC_PROCESSED, TurboSamplingConfig, clean_speech_tokens

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    t3 = load_turbo_t3(ctx, fx.param("model"))
    sampling = TurboSamplingConfig(temperature=float(fx.param("temperature")), top_k=int(fx.param("top_k")),
                                   top_p=float(fx.param("top_p")),
                                   repetition_penalty=float(fx.param("repetition_penalty")))
    cond = fixture_cond(fx, ctx.device)
    results = []
    for call in CALLS:
        # upstream's max_gen_len counts the tokens after the prefill's one
        max_new_tokens = int(fx.param(f"{call}_max_gen_len")) + 1
        rec = StepRecorder()
        with torch.inference_mode():
            tokens = t3.inference(cond, fx["text_tokens"], max_new_tokens, sampling=sampling,
                                  forced_tokens=fx[f"{call}_forced_tokens"], recorder=rec)
        n = tokens.shape[1]  # steps recorded past the stop (inside the last stop-check block) are dropped
        # upstream returns the tokens without a final stop
        stripped = tokens[:, :-1] if int(tokens[0, -1]) == t3.cfg.stop_speech_token else tokens
        results += [
            compare(f"{call}_predicted_tokens", stripped, fx[f"{call}_predicted_tokens"]),
            compare(f"{call}_s3gen_tokens", clean_speech_tokens(tokens), fx[f"{call}_s3gen_tokens"]),
            compare(f"{call}_step_raw_logits", rec.stacked(REC_RAW_LOGITS)[:n, 0], fx[f"{call}_step_raw_logits"],
                    RTOL, ATOL),
            compare(f"{call}_step_probs", rec.stacked(REC_PROBS)[:n, 0], fx[f"{call}_step_probs"], 0.0, PROBS_ATOL),
        ]
        if f"{call}_step_processed" in fx.tensors:
            results += compare_scores(f"{call}_step_processed", rec.stacked(REC_PROCESSED)[:n, 0],
                                      fx[f"{call}_step_processed"], RTOL, ATOL)
    return results
