"""The bf16 bound of continuous batching: a request's decode step inside a batch against the same step
alone, from the same state (GPU, both model families).

In float32 on the CPU batched == solo exactly (``test_t3_runner.py``, ``test_turbo_runner.py``). On
the GPU the bf16 projections of a step over many rows may take other kernels or tiles than over one
row (the small-M GEMV picks its tile by row count and cuBLAS takes over above 8 rows), so the logits a
request's step leaves differ by rounding. Stated bound: the largest difference is at most
``LOGIT_BOUND`` of the largest logit. The token a step picks is read from the logits the previous
step left and the request's own race draws, so it is the same either way.
"""
from __future__ import annotations

import pytest
import torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LOGIT_BOUND = 3e-2
BATCH = 8


def _requests(tts):
    from chatterbox.engine.slot_runner import T3Request
    from chatterbox.engine.request import SynthesisRequest

    eng = tts.engine
    out = []
    for i in range(BATCH):
        text = "Hello there. " * (1 + i % 3)
        sampling = eng.t3_sampling(SynthesisRequest(text))
        out.append(T3Request(tts.conds.t3, eng.text_tokens(text), sampling, 40,
                             torch.Generator(eng.device).manual_seed(i), 4))
    return out


def _snapshot(runner, adms, gens):
    pool = {name: getattr(runner.pool, name).clone() for name in vars(runner.pool)}
    caches = [(a.cache.k.clone(), a.cache.v.clone()) for a in adms]
    return pool, caches, [g.get_state() for g in gens]


def _restore(runner, adms, gens, snap, rows, positions):
    pool, caches, states = snap
    for name, value in pool.items():
        getattr(runner.pool, name).copy_(value)
    for a, (k, v) in zip(adms, caches):
        a.cache.k.copy_(k)
        a.cache.v.copy_(v)
    for g, s in zip(gens, states):
        g.set_state(s)
    for r, p in zip(rows, positions):
        r.position = p


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["original", "turbo"])
def test_gpu_a_request_step_in_a_batch_stays_within_the_bf16_bound_of_its_solo_step(family):
    from conftest import make_tiny_tts, make_tiny_turbo_tts

    from chatterbox.optim.config import OptConfig

    opt = OptConfig.parse("fast+t3_batching=1")
    tts = make_tiny_tts(opt=opt, device="cuda") if family == "original" else make_tiny_turbo_tts(opt=opt, device="cuda")
    runner = tts.engine.t3_runner
    with torch.inference_mode():
        reqs = _requests(tts)
        adms = [runner.prepare(r) for r in reqs]
        rows = [runner.admit(a, runner.acquire()) for a in adms]
        for _ in range(3):  # a few steps together first: positions and caches differ per request
            runner.step_rows(rows)
        gens = [r.generator for r in rows]
        positions = [r.position for r in rows]
        snap = _snapshot(runner, adms, gens)
        slot = rows[0].slot
        runner.step_rows(rows[:1])
        solo_logits = runner.pool.logits[slot].clone()
        solo_token = runner.pool.history[slot].clone()
        _restore(runner, adms, gens, snap, rows, positions)
        runner.step_rows(rows)
        batch_logits = runner.pool.logits[slot].clone()
        batch_token = runner.pool.history[slot].clone()
        for r in rows:
            runner.release(r.slot)
    assert torch.equal(solo_token, batch_token)
    err = float((batch_logits - solo_logits).abs().max())
    assert err <= LOGIT_BOUND * float(solo_logits.abs().max()), err
