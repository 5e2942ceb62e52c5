from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from chatterbox.models.s3gen.xvector import (
    FBANK_HOP_SAMPLES,
    FBANK_WINDOW_SAMPLES,
    CAMPPlus,
    CAMPPlusConfig,
    campplus_features,
    kaldi_fbank,
)
from chatterbox.synthetic import synthetic_module
from tools.parity.runner import compare

PREFIX = "speaker_encoder."


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(cfg: CAMPPlusConfig) -> CAMPPlus:
    with torch.device("meta"):
        model = CAMPPlus(cfg)
    return synthetic_module(model, prefix=PREFIX).eval()


@pytest.fixture(scope="module")
def published() -> CAMPPlus:
    return _model(CAMPPlusConfig.published())


@pytest.fixture(scope="module")
def tiny() -> CAMPPlus:
    return _model(CAMPPlusConfig.tiny())


def _wave(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000.0
    tone = 0.3 * torch.sin(2 * torch.pi * (180.0 + 400.0 * t) * t)
    return tone + 0.05 * torch.randn(n, generator=g)


def test_features_match_fixture():
    fx = load_fixture("mels")
    raw = kaldi_fbank(fx["wav16"])
    assert compare("kaldi_fbank_raw", raw, fx["kaldi_fbank_raw"], rtol=1e-4, atol=1e-5).ok
    feats = campplus_features(fx["wav16"][None])
    assert compare("campplus_fbank_meannorm", feats, fx["campplus_fbank_meannorm"], rtol=1e-4, atol=1e-5).ok


def test_parity_published(published):
    fx = load_fixture("campplus")
    with torch.inference_mode():
        out = published.forward_with_intermediates(campplus_features(fx["wav16"][None]))
    for name in ("xvector", "head_out", "stats_pool"):
        res = compare(name, getattr(out, name), fx[name], rtol=1e-4, atol=1e-6)
        assert res.ok, res.line()
    assert torch.equal(published.inference(fx["wav16"][None]).detach(), out.xvector)


def test_state_dict_matches_manifest_count(published):
    sd = published.state_dict()
    assert len(sd) == 937
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 122
    assert sd["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.weight" not in sd


def test_frame_count_and_shapes(tiny):
    for n in (400, 559, 560, 4321):
        assert kaldi_fbank(_wave(n, 0)).shape == (1 + (n - FBANK_WINDOW_SAMPLES) // FBANK_HOP_SAMPLES, 80)
    out = tiny.forward_with_intermediates(campplus_features(_wave(8000, 1)[None]))
    assert out.head_out.shape == (1, 4 * 10, 48)
    assert out.stats_pool.shape == (1, 2 * tiny.xvector.frame_channels)
    assert out.xvector.shape == (1, 16)
    assert torch.isfinite(out.xvector).all()


def test_equal_length_batch_matches_single_runs(tiny):
    wavs = torch.stack([_wave(6000, 2), _wave(6000, 3)])
    batch = tiny.inference(wavs)
    single = torch.cat([tiny.inference(w[None]) for w in wavs])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)


def test_ragged_batch_follows_upstream_zero_padding(tiny):
    # Upstream mean-normalises each item's fbank on its own, zero-pads the shorter item's features to
    # the longest frame count and runs the net unmasked: the longest item is unaffected, the shorter
    # one is encoded *with* its padding and so differs from its stand-alone x-vector.
    long_wav, short_wav = _wave(9000, 4), _wave(5000, 5)
    feats = campplus_features([long_wav, short_wav])
    t_long, t_short = kaldi_fbank(long_wav).shape[0], kaldi_fbank(short_wav).shape[0]
    assert feats.shape == (2, t_long, 80)
    fb_short = kaldi_fbank(short_wav)
    torch.testing.assert_close(feats[1, :t_short], fb_short - fb_short.mean(0, keepdim=True))
    assert torch.count_nonzero(feats[1, t_short:]) == 0

    batch = tiny.inference([long_wav, short_wav])
    torch.testing.assert_close(batch[0], tiny.inference(long_wav[None])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch[1], tiny(feats[1:2])[0], rtol=1e-5, atol=1e-6)
    alone = tiny.inference(short_wav[None])[0]
    assert (batch[1] - alone).abs().max() > 1e-3


def test_too_short_input_raises(tiny):
    with pytest.raises(ValueError, match="too short"):
        tiny.inference(torch.zeros(1, FBANK_WINDOW_SAMPLES - 1))
    with pytest.raises(ValueError, match="too short"):
        kaldi_fbank(torch.zeros(100))
    # 1-2 fbank frames leave a single frame after the stride-2 TDNN, whose unbiased std is NaN
    # upstream; we refuse instead. Three frames (720 samples) is the shortest usable input.
    assert tiny.min_feature_frames == 3
    shortest = FBANK_WINDOW_SAMPLES + 2 * FBANK_HOP_SAMPLES
    with pytest.raises(ValueError, match="at least 3 fbank frames"):
        tiny.inference(_wave(shortest - 1, 0)[None])
    assert torch.isfinite(tiny.inference(_wave(shortest, 0)[None])).all()


def test_bad_shapes_raise(tiny):
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        campplus_features(torch.zeros(2, 1, 1000))
    with pytest.raises(ValueError, match="1-D"):
        kaldi_fbank(torch.zeros(1, 1000))
    with pytest.raises(ValueError, match="features"):
        tiny(torch.zeros(1, 50, 40))
    with pytest.raises(ValueError, match="empty"):
        campplus_features([])


def test_batchnorm_ignores_train_mode(tiny):
    feats = campplus_features(_wave(7000, 6)[None])
    ref = tiny(feats)
    tiny.train()
    try:
        again = tiny(feats)
    finally:
        tiny.eval()
    assert torch.equal(ref, again)
    assert torch.equal(tiny.xvector.tdnn.nonlinear.batchnorm.running_mean,
                       torch.zeros_like(tiny.xvector.tdnn.nonlinear.batchnorm.running_mean))


def test_grad_modes_agree(tiny):
    wav = _wave(7000, 7)[None]
    plain = tiny.inference(wav)
    with torch.no_grad():
        ng = tiny.inference(wav)
    with torch.inference_mode():
        im = tiny.inference(wav)
    assert plain.requires_grad
    assert torch.equal(plain.detach(), ng) and torch.equal(ng, im)
