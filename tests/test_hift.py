"""HiFT vocoder: stage-wise parity with upstream, weight-norm folding, explicit randomness, shapes."""
from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from chatterbox.models.s3gen.f0 import F0Predictor, F0PredictorConfig
from chatterbox.models.s3gen.hift import HiFTConfig, HiFTGenerator, fold_weight_norm
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.synthetic import synthetic_module
from tools.parity import check_hift
from tools.parity.runner import ParityContext, compare


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _published(fold: bool = False) -> HiFTGenerator:
    with torch.device("meta"):
        hift = HiFTGenerator(HiFTConfig.published())
    ParityContext().load(hift, "s3gen", prefix="mel2wav.")
    return fold_weight_norm(hift) if fold else hift


def _tiny(salt: int = 0) -> HiFTGenerator:
    with torch.device("meta"):
        hift = HiFTGenerator(HiFTConfig.tiny())
    return synthetic_module(hift, prefix="mel2wav.", salt=salt).eval()


@pytest.fixture(scope="module")
def published() -> HiFTGenerator:
    return _published(fold=False)


def test_parity_hift_fixture_stagewise():
    results = check_hift.check(load_fixture("hift"), ParityContext())
    assert [r.name for r in results] == ["f0", "source", "conv_post_out", "wav", "wav_end_to_end"]
    for r in results:
        assert r.ok, r.line()


def test_decode_matches_s3gen_e2e_wav_before_trim_fade(published):
    fx = load_fixture("s3gen_e2e")
    with torch.inference_mode():
        wav = published.decode(fx["mel"], fx["sources"])
    r = compare("wav_before_trim_fade", wav, fx["wav_before_trim_fade"], rtol=1e-4, atol=1e-5)
    assert r.ok, r.line()


def test_unfolded_weight_norm_path_matches_fixture(published):
    fx = load_fixture("hift")
    with torch.no_grad():
        spec = published.decode_spec(fx["mel"], fx["source"])
    r = compare("conv_post_out", spec, fx["conv_post_out"], rtol=1e-4, atol=1e-5)
    assert r.ok, r.line()


def test_fold_weight_norm_equals_parametrized(published):
    fx = load_fixture("hift")
    folded = _published(fold=True)
    assert not any(".parametrizations." in k for k in folded.state_dict())
    assert "conv_pre.weight" in folded.state_dict() and "ups.0.weight" in folded.state_dict()
    # effective weights: g * v / ||v|| with the norm over every dim but 0 (the input axis for ups)
    for name in ("conv_pre", "ups.0", "resblocks.4.convs1.2", "f0_predictor.condnet.4"):
        ref = published.get_submodule(name).weight
        assert torch.allclose(folded.get_submodule(name).weight, ref, rtol=1e-6, atol=0), name
    with torch.inference_mode():
        a, _ = published(fx["mel"], check_hift.recorded_noise(fx))
        b, _ = folded(fx["mel"], check_hift.recorded_noise(fx))
        f_a, f_b = published.f0(fx["mel"]), folded.f0(fx["mel"])
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    assert (f_a - f_b).abs().max() <= 1e-6 * f_a.abs().max()


def test_generator_draws_follow_upstream_order():
    fx = load_fixture("hift")
    noise = SourceNoise.draw(1, fx["wav"].shape[-1], torch.Generator().manual_seed(8))
    # upstream ran under torch.manual_seed(8): same stream, same order (phase, then sine noise)
    assert torch.equal(noise.phase_uniform, fx["rand_000_rand"])
    assert torch.equal(noise.sine_noise, fx["rand_001_randn_like"])


def test_zero_noise_is_deterministic_and_seeded_noise_reproducible():
    hift = _tiny()
    cfg = hift.cfg
    mel = torch.randn(2, cfg.n_mels, 5, generator=torch.Generator().manual_seed(1))
    length = 5 * cfg.samples_per_frame
    wav1, src1 = hift(mel, SourceNoise.zeros(2, length))
    wav2, src2 = hift(mel, SourceNoise.zeros(2, length))
    assert torch.equal(wav1, wav2) and torch.equal(src1, src2)
    seeded = [hift(mel, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(seeded[0][0], seeded[1][0])
    assert not torch.equal(seeded[0][1], src1)


def test_zero_noise_source_is_pure_harmonics():
    hift = _tiny()
    cfg = hift.cfg.source
    f0 = torch.tensor([[100.0, 5.0]])  # one voiced frame, one unvoiced frame
    n = hift.cfg.samples_per_frame
    src = hift.source_from_f0(f0, SourceNoise.zeros(1, 2 * n))
    t = torch.arange(1, n + 1, dtype=torch.float64)
    k = torch.arange(1, cfg.num_harmonics + 1, dtype=torch.float64)[:, None]
    phase = torch.full_like(k, -torch.pi)
    phase[0] = 0.0  # the fundamental has no random phase
    sines = cfg.sine_amp * torch.sin(2 * torch.pi * 100.0 * k * t / cfg.sample_rate + phase)  # (H, n)
    lin = hift.m_source.l_linear
    expected = torch.tanh(lin.weight.double() @ sines + lin.bias.double()[:, None])  # (1, n)
    assert torch.allclose(src[0, :, :n].double(), expected, atol=1e-5)
    # unvoiced and noise-free: the merge sees zeros, so only the bias remains
    assert torch.allclose(src[0, 0, n:], torch.tanh(lin.bias).expand(n), atol=1e-7)


def test_single_frame_mel_shapes(published):
    mel = torch.randn(1, 80, 1, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        wav, source = published(mel, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 480) and source.shape == (1, 1, 480)
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()
    assert wav.abs().max() <= 0.99


def test_batch_items_are_independent():
    hift = _tiny()
    cfg = hift.cfg
    mel = torch.randn(2, cfg.n_mels, 4, generator=torch.Generator().manual_seed(5))
    noise = SourceNoise.draw(2, 4 * cfg.samples_per_frame, torch.Generator().manual_seed(6))
    wav, source = hift(mel, noise)
    for b in range(2):
        one = SourceNoise(noise.phase_uniform[b:b + 1], noise.sine_noise[b:b + 1])
        wav_b, source_b = hift(mel[b:b + 1], one)
        # batched GEMMs round the F0 differently in the last ulp; the phase carries that along
        assert torch.allclose(wav[b:b + 1], wav_b, atol=1e-5)
        assert torch.allclose(source[b:b + 1], source_b, atol=1e-5)


def test_works_with_autograd_enabled():
    hift = _tiny()
    mel = torch.randn(1, hift.cfg.n_mels, 3, requires_grad=True)
    wav, _ = hift(mel, SourceNoise.zeros(1, 3 * hift.cfg.samples_per_frame))
    wav.sum().backward()
    assert mel.grad is not None and mel.grad.shape == mel.shape


def test_bad_inputs_raise():
    hift = _tiny()
    cfg = hift.cfg
    good = torch.randn(1, cfg.n_mels, 3)
    length = 3 * cfg.samples_per_frame
    with pytest.raises(ValueError, match="mel"):
        hift(torch.randn(1, cfg.n_mels + 1, 3))
    with pytest.raises(ValueError, match="SourceNoise"):
        hift(good, SourceNoise.zeros(1, length - 1))
    with pytest.raises(ValueError, match="source"):
        hift.decode(good, torch.zeros(1, 1, length + 4))
    with pytest.raises(ValueError, match="f0"):
        hift.source_from_f0(torch.zeros(1, 1, 3), SourceNoise.zeros(1, length))
    with pytest.raises(ValueError, match="kernel"):
        HiFTGenerator(HiFTConfig(upsample_kernel_sizes=(16, 10, 7)))
    with pytest.raises(ValueError, match="odd"):
        F0Predictor(F0PredictorConfig(kernel_size=4))
