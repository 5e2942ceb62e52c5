"""One loaded model, many callers: requests running at once on one engine give each the audio it
gives alone, bit for bit; a closed request leaves nothing behind; the voice and the settings of a
running request cannot be changed under it.

CPU: the tiny pipeline (seconds) and the full-size synthetic checkpoint (``full_size``, small token
budgets). GPU (``gpu``): the same with ``OptConfig.fast()`` (CUDA graphs, Triton kernels, bf16).
"""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from conftest import make_tiny_tts

from chatterbox import OptConfig
from chatterbox.engine import SynthesisRequest
from chatterbox.voice import synthetic_reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TEXTS = ["Hello there.", "A second, somewhat longer request.", "Three.", "How are you today? Fine, thanks."]


def _jobs(n: int, max_new_tokens: int) -> list[dict]:
    jobs = []
    for i in range(n):
        jobs.append(dict(kind="stream" if i % 2 else "generate", text=TEXTS[i % len(TEXTS)], seed=100 + i,
                         max_new_tokens=max_new_tokens + (i % 3), temperature=0.7 + 0.05 * (i % 4),
                         top_p=1.0 if i % 3 else 0.9, exaggeration=0.5 + 0.1 * (i % 2),
                         chunk_size=[3, 5] if i % 4 == 1 else 4))
    return jobs


def _run(tts, job: dict) -> torch.Tensor:
    kw = dict(seed=job["seed"], max_new_tokens=job["max_new_tokens"], temperature=job["temperature"],
              top_p=job["top_p"], exaggeration=job["exaggeration"])
    if job["kind"] == "generate":
        return tts.generate(job["text"], **kw)
    chunks = [c for c, _ in tts.generate_stream(job["text"], chunk_size=job["chunk_size"], print_metrics=False, **kw)]
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(1, 0)


def _concurrent(tts, jobs: list[dict]) -> list[torch.Tensor]:
    out: list = [None] * len(jobs)
    errors: list = []
    start = threading.Barrier(len(jobs))

    def work(i):
        try:
            start.wait()
            out[i] = _run(tts, jobs[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _assert_concurrent_equals_solo(tts, jobs):
    solo = [_run(tts, job) for job in jobs]
    together = _concurrent(tts, jobs)
    for job, a, b in zip(jobs, solo, together):
        assert a.shape == b.shape and torch.equal(a, b), f"{job} differs when run with others"
    assert any(s.shape[1] > 0 for s in solo)


def test_eight_threads_on_one_tiny_model_equal_their_solo_runs(tiny_tts):
    _assert_concurrent_equals_solo(tiny_tts, _jobs(8, 12))


@pytest.mark.full_size
def test_eight_threads_on_the_synthetic_checkpoint_equal_their_solo_runs(synthetic_tts):
    _assert_concurrent_equals_solo(synthetic_tts, _jobs(8, 2))


def test_a_new_voice_does_not_change_a_running_request(tiny_tts):
    tts = make_tiny_tts()
    want = _run(tts, dict(kind="stream", text=TEXTS[1], seed=5, max_new_tokens=16, temperature=0.8, top_p=1.0,
                          exaggeration=0.5, chunk_size=4))
    stream = tts.generate_stream(TEXTS[1], seed=5, max_new_tokens=16, chunk_size=4, print_metrics=False)
    first, _ = next(stream)
    voice = tts.conds
    tts.prepare_conditionals(synthetic_reference(seconds=3.0, seed=9), sample_rate=24000)
    assert tts.conds is not voice
    rest = [c for c, _ in stream]
    assert torch.equal(torch.cat([first] + rest, dim=1), want)


def test_set_opt_while_a_request_runs_finishes_it_on_its_engine():
    tts = make_tiny_tts()
    want = tts.generate_stream(TEXTS[0], seed=2, max_new_tokens=12, chunk_size=4, print_metrics=False)
    want = torch.cat([c for c, _ in want], dim=1)
    stream = tts.generate_stream(TEXTS[0], seed=2, max_new_tokens=12, chunk_size=4, print_metrics=False)
    first, _ = next(stream)
    tts.set_opt(OptConfig.reference().replace(cfm_steps=2))
    assert torch.equal(torch.cat([first] + [c for c, _ in stream], dim=1), want)
    assert tts.opt.cfm_steps == 2


def test_a_closed_request_leaves_nothing_on_the_engine(tiny_tts):
    session = tiny_tts.engine.session(SynthesisRequest(TEXTS[1], seed=1, max_new_tokens=30, chunk_size=3),
                                      tiny_tts.conds)
    ref = weakref.ref(session)
    stream = session.stream()
    next(stream)
    stream.close()
    del stream, session
    gc.collect()
    assert ref() is None


def test_requests_are_validated_at_the_edge():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SynthesisRequest("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        SynthesisRequest("hi", seed=-1)
    with pytest.raises(ValueError, match="seed"):
        SynthesisRequest("hi", seed=10 ** 23)
    with pytest.raises(ValueError, match="chunk_size"):
        SynthesisRequest("hi", chunk_size=[4, 0])
    with pytest.raises(ValueError, match="temperature"):
        SynthesisRequest("hi", temperature=0.0)
    with pytest.raises(TypeError, match="text"):
        SynthesisRequest(None)


def test_conditionals_gen_reads_and_writes_like_upstreams_ref_dict(tiny_tts):
    gen = tiny_tts.conds.gen
    assert set(gen.keys()) == {"prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding"}
    assert gen["embedding"] is gen.embedding and gen["prompt_feat"].shape[-1] == 80
    assert dict(gen)["prompt_token"] is gen.prompt_token and "embedding" in gen
    clone = tiny_tts.conds.clone()
    clone.gen["embedding"] = torch.zeros_like(clone.gen["embedding"])
    assert float(clone.gen.embedding.abs().sum()) == 0.0 and float(gen.embedding.abs().sum()) > 0
    with pytest.raises(KeyError):
        gen["nope"]
    with pytest.raises(KeyError):
        clone.gen["nope"] = 1


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def fast_synthetic():
    from chatterbox import ChatterboxTTS

    return ChatterboxTTS.from_synthetic("cuda", opt=OptConfig.fast())


@pytest.mark.gpu
@gpu
def test_gpu_eight_threads_with_fast_equal_their_solo_runs(fast_synthetic):
    _assert_concurrent_equals_solo(fast_synthetic, _jobs(8, 40))


@pytest.mark.gpu
@gpu
def test_gpu_seeded_streaming_is_bit_reproducible(fast_synthetic):
    for opt in (None, OptConfig.reference()):
        tts = fast_synthetic if opt is None else fast_synthetic.with_opt(opt)
        runs = [torch.cat([c for c, _ in tts.generate_stream(TEXTS[3], seed=11, max_new_tokens=120, chunk_size=10,
                                                             print_metrics=False)], dim=1) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
@gpu
def test_gpu_closing_a_stream_early_returns_memory_to_the_pre_request_level(fast_synthetic):
    tts = fast_synthetic
    tts.generate(TEXTS[0], seed=0, max_new_tokens=20)  # warm: graphs, allocator pools
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    stream = tts.generate_stream(TEXTS[1], seed=3, max_new_tokens=400, chunk_size=10, print_metrics=False)
    next(stream)
    stream.close()
    del stream
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before


@pytest.mark.gpu
@gpu
def test_gpu_tiny_fast_engine_serves_threads_like_solo():
    tts = make_tiny_tts(opt=OptConfig.fast(), device="cuda")
    _assert_concurrent_equals_solo(tts, _jobs(8, 30))
    assert any(k[0] == "t3_decode" for k in tts.engine.graphs.captured())  # the threads ran on captured steps


@pytest.mark.gpu
@gpu
def test_gpu_batched_engine_alone_equals_unbatched_and_serves_eight_threads(fast_synthetic):
    from chatterbox.engine import EngineConfig

    batched = fast_synthetic.with_opt(OptConfig.parse("fast+t3_batching=1+s3gen_scheduling=1"))
    job = _jobs(1, 40)[0]
    # alone, a batched request takes the same bucket-1 graphs: its audio is the unbatched audio
    assert torch.equal(_run(batched, job), _run(fast_synthetic, job))
    batched.engine_cfg = EngineConfig(s3gen_batch=4)
    batched.set_opt(batched.opt)
    jobs = _jobs(8, 40)
    together = _concurrent(batched, jobs)
    solo = [_run(fast_synthetic, j) for j in jobs]
    for a, b in zip(together, solo):
        assert torch.isfinite(a).all() and a.shape == b.shape
    assert batched.engine.t3_batcher.steps > 0 and batched.engine.s3gen_scheduler.batches > 0
