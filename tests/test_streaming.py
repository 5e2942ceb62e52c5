"""Streaming: incremental flow + exact-state vocoder, and the generate_stream API."""
import math

import pytest
import torch

from chatterbox.models.s3gen.hift_stream import HiFTStreamer, StreamNoise
from chatterbox.models.s3gen.s3gen import S3Gen, S3GenRef
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.streaming import FlowStreamConfig, chunk_schedule, flow_stream_step, init_flow_stream
from conftest import load_fixture
from tools.parity.legacy_stream import legacy_stream_chunks
from tools.parity.runner import ParityContext
from tools.parity.s3gen_loader import load_s3gen


@pytest.fixture(scope="module")
def s3gen() -> S3Gen:
    torch.set_num_threads(2)
    return load_s3gen(ParityContext())


def _ref(stem: str) -> S3GenRef:
    fx = load_fixture(stem)
    return S3GenRef(prompt_token=fx["ref_prompt_token"], prompt_token_len=fx["ref_prompt_token_len"],
                    prompt_feat=fx["ref_prompt_feat"], embedding=fx["ref_embedding"])


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed))


def _stream_mel(s3gen, ref, tokens, sizes, noise, cfg):
    state = init_flow_stream(s3gen, ref)
    pieces, start = [], 0
    for i, size in enumerate(sizes):
        final = i == len(sizes) - 1
        mel, state = flow_stream_step(s3gen, ref, state, tokens[start:start + size], noise, cfg, final=final,
                                      n_timesteps=STEPS)
        pieces.append(mel)
        start += size
    return torch.cat(pieces, dim=2)


# The streaming properties tested here hold for any number of CFM steps; fewer keep CPU time down.
STEPS = 3


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    err = (reference - estimate).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / err)) if err > 0 else math.inf


@pytest.mark.parametrize("stem", ["s3gen_e2e", "embed_ref"])  # even and odd prompt mel lengths
def test_one_final_chunk_equals_one_shot_flow_exactly(s3gen, stem):
    ref = _ref(stem) if stem == "s3gen_e2e" else _embed_ref_as_ref()
    tokens = _tokens(24)
    noise = s3gen.draw_cfm_noise(torch.Generator().manual_seed(0))
    with torch.inference_mode():
        one_shot = s3gen.flow_inference(tokens, ref, cfm_noise=noise, n_timesteps=STEPS)
        streamed = _stream_mel(s3gen, ref, tokens, [24], noise, FlowStreamConfig(context_window=100))
    assert streamed.shape == one_shot.shape
    assert torch.equal(streamed, one_shot)


def _embed_ref_as_ref() -> S3GenRef:
    fx = load_fixture("embed_ref")
    return S3GenRef(prompt_token=fx["prompt_token"], prompt_token_len=fx["prompt_token_len"],
                    prompt_feat=fx["prompt_feat"], embedding=fx["embedding"])


def test_chunked_flow_fidelity_grows_with_lookahead_and_frame_counts_add_up(s3gen):
    ref = _ref("s3gen_e2e")
    tokens = _tokens(30, seed=1)
    noise = s3gen.draw_cfm_noise(torch.Generator().manual_seed(1))
    with torch.inference_mode():
        one_shot = s3gen.flow_inference(tokens, ref, cfm_noise=noise, n_timesteps=STEPS)
        near = _stream_mel(s3gen, ref, tokens, [10, 10, 10], noise, FlowStreamConfig(context_window=100))
        far = _stream_mel(s3gen, ref, tokens, [10, 10, 10], noise,
                          FlowStreamConfig(context_window=100, lookahead_tokens=8))
    assert near.shape == one_shot.shape == far.shape
    # Frames rendered before later tokens exist differ from one-shot: the encoder and the CFM attend
    # both ways. Holding frames back for more right context brings them closer (stated floors for
    # the synthetic weights, whose attention is not local like a trained model's).
    snr_near, snr_far = snr_db(one_shot, near), snr_db(one_shot, far)
    assert snr_near > 12.0
    assert snr_far > snr_near
    # the final chunk's frames, rendered with everything known and full context, are the one-shot ones
    assert torch.allclose(near[..., -20:], one_shot[..., -20:], atol=1e-4)


def test_flow_work_per_chunk_is_bounded_by_the_context_window(s3gen, monkeypatch):
    ref = _ref("s3gen_e2e")
    tokens = _tokens(60, seed=2)
    noise = s3gen.draw_cfm_noise(torch.Generator().manual_seed(2))
    seen = []
    original = s3gen.flow_inference

    def spy(speech_tokens, *args, **kwargs):
        seen.append(int(speech_tokens.reshape(-1).shape[0]))
        return original(speech_tokens, *args, **kwargs)

    monkeypatch.setattr(s3gen, "flow_inference", spy)
    with torch.inference_mode():
        _stream_mel(s3gen, ref, tokens, [10] * 6, noise, FlowStreamConfig(context_window=8))
    assert max(seen) <= 8 + 10 + 3 + 10  # context + chunk + held-back lookahead + slack of one chunk
    assert len(seen) == 6


def test_streamed_s3gen_with_zero_noise_and_one_chunk_equals_one_shot(s3gen):
    ref = _ref("s3gen_e2e")
    tokens = _tokens(20, seed=3)
    noise = s3gen.draw_cfm_noise(torch.Generator().manual_seed(3))
    streamer = HiFTStreamer(s3gen.mel2wav)
    with torch.inference_mode():
        mel = s3gen.flow_inference(tokens, ref, cfm_noise=noise, n_timesteps=STEPS)
        one_shot, _ = s3gen.hift_inference(mel, SourceNoise.zeros(1, mel.shape[-1] * 480))
        state = streamer.init_state(1, s3gen.device, StreamNoise.zeros())
        pieces = []
        for start in range(0, mel.shape[-1], 7):
            piece, state = streamer.push(mel[..., start:start + 7], state, final=start + 7 >= mel.shape[-1])
            pieces.append(piece)
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape == one_shot.shape
    assert (streamed - one_shot).abs().max() < 1e-5


def test_chunk_schedule():
    sizes = chunk_schedule([4, 8, 16])
    assert [next(sizes) for _ in range(5)] == [4, 8, 16, 16, 16]
    assert [next(chunk_schedule(25)) for _ in range(2)] == [25, 25]
    for bad in (0, [], [3, 0], "5"):
        with pytest.raises(ValueError):
            next(chunk_schedule(bad))


def test_streamed_audio_is_seamless_and_the_legacy_method_is_not(s3gen):
    """Same tokens, same CFM noise table, zero vocoder noise, two chunks of 25 tokens.

    Our stream's audio equals the one-shot vocoding of its mel (no seam at all); upstream's method
    crops by proportion and fades each chunk in, so around its seam it departs from any smooth
    rendering. Whole-utterance SNRs against one-shot are reported by eval/stream_fidelity.py.
    """
    ref = _ref("s3gen_e2e")
    tokens = _tokens(50, seed=4)
    noise = s3gen.draw_cfm_noise(torch.Generator().manual_seed(4))
    zeros = lambda n: SourceNoise.zeros(1, n)  # noqa: E731
    streamer = HiFTStreamer(s3gen.mel2wav)
    with torch.inference_mode():
        state = init_flow_stream(s3gen, ref)
        voc = streamer.init_state(1, s3gen.device, StreamNoise.zeros())
        mels, audio = [], []
        for i, piece in enumerate((tokens[:25], tokens[25:])):
            mel, state = flow_stream_step(s3gen, ref, state, piece, noise, FlowStreamConfig(), final=i == 1,
                                          n_timesteps=STEPS)
            wav, voc = streamer.push(mel, voc, final=i == 1)
            mels.append(mel)
            audio.append(wav)
        streamed = s3gen.apply_trim_fade(torch.cat(audio, dim=-1))
        mel_all = torch.cat(mels, dim=-1)
        vocoded = s3gen.apply_trim_fade(s3gen.hift_inference(mel_all, zeros(mel_all.shape[-1] * 480))[0])
        legacy = list(legacy_stream_chunks(s3gen, ref, [tokens[:25], tokens[25:]], 50, 0.02, noise,
                                           source_noise=zeros, n_timesteps=STEPS))
    assert streamed.shape == vocoded.shape
    assert (streamed - vocoded).abs().max() < 1e-5
    first = legacy[0][0]
    seam = first.shape[-1]
    second = legacy[1][0]
    assert float(second[0, 0].abs()) == 0.0  # the linear fade-in starts every legacy chunk at silence
    assert float(streamed[0, seam - 5:seam + 5].abs().max()) > 0.0


# ---------------------------------------------------------------- generate_stream (full pipeline)
def _run_stream(tts, **kwargs):
    chunks, modes = [], []
    metrics = None
    for chunk, metrics in tts.generate_stream("Hello there.", print_metrics=False, watermark=False, **kwargs):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        chunks.append(chunk)
    return chunks, modes, metrics


def test_generate_stream_yields_plain_chunks_and_leaves_the_callers_mode_alone(synthetic_tts):
    chunks, modes, metrics = _run_stream(synthetic_tts, max_new_tokens=40, chunk_size=[16, 12], seed=0)
    assert chunks and all(c.dim() == 2 and c.shape[0] == 1 and c.dtype == torch.float32 for c in chunks)
    assert all(not c.is_inference() for c in chunks)
    chunks[0] *= 0.5  # the caller owns the chunk
    assert all(m == (False, True) for m in modes)
    assert metrics.chunk_count == len(chunks) == len(metrics.chunks)
    assert metrics.latency_to_first_chunk is not None and metrics.latency_to_first_chunk > 0
    total = sum(c.shape[1] for c in chunks)
    assert metrics.total_audio_duration == pytest.approx(total / synthetic_tts.sr)
    assert metrics.rtf == pytest.approx(metrics.total_generation_time / metrics.total_audio_duration)
    with torch.no_grad():
        chunks, modes, _ = _run_stream(synthetic_tts, max_new_tokens=20, chunk_size=16, seed=0)
    # the loop body runs in the caller's no_grad block: it sees no_grad, never inference mode
    assert modes and all(m == (False, False) for m in modes)
    assert all(not c.is_inference() for c in chunks)


def test_generate_stream_is_reproducible_and_renders_the_same_tokens_as_generate(synthetic_tts):
    a, _, _ = _run_stream(synthetic_tts, max_new_tokens=30, chunk_size=16, seed=7)
    b, _, _ = _run_stream(synthetic_tts, max_new_tokens=30, chunk_size=16, seed=7)
    assert torch.equal(torch.cat(a, dim=1), torch.cat(b, dim=1))
    one_shot = synthetic_tts.generate("Hello there.", max_new_tokens=30, seed=7, watermark=False)
    # same seed -> same T3 tokens -> same number of mel frames -> same number of samples
    assert torch.cat(a, dim=1).shape == one_shot.shape


def test_generate_stream_can_be_closed_early(synthetic_tts):
    stream = synthetic_tts.generate_stream("Hello there.", max_new_tokens=60, chunk_size=16, seed=1,
                                           print_metrics=False, watermark=False)
    first, _ = next(stream)
    stream.close()
    assert first.shape[1] > 0
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    again, _, _ = _run_stream(synthetic_tts, max_new_tokens=20, chunk_size=16, seed=1)
    assert again


@pytest.mark.parametrize("bad", ["", "  "])
def test_generate_stream_rejects_empty_text(synthetic_tts, bad):
    with pytest.raises(ValueError, match="empty"):
        next(synthetic_tts.generate_stream(bad, print_metrics=False))
