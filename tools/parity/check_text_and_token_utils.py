"""text_and_token_utils.json: punc_norm pairs and drop_invalid_tokens on 1-D input."""
from __future__ import annotations

import torch

from chatterbox.text import drop_invalid_tokens, punc_norm

from .runner import Comparison, Fixture, ParityContext

_TTS_VARIANT = "s3tokenizer.drop_invalid_tokens (used by tts.py)"


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    results = []
    bad = [case["in"] for case in fx.meta["punc_norm"] if punc_norm(case["in"]) != case["out"]]
    results.append(Comparison(f"punc_norm ({len(fx.meta['punc_norm'])} pairs)", float(len(bad)), 0.0, not bad, exact=True))
    compared = wrong = 0
    for case in fx.meta["drop_invalid_tokens"]:
        expected = case[_TTS_VARIANT]
        # Upstream raises on repeated start/stop tokens and mangles 2-D input; we define both cases.
        if case["input_ndim"] != 1 or isinstance(expected, str):
            continue
        compared += 1
        got = drop_invalid_tokens(torch.tensor(case["in"])).tolist()
        wrong += got != expected
    results.append(Comparison(f"drop_invalid_tokens ({compared} 1-D cases)", float(wrong), 0.0, wrong == 0, exact=True))
    return results
