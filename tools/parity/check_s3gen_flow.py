"""Parity of the S3Gen flow (encoder, conditioning, estimator, CFM trace, mel) with ``s3gen_flow``.

Upstream call: ``S3Gen.flow_inference(speech_tokens, ref_dict=ref, finalize=True|False)`` with the
CFM noise buffer replaced by the stored ``cfm_noise_*`` slice.
"""
from __future__ import annotations

import torch

from .runner import ComponentMissing, Comparison, Fixture, ParityContext, compare

# The accept column of FIXTURES.md for every flow tensor.
RTOL = 1e-4
ATOL = 1e-5


def _build(ctx: ParityContext):
    try:
        from chatterbox.models.s3gen.flow import FlowConfig, S3GenFlow
    except ImportError as exc:  # the CFM / estimator modules are written separately
        raise ComponentMissing(f"S3Gen flow not importable: {exc}") from exc
    with torch.device("meta"):
        flow = S3GenFlow(FlowConfig.published())
    return ctx.load(flow, "s3gen", prefix="flow.")


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    ctx = ctx.for_fixture(fx)  # the weights this fixture was made with
    flow = _build(ctx)
    dev = ctx.device

    def t(name: str) -> torch.Tensor:
        return fx[name].to(dev)

    ref = dict(prompt_token=t("ref_prompt_token"), prompt_feat=t("ref_prompt_feat"), embedding=t("ref_embedding"))
    out: list[Comparison] = []
    with torch.inference_mode():
        for kind, finalize in (("final", True), ("stream", False)):
            c = flow.prepare(t("speech_tokens"), finalize=finalize, **ref)
            for name, ours in (("encoder_out", c.encoder_out), ("mu", c.mu), ("spks", c.spks),
                               ("cond", c.cond), ("mask", c.mask)):
                out.append(compare(f"{name}_{kind}", ours, fx[f"{name}_{kind}"], rtol=RTOL, atol=ATOL))

            steps_t: list[torch.Tensor] = []
            steps_x: list[torch.Tensor] = []

            def on_step(i: int, x: torch.Tensor, tt: torch.Tensor) -> None:
                steps_x.append(x.reshape(-1, *x.shape[-2:])[0])
                steps_t.append(tt.reshape(-1)[:1])

            mel = flow.decode(c, t(f"cfm_noise_{kind}"), on_step=on_step)
            out.append(compare(f"mel_{kind}", mel, fx[f"mel_{kind}"], rtol=RTOL, atol=ATOL))
            out.append(compare(f"euler_t_{kind}", torch.cat(steps_t), fx[f"euler_t_{kind}"], rtol=RTOL, atol=ATOL))
            if kind == "final":
                out.append(compare("euler_x_in_steps_final", torch.stack(steps_x), fx["euler_x_in_steps_final"],
                                   rtol=RTOL, atol=ATOL))

        est = flow.decoder.estimator
        est_out = est(t("est0_x"), t("est0_mask"), t("est0_mu"), t("est0_t"), t("est0_spks"), t("est0_cond"))
        out.append(compare("est0_out", est_out, fx["est0_out"], rtol=RTOL, atol=ATOL))
    return out
