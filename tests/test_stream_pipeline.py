"""The streaming chunk pipeline: T3 chunking, the in-order overlap scheduler, and generate_stream with
``overlap_s3gen`` (on the CPU, and through a runner whose chunks finish late, standing in for a side
CUDA stream)."""
import contextlib

import pytest
import torch

import chatterbox.tts as tts_module
from chatterbox.opt import OptConfig
from chatterbox.stream_pipeline import SideStreamRunner, SyncRunner, make_runner, render_in_order, t3_chunks
from chatterbox.text import SpeechTokenSpace, TextSplitConfig
from chatterbox.timing import StageTimer

STOP = SpeechTokenSpace().stop


# ---------------------------------------------------------------- the scheduler, with fake jobs
class FakeJob:
    """A submitted chunk whose work finishes after ``ready_after`` non-blocking queries."""

    def __init__(self, name, log, ready_after):
        self.name, self.log, self.ready_after, self.queries = name, log, ready_after, 0

    def poll(self):
        self.queries += 1
        self.log.append(("query", self.name))
        return self.queries > self.ready_after

    def wait(self):
        self.log.append(("wait", self.name))


def _schedule(script, log, delays):
    """Run ``render_in_order`` over ``script`` (chunk names, None = a T3 block) and log everything."""

    def items():
        for item in script:
            log.append(("t3", item))
            yield item

    def submit(name):
        log.append(("submit", name))
        return FakeJob(name, log, delays[name])

    for job in render_in_order(items(), submit):
        log.append(("yield", job.name))


def _order(log, *events):
    return [log.index(e) for e in events]


def test_finished_chunks_are_yielded_at_once_before_t3_goes_on():
    log = []
    _schedule(["a", None, None, "b", None, "c"], log, {"a": 0, "b": 0, "c": 0})
    # a job that is done when first queried (the sequential path) is yielded right after its submission
    assert log == [("t3", "a"), ("submit", "a"), ("query", "a"), ("yield", "a"), ("t3", None), ("t3", None),
                   ("t3", "b"), ("submit", "b"), ("query", "b"), ("yield", "b"), ("t3", None),
                   ("t3", "c"), ("submit", "c"), ("query", "c"), ("yield", "c")]


def test_a_chunk_is_yielded_at_the_first_poll_point_where_it_is_done():
    log = []
    _schedule(["a", None, None, None, "b"], log, {"a": 2, "b": 0})
    # queried after its submission and after each T3 block; done at the third query
    assert [e for e in log if e[1] == "a"] == [("t3", "a"), ("submit", "a"), ("query", "a"), ("query", "a"),
                                               ("query", "a"), ("yield", "a")]
    yield_a = log.index(("yield", "a"))
    blocks = [i for i, e in enumerate(log) if e == ("t3", None)]
    assert blocks[1] < yield_a < blocks[2]  # no waiting: T3 had already gone on for two blocks
    assert ("wait", "a") not in log
    assert log.index(("yield", "a")) < log.index(("t3", "b"))


def test_a_chunk_not_done_when_the_next_is_ready_is_waited_for_and_yielded_first():
    log = []
    _schedule(["a", None, "b", None, "c"], log, {"a": 100, "b": 100, "c": 100})
    wait_a, yield_a, submit_b = _order(log, ("wait", "a"), ("yield", "a"), ("submit", "b"))
    assert log.index(("t3", "b")) < wait_a < yield_a < submit_b  # at most one chunk in flight
    wait_b, yield_b, submit_c = _order(log, ("wait", "b"), ("yield", "b"), ("submit", "c"))
    assert wait_b < yield_b < submit_c
    assert log[-2:] == [("wait", "c"), ("yield", "c")]  # the last one is waited for at the end
    assert [e[1] for e in log if e[0] == "yield"] == ["a", "b", "c"]


def test_chunks_come_out_in_submission_order_for_any_finishing_times():
    script = ["a", None, "b", None, None, "c", "d", None, None, None, "e"]
    for delays in ({"a": 0, "b": 3, "c": 1, "d": 0, "e": 5}, {"a": 4, "b": 0, "c": 9, "d": 2, "e": 0}):
        log = []
        _schedule(script, log, delays)
        assert [e[1] for e in log if e[0] == "yield"] == ["a", "b", "c", "d", "e"]
        for earlier, later in zip("abcd", "bcde"):
            assert log.index(("yield", earlier)) < log.index(("submit", later))


def test_closing_the_scheduler_stops_pulling_t3_and_submitting():
    log = []
    script = ["a", None, "b", None, "c"]

    def items():
        for item in script:
            log.append(("t3", item))
            yield item

    stream = render_in_order(items(), lambda name: FakeJob(name, log, 0))
    assert next(stream).name == "a"
    stream.close()
    assert log == [("t3", "a"), ("query", "a")]


# ---------------------------------------------------------------- T3 chunking
def _blocks(tokens, size, log):
    for start in range(0, len(tokens), size):
        # T3 runs in the pipeline's autograd mode; the consumer in its own
        log.append(torch.is_inference_mode_enabled())
        yield torch.tensor([tokens[start:start + size]])


def _chunks(tokens, block, sizes, mode="inference_mode"):
    from chatterbox.streaming import chunk_schedule

    seen_modes = []
    out = []
    for item in t3_chunks(_blocks(tokens, block, seen_modes), chunk_schedule(sizes), STOP, torch.device("cpu"), mode):
        assert not torch.is_inference_mode_enabled()  # every yield is outside the autograd context
        out.append(item)
    return out, seen_modes


def test_t3_chunks_cut_blocks_by_the_schedule_and_end_on_the_stop_token():
    tokens = list(range(1, 19)) + [STOP]  # blocks of 4: 4 4 4 4 3
    out, modes = _chunks(tokens, 4, [6, 10])
    kinds = ["poll" if c is None else c.n_tokens for c in out]
    assert kinds == ["poll", "poll", 6, "poll", "poll", 10, "poll", 3]
    chunks = [c for c in out if c is not None]
    assert [c.tokens[0].tolist() for c in chunks] == [tokens[:6], tokens[6:16], tokens[16:]]
    assert [c.final for c in chunks] == [False, False, True]
    assert chunks[-1].valid.tolist() == [17, 18]  # the stop token is not rendered
    assert all(c.t3_s >= 0 for c in chunks)
    assert modes and all(modes)


def test_t3_chunks_flush_with_an_empty_final_chunk_when_t3_ends_on_a_boundary():
    out, _ = _chunks(list(range(1, 9)), 4, 4, mode="none")  # max_new_tokens reached, no stop token
    chunks = [c for c in out if c is not None]
    assert [c.n_tokens for c in chunks] == [4, 4, 0]
    assert [c.final for c in chunks] == [False, False, True]
    assert chunks[-1].tokens is None and chunks[-1].valid.numel() == 0


def test_make_runner_overlaps_only_on_cuda():
    opt = OptConfig.reference().replace(overlap_s3gen=True)
    assert isinstance(make_runner(torch.device("cpu"), opt), SyncRunner)
    assert isinstance(make_runner(torch.device("cpu"), OptConfig.reference()), SyncRunner)


# ---------------------------------------------------------------- generate_stream
TEXT = "Hello there. How are you today?"


def _stream(tts, **kwargs):
    chunks, timings = [], None
    for chunk, metrics in tts.generate_stream(TEXT, print_metrics=False, watermark=False, **kwargs):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        chunks.append(chunk)
        timings = metrics.chunks
    return chunks, timings


@pytest.fixture
def two_segment_tts(synthetic_tts):
    """The shared pipeline with short text segments (several segments per call); restored afterwards."""
    saved_opt, saved_split = synthetic_tts.opt, synthetic_tts.split_cfg
    synthetic_tts.split_cfg = TextSplitConfig(max_text_tokens=8)
    assert len(synthetic_tts.text_segments(TEXT)) > 1
    yield synthetic_tts
    synthetic_tts.split_cfg = saved_split
    synthetic_tts.set_opt(saved_opt)


ARGS = dict(max_new_tokens=16, chunk_size=[6, 8], seed=3)


def test_overlap_switch_on_the_cpu_gives_the_same_chunks_exactly(two_segment_tts):
    tts = two_segment_tts
    tts.set_opt(tts.opt.replace(overlap_s3gen=False))
    off, _ = _stream(tts, **ARGS)
    tts.set_opt(tts.opt.replace(overlap_s3gen=True))
    on, timings = _stream(tts, **ARGS)
    assert len(on) == len(off) > 1
    assert all(torch.equal(a, b) for a, b in zip(on, off))  # tolerance: none (same code on the CPU)
    assert len(timings) == len(on) and all(t.flow_s > 0 and t.vocoder_s > 0 for t in timings)


class LateEvent:
    """``torch.cuda.Event`` stand-in: done after ``polls`` queries, or once synchronised."""

    def __init__(self, polls, log):
        self.polls, self.log = polls, log

    def query(self):
        self.polls -= 1
        return self.polls < 0

    def synchronize(self):
        self.log.append("sync")
        self.polls = -1


class FakeSideStream:
    """``CudaSideStream`` on the CPU: work runs at once, but every mark reports done only after
    ``polls`` queries, so generate_stream takes the overlap path's polls and waits."""

    def __init__(self, polls, log):
        self.polls, self.log = polls, log

    def follow_current(self):
        self.log.append("follow")

    def used_here(self, tensor):
        pass

    def active(self):
        return contextlib.nullcontext()

    def mark(self):
        self.log.append("mark")
        return LateEvent(self.polls, self.log)

    def timer(self):
        return StageTimer("cpu")

    def to_host(self, wav):
        return wav.to("cpu")

    def synchronize(self):
        self.log.append("close")


def _fake_overlap(monkeypatch, polls, log):
    monkeypatch.setattr(tts_module, "make_runner", lambda device, opt: SideStreamRunner(
        device, opt.autograd_mode, FakeSideStream(polls, log)))


@pytest.mark.parametrize("polls", [1, 100])
def test_chunks_finishing_late_are_yielded_unchanged_and_in_order(two_segment_tts, monkeypatch, polls):
    tts = two_segment_tts
    tts.set_opt(tts.opt.replace(overlap_s3gen=False))
    expected, _ = _stream(tts, **ARGS)
    log = []
    _fake_overlap(monkeypatch, polls, log)
    got, timings = _stream(tts, **ARGS)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))  # exact
    assert [t.index for t in timings] == list(range(len(got)))
    assert all(t.flow_s > 0 and t.vocoder_s > 0 for t in timings)
    assert all(a.emitted_at_s <= b.emitted_at_s for a, b in zip(timings, timings[1:]))
    assert log[-1] == "close"
    # per chunk: a mark after its flow, one after its vocoder; each vocoder mark is synchronised
    # (right away when the flow was seen done at a poll point, or when the chunk is waited for)
    assert log.count("mark") % 2 == 0 and log.count("sync") == log.count("mark") // 2


def test_closing_an_overlapped_stream_early_closes_the_runner_and_leaves_the_mode(two_segment_tts, monkeypatch):
    log = []
    _fake_overlap(monkeypatch, 100, log)
    with torch.no_grad():
        stream = two_segment_tts.generate_stream(TEXT, print_metrics=False, watermark=False, **ARGS)
        first, _ = next(stream)
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        stream.close()
    assert log[-1] == "close"
    assert first.shape[1] > 0 and not first.is_inference()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
