"""Chatterbox-Turbo on the engine: the runner against the reference loop, one-shot and streamed
synthesis, Turbo's speech-code cleanup, and concurrent requests equal to solo ones (tiny models, CPU)."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny_turbo_tts

from chatterbox.engine import SynthesisRequest
from chatterbox.engine.t3_runner import T3Request
from chatterbox.models.t3_turbo.sampling import TurboSamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "Hello there [laugh] friend. How are you?"
SETTINGS = [TurboSamplingConfig(), TurboSamplingConfig(temperature=1.0, top_k=50, top_p=0.8, repetition_penalty=1.0),
            TurboSamplingConfig(temperature=0.6, top_k=0, top_p=1.0, repetition_penalty=2.0)]


@pytest.fixture(scope="module")
def turbo():
    return make_tiny_turbo_tts()


def test_runner_equals_the_reference_loop(turbo):
    eng, t3 = turbo.engine, turbo.t3
    text = eng.text_tokens(TEXT)
    for seed, sampling in enumerate(SETTINGS):
        g_ref, g_run = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            want = t3.inference(turbo.conds.t3, text, 30, sampling=sampling, generator=g_ref, stop_check_every=4)
            stream = eng.t3_runner.start(T3Request(turbo.conds.t3, text, sampling, 30, g_run, 4))
            got = torch.cat(list(stream.blocks()), dim=1)
        assert got.tolist() == want.tolist()
        assert torch.equal(g_ref.get_state(), g_run.get_state())


def test_request_settings_reach_turbo_sampling(turbo):
    s = turbo.engine.t3_sampling(SynthesisRequest("x", temperature=0.7, top_k=33, top_p=0.9, repetition_penalty=1.5))
    assert s == TurboSamplingConfig(temperature=0.7, top_k=33, top_p=0.9, repetition_penalty=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SynthesisRequest("x", top_k=-1)


def test_one_shot_codes_end_with_turbo_silence(turbo):
    res = turbo.synthesize(TEXT, seed=3, max_new_tokens=24, watermark=False)
    codes = res.speech_tokens[0]
    assert codes[-3:].tolist() == [4299] * 3 and int(codes.max()) < 6561
    assert res.wav.shape[1] > 0 and torch.isfinite(res.wav).all()


def test_streaming_is_reproducible_and_as_long_as_one_shot(turbo):
    def stream():
        return torch.cat([c for c, _ in turbo.generate_stream(TEXT, seed=5, max_new_tokens=24, chunk_size=5,
                                                              print_metrics=False, watermark=False)], dim=1)

    a, b = stream(), stream()
    assert torch.equal(a, b)
    one_shot = turbo.generate(TEXT, seed=5, max_new_tokens=24, watermark=False)
    assert a.shape == one_shot.shape  # the same codes, silence included, rendered in pieces


def test_four_threads_equal_their_solo_runs(turbo):
    jobs = [dict(seed=10 + i, max_new_tokens=16 + 3 * i, temperature=0.7 + 0.1 * i) for i in range(4)]

    def run(job):
        return torch.cat([c for c, _ in turbo.generate_stream(TEXT, chunk_size=4, print_metrics=False,
                                                              watermark=False, **job)], dim=1)

    solo = [run(j) for j in jobs]
    out: list = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        out[i] = run(jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(solo, out))


def test_short_reference_is_a_clear_error(turbo):
    from chatterbox.voice import synthetic_reference

    with pytest.raises(Exception, match="5"):
        turbo.prepare_conditionals(synthetic_reference(seconds=3.0), sample_rate=24000)


@pytest.mark.full_size
@pytest.mark.parametrize("nano", [False, True])
def test_synthetic_checkpoint_speaks(nano):
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    tts = ChatterboxTurboTTS.from_synthetic("cpu", nano=nano)
    wav = tts.generate("Hi.", seed=0, max_new_tokens=3, watermark=False)
    assert tts.synthetic and wav.shape[1] > 0 and torch.isfinite(wav).all()
