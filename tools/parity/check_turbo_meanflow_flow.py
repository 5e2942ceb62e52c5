"""Parity of the meanflow flow (token -> mel in 2 Euler steps) with upstream's two noise draws injected.

Checked at three depths: the estimator on upstream's first-call inputs (interval end r included),
the conditioning and the x entering each step, and the mel of a final call. (Upstream 0.1.7 cannot
run a non-final meanflow call, so there is none to compare.)
"""
from __future__ import annotations

import torch

from .runner import Comparison, Fixture, ParityContext, compare
from .turbo_models import load_meanflow_s3gen

# FIXTURES.md accept tolerance for flow tensors.
RTOL = 1e-4
ATOL = 1e-5


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.models.s3gen.s3gen import meanflow_start_noise

    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    s3gen = load_meanflow_s3gen(ctx)
    n_steps = int(fx.param("n_cfm_timesteps"))
    est = s3gen.flow.decoder.estimator
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    noise = meanflow_start_noise(fx["frame_noise"], fx["speech_noise"])
    with torch.inference_mode():
        out = est(fx["est_x_in_steps"][:1], fx["est0_mask"], fx["est0_mu"], fx["est_t"][:1], fx["est0_spks"],
                  fx["est0_cond"], r=fx["est_r"][:1])
        c = s3gen.flow.prepare(fx["speech_tokens"], fx["ref_prompt_token"], fx["ref_prompt_feat"],
                               fx["ref_embedding"], finalize=True)
        mel = s3gen.flow.decode(c, noise, n_timesteps=n_steps,
                                on_step=lambda k, x, t: steps.append((x.clone(), t.reshape(1).clone())))
    return [
        compare("est0_out", out, fx["est0_out"], RTOL, ATOL),
        compare("est0_mu", c.mu, fx["est0_mu"], RTOL, ATOL),
        compare("est0_spks", c.spks, fx["est0_spks"], RTOL, ATOL),
        compare("est0_cond", c.cond, fx["est0_cond"], RTOL, ATOL),
        compare("est_t", torch.cat([t for _, t in steps]), fx["est_t"]),
        compare("est_x_in_steps", torch.cat([x for x, _ in steps]), fx["est_x_in_steps"], RTOL, ATOL),
        compare("mel", mel, fx["mel"], RTOL, ATOL),
    ]
