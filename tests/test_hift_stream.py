"""Streaming HiFT: concatenated chunks equal the one-shot waveform; receptive field; state and modes."""
from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from chatterbox.models.s3gen.hift import HiFTConfig, HiFTGenerator, fold_weight_norm
from chatterbox.models.s3gen.hift_stream import (
    HiFTReceptiveField,
    HiFTStreamConfig,
    HiFTStreamer,
    StreamNoise,
    receptive_field,
)
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.synthetic import synthetic_module
from tools.parity.runner import ParityContext

# Achieved: ~2e-6 on the published config (float32 conv rounding on windows of other lengths), 0 on tiny.
STREAM_ATOL = 1e-5
UNEVEN = [3, 0, 1, 22, 7, 2, 40, 1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(salt: int = 0) -> HiFTGenerator:
    with torch.device("meta"):
        hift = HiFTGenerator(HiFTConfig.tiny())
    return fold_weight_norm(synthetic_module(hift, prefix="mel2wav.", salt=salt)).eval()


@pytest.fixture(scope="module")
def published() -> HiFTGenerator:
    with torch.device("meta"):
        hift = HiFTGenerator(HiFTConfig.published())
    ParityContext().load(hift, "s3gen", prefix="mel2wav.")
    return fold_weight_norm(hift)


@pytest.fixture(scope="module")
def hift_fx():
    return load_fixture("hift")


def _stream(streamer: HiFTStreamer, mel: torch.Tensor, schedule: list[int], noise: StreamNoise | None = None,
            state=None) -> tuple[torch.Tensor, list[int]]:
    """Push ``mel`` in chunks cycling through ``schedule``, then flush; returns the wav and sizes."""
    state = streamer.init_state(mel.shape[0], mel.device, noise) if state is None else state
    outs, pos, i = [], 0, 0
    while pos < mel.shape[2]:
        n = schedule[i % len(schedule)]
        i += 1
        wav, state = streamer.push(mel[:, :, pos:pos + n], state)
        outs.append(wav)
        pos += n
    wav, state = streamer.push(mel[:, :, :0], state, final=True)
    outs.append(wav)
    assert state.finished
    return torch.cat(outs, dim=1), [o.shape[1] for o in outs]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# -- receptive field -------------------------------------------------------------------------------
def test_receptive_field_published_is_the_preset():
    assert receptive_field(HiFTConfig.published()) == HiFTReceptiveField(
        mel_left=14, mel_right=14, source_left=15, source_right=15, f0_left=5, f0_right=5)
    assert HiFTStreamConfig.for_hift(HiFTConfig.published()) == HiFTStreamConfig.published()


def _measured_reach(hift: HiFTGenerator, mel: torch.Tensor) -> HiFTReceptiveField:
    """Perturb one mel frame (source held fixed), one source frame (mel fixed), and see what moves."""
    spf = hift.cfg.samples_per_frame
    t = mel.shape[2] // 2
    bump = torch.cat([torch.zeros_like(mel[:, :, :t]), torch.ones_like(mel[:, :, t:t + 1]),
                      torch.zeros_like(mel[:, :, t + 1:])], dim=2)
    with torch.inference_mode():
        source = hift.source_from_f0(hift.f0(mel), SourceNoise.zeros(1, mel.shape[2] * spf))
        wav = hift.decode(mel, source)
        moved_mel = (hift.decode(mel + bump, source) - wav).abs()[0].view(-1, spf).amax(1).nonzero().flatten()
        src_bump = bump[:, :1].repeat_interleave(spf, dim=2) * 0.05
        moved_src = (hift.decode(mel, source + src_bump) - wav).abs()[0].view(-1, spf).amax(1).nonzero().flatten()
        moved_f0 = (hift.f0(mel + bump) - hift.f0(mel)).abs()[0].nonzero().flatten()
    # A frame e that moves when frame t moves reads t: t - e frames to its right, e - t to its left.
    return HiFTReceptiveField(
        mel_left=int(moved_mel.max()) - t, mel_right=t - int(moved_mel.min()),
        source_left=int(moved_src.max()) - t, source_right=t - int(moved_src.min()),
        f0_left=int(moved_f0.max()) - t, f0_right=t - int(moved_f0.min()))


def test_receptive_field_measured_by_perturbation_tiny():
    hift = _tiny()
    mel = torch.randn(1, hift.cfg.n_mels, 60, generator=torch.Generator().manual_seed(1))
    assert _measured_reach(hift, mel) == receptive_field(hift.cfg)


def test_receptive_field_measured_by_perturbation_published(published, hift_fx):
    assert _measured_reach(published, hift_fx["mel"][:, :, :45]) == receptive_field(published.cfg)


def test_windowed_f0_is_bit_identical_to_one_shot(published, hift_fx):
    # What makes the carried phase exact: F0 away from a window's edges does not depend on the window.
    mel = hift_fx["mel"]
    reach = receptive_field(published.cfg).f0_left
    with torch.inference_mode():
        full = published.f0(mel)
        for start, stop in ((0, 23), (11, 50), (30, mel.shape[2])):
            part = published.f0(mel[:, :, start:stop])
            lo = 0 if start == 0 else reach
            hi = part.shape[1] - (0 if stop == mel.shape[2] else reach)
            assert torch.equal(part[:, lo:hi], full[:, start + lo:start + hi])


def test_contexts_smaller_than_the_receptive_field_are_refused():
    hift = _tiny()
    need = HiFTStreamConfig.for_hift(hift.cfg)
    with pytest.raises(ValueError, match="receptive field"):
        HiFTStreamer(hift, HiFTStreamConfig(need.left_context, need.right_context - 1, need.f0_context))
    HiFTStreamer(hift, HiFTStreamConfig(need.left_context + 2, need.right_context + 3, need.f0_context + 1))


# -- exactness on the published config ---------------------------------------------------------------
@pytest.fixture(scope="module")
def published_refs(published, hift_fx):
    mel = hift_fx["mel"]
    injected = SourceNoise(hift_fx["rand_000_rand"], hift_fx["rand_001_randn_like"])
    with torch.inference_mode():
        zeros_ref, _ = published(mel, SourceNoise.zeros(1, mel.shape[2] * published.cfg.samples_per_frame))
        injected_ref, _ = published(mel, injected)
    return {"zeros": (StreamNoise.zeros(), zeros_ref), "injected": (StreamNoise.injected(injected), injected_ref)}


@pytest.mark.parametrize("noise,schedule", [
    ("zeros", [5]), ("zeros", [13]), ("zeros", [10_000]), ("injected", [37]), ("injected", UNEVEN),
])
def test_published_chunks_equal_one_shot(published, published_refs, hift_fx, noise, schedule):
    stream_noise, ref = published_refs[noise]
    streamer = HiFTStreamer(published, HiFTStreamConfig.published())
    with torch.inference_mode():
        wav, _ = _stream(streamer, hift_fx["mel"], schedule, stream_noise)
    assert _max_diff(wav, ref) <= STREAM_ATOL


# -- exactness and behaviour on the tiny config --------------------------------------------------
def _tiny_case(frames: int = 70, batch: int = 1, seed: int = 0):
    hift = _tiny()
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, hift.cfg.n_mels, frames, generator=g)
    noise = SourceNoise.draw(batch, frames * hift.cfg.samples_per_frame, g)
    return hift, mel, noise


@pytest.mark.parametrize("schedule", [[1], [2, 5], UNEVEN, [10_000]])
@pytest.mark.parametrize("injected", [False, True])
def test_tiny_chunks_equal_one_shot(schedule, injected):
    hift, mel, noise = _tiny_case()
    if not injected:
        noise = SourceNoise.zeros(1, noise.sine_noise.shape[2])
    streamer = HiFTStreamer(hift)
    with torch.inference_mode():
        ref, _ = hift(mel, noise)
        wav, _ = _stream(streamer, mel, schedule, StreamNoise.injected(noise) if injected else None)
    assert _max_diff(wav, ref) <= STREAM_ATOL


def test_emission_schedule():
    hift, mel, _ = _tiny_case(frames=40)
    streamer = HiFTStreamer(hift)
    spf, right = hift.cfg.samples_per_frame, streamer.cfg.right_context
    with torch.inference_mode():
        _, sizes = _stream(streamer, mel, [1])
    # one frame at a time: nothing until right_context + 1 frames are in, then one frame per push
    assert sizes[:right] == [0] * right
    assert sizes[right:40] == [spf] * (40 - right)
    assert sizes[40] == right * spf  # the flush
    assert sum(sizes) == 40 * spf


def test_batch_of_two_and_short_utterances():
    hift, mel, noise = _tiny_case(frames=30, batch=2)
    streamer = HiFTStreamer(hift)
    with torch.inference_mode():
        ref, _ = hift(mel, noise)
        wav, _ = _stream(streamer, mel, [4], StreamNoise.injected(noise))
        assert _max_diff(wav, ref) <= STREAM_ATOL
        # shorter than the contexts: everything comes out at the flush
        short_ref, _ = hift(mel[:, :, :3], SourceNoise.zeros(2, 3 * hift.cfg.samples_per_frame))
        short, sizes = _stream(streamer, mel[:, :, :3], [1])
        assert sizes == [0, 0, 0, 3 * hift.cfg.samples_per_frame]
        assert _max_diff(short, short_ref) <= STREAM_ATOL
        empty, _ = _stream(streamer, mel[:, :, :0], [1])
    assert empty.shape == (2, 0)


def test_interleaved_streams_do_not_interfere():
    hift, mel_a, noise_a = _tiny_case(seed=1)
    _, mel_b, noise_b = _tiny_case(seed=2)
    streamer = HiFTStreamer(hift)
    with torch.inference_mode():
        ref_a, _ = hift(mel_a, noise_a)
        ref_b, _ = hift(mel_b, noise_b)
        sa = streamer.init_state(noise=StreamNoise.injected(noise_a))
        sb = streamer.init_state(noise=StreamNoise.injected(noise_b))
        out_a, out_b = [], []
        for pos in range(0, 70, 9):
            wa, sa = streamer.push(mel_a[:, :, pos:pos + 9], sa)
            wb, sb = streamer.push(mel_b[:, :, pos:pos + 4], sb)
            wb2, sb = streamer.push(mel_b[:, :, pos + 4:pos + 9], sb)
            out_a.append(wa)
            out_b += [wb, wb2]
        out_a.append(streamer.push(mel_a[:, :, :0], sa, final=True)[0])
        out_b.append(streamer.push(mel_b[:, :, :0], sb, final=True)[0])
    assert _max_diff(torch.cat(out_a, 1), ref_a) <= STREAM_ATOL
    assert _max_diff(torch.cat(out_b, 1), ref_b) <= STREAM_ATOL


def test_old_state_is_untouched_by_push():
    hift, mel, _ = _tiny_case()
    streamer = HiFTStreamer(hift)
    with torch.inference_mode():
        s0 = streamer.init_state()
        w1, s1 = streamer.push(mel[:, :, :30], s0)
        again, s1b = streamer.push(mel[:, :, :30], s0)
    assert s0.received == 0 and s0.mel.shape[2] == 0
    assert torch.equal(w1, again) and torch.equal(s1.cycles, s1b.cycles)


@pytest.mark.parametrize("make_mode,push_mode", [
    ("inference", "plain"), ("plain", "inference"), ("no_grad", "plain"), ("inference", "no_grad"),
])
def test_state_crosses_autograd_modes(make_mode, push_mode):
    hift, mel, noise = _tiny_case(frames=40)
    modes = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "plain": torch.enable_grad}
    streamer = HiFTStreamer(hift)
    with torch.inference_mode():
        ref, _ = hift(mel, noise)
    with modes[make_mode]():
        state = streamer.init_state(noise=StreamNoise.injected(noise))
        first, state = streamer.push(mel[:, :, :20], state)  # state tensors made in this mode
    with modes[push_mode]():
        second, state = streamer.push(mel[:, :, 20:31], state)
        third, state = streamer.push(mel[:, :, 31:], state, final=True)
    if push_mode != "inference":
        assert not second.is_inference() and not third.is_inference()
    with torch.no_grad():
        wav = torch.cat([first.detach(), second.detach(), third.detach()], dim=1)
    assert _max_diff(wav, ref) <= STREAM_ATOL


def test_generator_noise():
    hift, mel, _ = _tiny_case(frames=30)
    streamer = HiFTStreamer(hift)
    spf = hift.cfg.samples_per_frame
    with torch.inference_mode():
        # one push draws exactly what a one-shot SourceNoise.draw draws
        ref, _ = hift(mel, SourceNoise.draw(1, 30 * spf, torch.Generator().manual_seed(5)))
        one, _ = _stream(streamer, mel, [30], StreamNoise.drawn(torch.Generator().manual_seed(5)))
        # split draws are deterministic for a seed, but a different realisation
        a, _ = _stream(streamer, mel, [7], StreamNoise.drawn(torch.Generator().manual_seed(5)))
        b, _ = _stream(streamer, mel, [7], StreamNoise.drawn(torch.Generator().manual_seed(5)))
    assert _max_diff(one, ref) <= STREAM_ATOL
    assert torch.equal(a, b)


def test_bad_input():
    hift, mel, noise = _tiny_case(frames=20)
    streamer = HiFTStreamer(hift)
    state = streamer.init_state()
    with pytest.raises(ValueError, match="expects mel"):
        streamer.push(mel[0], state)
    with pytest.raises(ValueError, match="expects mel"):
        streamer.push(torch.zeros(1, hift.cfg.n_mels + 1, 4), state)
    with pytest.raises(ValueError, match="batch"):
        streamer.push(mel.repeat(2, 1, 1), state)
    with pytest.raises(TypeError, match="floating-point"):
        streamer.push(mel.long(), state)
    with pytest.raises(ValueError, match="batch must be positive"):
        streamer.init_state(0)
    with pytest.raises(ValueError, match="mode"):
        StreamNoise("uniform")
    with pytest.raises(ValueError, match="injected"):
        StreamNoise("injected")
    with torch.inference_mode():
        _, done = streamer.push(mel, state, final=True)
        with pytest.raises(RuntimeError, match="already flushed"):
            streamer.push(mel, done)
        short = SourceNoise(noise.phase_uniform, noise.sine_noise[:, :, :100])
        with pytest.raises(ValueError, match="does not cover"):
            streamer.push(mel, streamer.init_state(noise=StreamNoise.injected(short)))
    with pytest.raises(ValueError, match="phase_uniform"):
        streamer.init_state(2, noise=StreamNoise.injected(noise))
