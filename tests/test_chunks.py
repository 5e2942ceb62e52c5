"""Streaming chunks: ``engine.chunks.t3_chunks`` cutting T3's stop-checked blocks into chunks of the
schedule's sizes, and ``generate_stream`` end to end on the tiny pipeline (several text segments,
modes, early close, switching engines)."""
from __future__ import annotations

import time

import pytest
import torch

from chatterbox import ChatterboxTTS
from chatterbox.constants import S3GEN_SR
from chatterbox.engine import EngineConfig
from chatterbox.engine.chunks import ChunkTokens, t3_chunks
from chatterbox.loader import build_tiny_models
from chatterbox.optim import OptConfig
from chatterbox.streaming import chunk_schedule
from chatterbox.text import EnTokenizer, SpeechTokenSpace, TextSplitConfig
from chatterbox.text_vocab import write_tokenizer_json
from chatterbox.voice import synthetic_reference

STOP = SpeechTokenSpace().stop
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- T3 chunking
def _blocks(tokens, size, log, delay_s: float = 0.0):
    """T3's blocks (1, <= size); ``log`` records each pull (the index of the block handed out)."""
    for i, start in enumerate(range(0, len(tokens), size)):
        if delay_s:
            time.sleep(delay_s)
        log.append(i)
        yield torch.tensor([tokens[start:start + size]])


def _chunks(tokens, block, sizes):
    pulls: list[int] = []
    out = list(t3_chunks(_blocks(tokens, block, pulls), chunk_schedule(sizes), STOP, CPU))
    assert all(isinstance(c, ChunkTokens) for c in out)  # no poll points: every item is a chunk
    return out, pulls


def test_t3_chunks_cut_blocks_by_the_schedule_and_end_on_the_stop_token():
    tokens = list(range(1, 19)) + [STOP]  # blocks of 4: 4 4 4 4 3
    chunks, pulls = _chunks(tokens, 4, [6, 10])
    assert [c.n_tokens for c in chunks] == [6, 10, 3]
    assert [c.tokens[0].tolist() for c in chunks] == [tokens[:6], tokens[6:16], tokens[16:]]
    assert [c.final for c in chunks] == [False, False, True]
    assert chunks[0].valid.tolist() == tokens[:6] and chunks[1].valid.tolist() == tokens[6:16]
    assert chunks[-1].valid.tolist() == [17, 18]  # the stop token is not rendered
    assert all(c.t3_s >= 0 for c in chunks)
    assert pulls == [0, 1, 2, 3, 4]


def test_t3_chunks_flush_with_an_empty_final_chunk_when_t3_ends_on_a_boundary():
    chunks, _ = _chunks(list(range(1, 9)), 4, 4)  # max_new_tokens reached, no stop token
    assert [c.n_tokens for c in chunks] == [4, 4, 0]
    assert [c.final for c in chunks] == [False, False, True]
    assert chunks[-1].tokens is None and chunks[-1].valid.numel() == 0
    assert chunks[-1].valid.dtype == torch.long and chunks[-1].valid.device == CPU


def test_t3_chunks_of_no_blocks_is_one_empty_final_chunk():
    chunks, pulls = _chunks([], 4, 6)
    assert len(chunks) == 1 and chunks[0].final and chunks[0].tokens is None and chunks[0].n_tokens == 0
    assert pulls == []


def test_a_stop_token_inside_a_chunk_ends_it_and_nothing_more_is_pulled():
    tokens = [1, 2, 3, 4, 5, STOP, 7, 8, 9, 10, 11, 12]  # T3 may run past the stop within a block
    chunks, pulls = _chunks(tokens, 4, 6)
    assert len(chunks) == 1 and chunks[0].final
    assert chunks[0].tokens[0].tolist() == tokens[:6] and chunks[0].valid.tolist() == [1, 2, 3, 4, 5]
    assert pulls == [0, 1]  # the third block is never asked for


def test_t3_chunks_pull_blocks_only_as_each_chunk_needs_them():
    tokens = list(range(1, 25))
    pulls: list[int] = []
    stream = t3_chunks(_blocks(tokens, 4, pulls), chunk_schedule([3, 6]), STOP, CPU)
    first = next(stream)
    assert first.n_tokens == 3 and pulls == [0]  # one block covers the first chunk; 1 token left over
    second = next(stream)
    assert second.tokens[0].tolist() == tokens[3:9] and pulls == [0, 1, 2]
    stream.close()  # a closed stream asks T3 for nothing more
    assert pulls == [0, 1, 2]


def test_t3_seconds_measure_the_wait_for_the_chunks_blocks():
    pulls: list[int] = []
    chunks = list(t3_chunks(_blocks(list(range(1, 9)), 4, pulls, delay_s=0.03), chunk_schedule(8), STOP, CPU))
    assert [c.n_tokens for c in chunks] == [8, 0]
    assert chunks[0].t3_s >= 0.05  # two blocks waited for
    assert chunks[1].final and chunks[1].t3_s < chunks[0].t3_s


# ---------------------------------------------------------------- generate_stream, tiny pipeline
TEXT = "Hello there. How are you today?"
ARGS = dict(max_new_tokens=16, chunk_size=[6, 8], seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> EnTokenizer:
    return EnTokenizer(write_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def make_tts(tokenizer, opt: OptConfig | None = None) -> ChatterboxTTS:
    """The tiny pipeline with short text segments (several segments per call)."""
    m = build_tiny_models(5)
    cfg = EngineConfig(text_split=TextSplitConfig(max_text_tokens=8))
    tts = ChatterboxTTS(m.t3, m.s3gen, m.ve, tokenizer, "cpu", opt=opt, engine_cfg=cfg)
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    return tts


def _stream(tts, **kwargs):
    chunks, timings = [], None
    for chunk, metrics in tts.generate_stream(TEXT, print_metrics=False, watermark=False, **kwargs):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        assert chunk.dtype == torch.float32 and chunk.device == CPU and not chunk.is_inference()
        chunks.append(chunk)
        timings = metrics
    return chunks, timings


def test_stream_over_several_segments_yields_plain_chunks_in_order(tokenizer):
    tts = make_tts(tokenizer)
    assert len(tts.text_segments(TEXT)) > 1
    chunks, metrics = _stream(tts, **ARGS)
    assert len(chunks) > 1 and all(c.shape[0] == 1 and c.shape[1] > 0 for c in chunks)
    timings = metrics.chunks
    assert [t.index for t in timings] == list(range(len(chunks))) and metrics.chunk_count == len(chunks)
    assert [t.samples for t in timings] == [c.shape[1] for c in chunks]
    assert all(t.flow_s > 0 and t.vocoder_s > 0 and t.t3_s >= 0 for t in timings)
    assert all(a.emitted_at_s <= b.emitted_at_s for a, b in zip(timings, timings[1:]))
    assert metrics.total_audio_duration == pytest.approx(sum(c.shape[1] for c in chunks) / S3GEN_SR)
    again, _ = _stream(tts, **ARGS)
    assert len(again) == len(chunks) and all(torch.equal(a, b) for a, b in zip(again, chunks))  # exact


def test_stream_after_switching_engines_equals_a_fresh_model(tokenizer):
    fresh, _ = _stream(make_tts(tokenizer), **ARGS)
    tts = make_tts(tokenizer, OptConfig.parse("reference+t3.dtype=bf16+hift.channels_last=1"))
    tts.set_opt(OptConfig.cpu())
    tts.set_opt(OptConfig.reference())
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    got, _ = _stream(tts, **ARGS)
    assert len(got) == len(fresh) and all(torch.equal(a, b) for a, b in zip(got, fresh))


def test_closing_a_stream_early_leaves_the_callers_mode(tokenizer):
    tts = make_tts(tokenizer)
    with torch.no_grad():
        stream = tts.generate_stream(TEXT, print_metrics=False, watermark=False, **ARGS)
        first, metrics = next(stream)
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        stream.close()
    assert first.shape[1] > 0 and not first.is_inference() and metrics.chunk_count == 1
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    with pytest.raises(StopIteration):
        next(stream)
    # the model serves the next request as if nothing had been cut short
    full, _ = _stream(tts, **ARGS)
    assert torch.equal(full[0], first)
