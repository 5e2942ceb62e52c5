"""The S3Gen scheduler: one worker renders every request's streamed chunks, first chunks first, then by
deadline, several requests' CFM decodes in one call when batching.

CPU, tiny pipeline: with batches of one, streams rendered by the worker while others run equal their
solo streams exactly; with batches of four they stay within float rounding of them (the CFM's GEMMs
and convolutions round by batch size); ``S3GenFlow.decode_batch`` equals one decode per request within
float32 rounding; the queue order puts a first chunk before any later chunk and earlier deadlines first.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import make_tiny_tts

from chatterbox import OptConfig
from chatterbox.engine import EngineConfig
from chatterbox.engine.chunks import ChunkTokens
from chatterbox.engine.s3gen_scheduler import S3GenScheduler

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["Hello there.", "A second, somewhat longer request.", "Three.", "How are you today? Fine, thanks."]


def _stream(tts, i: int) -> torch.Tensor:
    chunks = [c for c, _ in tts.generate_stream(TEXTS[i], seed=20 + i, max_new_tokens=14 + 2 * i, chunk_size=4,
                                                print_metrics=False)]
    return torch.cat(chunks, dim=1)


def _together(tts, n: int) -> list[torch.Tensor]:
    out: list = [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        barrier.wait()
        out[i] = _stream(tts, i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_scheduled_streams_equal_their_solo_runs():
    tts = make_tiny_tts(opt=OptConfig.parse("reference+s3gen_scheduling=1"))
    solo = [_stream(tts, i) for i in range(4)]
    together = _together(tts, 4)
    for a, b in zip(solo, together):
        assert torch.equal(a, b)
    plain = make_tiny_tts()
    assert all(torch.equal(_stream(plain, i), solo[i]) for i in range(2))  # the worker changes nothing
    assert tts.engine.s3gen_scheduler.rendered > 0


def test_batched_cfm_stays_within_float_rounding_of_solo():
    tts = make_tiny_tts(opt=OptConfig.parse("reference+s3gen_scheduling=1"))
    solo = [_stream(tts, i) for i in range(4)]
    batched = make_tiny_tts(opt=OptConfig.parse("reference+s3gen_scheduling=1"))
    batched.engine_cfg = EngineConfig(s3gen_batch=4)
    batched.set_opt(batched.opt)
    together = _together(batched, 4)
    sched = batched.engine.s3gen_scheduler
    assert sched.max_batch == 4 and sched.rendered >= sched.batches
    for a, b in zip(solo, together):
        assert a.shape == b.shape
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        assert err <= 1e-3, err  # the vocoder's sine phase amplifies the mel's rounding (FIXTURES.md)


def test_decode_batch_equals_one_decode_per_request(tiny_tts):
    s3gen, ref = tiny_tts.s3gen, tiny_tts.conds.gen
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 6561, (n,), generator=g) for n in (7, 12, 3)]
    noise = [torch.randn(1, 80, 2 * (ref.prompt_token.shape[1] + n), generator=g) for n in (7, 12, 3)]
    with torch.inference_mode():
        conds = [s3gen.flow_condition(t, ref) for t in tokens]
        batched = s3gen.flow.decode_batch(conds, noise, n_timesteps=2)
        for c, z, b in zip(conds, noise, batched):
            solo = s3gen.flow.decode(c, z, n_timesteps=2)
            assert solo.shape == b.shape
            assert float((solo - b).abs().max()) <= 1e-4 * float(solo.abs().max())


class _Recorder:
    """A stand-in renderer: records the order in which the worker vocodes its chunks."""

    def __init__(self, name: str, log: list, gate: threading.Event | None = None) -> None:
        self.name, self.log, self.gate = name, log, gate

    def plan(self, valid, final):
        if self.gate is not None:
            self.gate.wait()
        return None

    def empty_mel(self):
        return torch.zeros(1, 80, 0)

    def vocode(self, mel, final):
        self.log.append(self.name)
        return torch.zeros(1, 0)


def test_first_chunks_go_first_then_earliest_deadline():
    sched = S3GenScheduler(lambda: torch.no_grad(), n_timesteps=1)
    log: list = []
    gate = threading.Event()
    chunk = ChunkTokens(tokens=None, valid=torch.zeros(0, dtype=torch.long), final=False, t3_s=0.0)
    blocker = threading.Thread(target=sched.render, args=(_Recorder("busy", log, gate), chunk, True, 0.0))
    blocker.start()
    while sched.queued:  # the worker has taken the blocker and waits on its gate
        time.sleep(0.001)
    jobs = [("late", False, 5.0), ("soon", False, 1.0), ("first", True, 9.0), ("sooner", False, 0.5)]
    threads = [threading.Thread(target=sched.render, args=(_Recorder(n, log), chunk, f, d)) for n, f, d in jobs]
    for t in threads:
        t.start()
    while sched.queued < len(jobs):
        time.sleep(0.001)
    gate.set()
    for t in threads + [blocker]:
        t.join()
    assert log == ["busy", "first", "sooner", "soon", "late"]
