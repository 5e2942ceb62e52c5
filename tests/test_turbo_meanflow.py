"""Meanflow S3Gen flow (Chatterbox-Turbo): the time mixer, 2 plain Euler steps, shapes, keys, noise layout."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from chatterbox.models.s3gen.cfm import CausalCFM, CFMConfig
from chatterbox.models.s3gen.decoder import ConditionalDecoder
from chatterbox.models.s3gen.s3gen import S3Gen, S3GenConfig, S3GenRef, meanflow_start_noise
from chatterbox.synthetic import synthetic_module

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = CFMConfig.small_meanflow()
F = SMALL.estimator.n_feats


def inputs(t_frames: int = 23, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu, cond, noise = (torch.randn(batch, F, t_frames, generator=g) for _ in range(3))
    spks = torch.randn(batch, SMALL.estimator.spk_dim, generator=g)
    return mu, cond, noise, spks


def test_presets():
    cfg = CFMConfig.published_meanflow()
    assert cfg.meanflow and cfg.n_timesteps == 2 and cfg.t_scheduler == "linear"
    assert not CFMConfig.published().meanflow
    assert S3GenConfig.published_meanflow().flow.cfm == cfg


def test_checkpoint_keys_are_the_published_ones_plus_the_mixer():
    with torch.device("meta"):
        plain = S3Gen(S3GenConfig.published()).state_dict()
        mean = S3Gen(S3GenConfig.published_meanflow()).state_dict()
    assert set(mean) - set(plain) == {"flow.decoder.estimator.time_embed_mixer.weight"}
    assert set(plain) <= set(mean)
    assert tuple(mean["flow.decoder.estimator.time_embed_mixer.weight"].shape) == (1024, 2048)


def test_estimator_takes_r_exactly_when_meanflow():
    mean = synthetic_module(ConditionalDecoder(SMALL.estimator), salt=1).eval()
    plain = synthetic_module(ConditionalDecoder(dataclasses.replace(SMALL.estimator, meanflow=False)), salt=1).eval()
    mu, cond, x, spks = inputs()
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="interval end"):
        mean(x, None, mu, t, spks, cond)
    with pytest.raises(ValueError, match="interval end"):
        plain(x, None, mu, t, spks, cond, r=t)


@torch.inference_mode()
def test_identity_mixer_reduces_to_the_plain_estimator():
    """With the mixer at [I | 0] (the IntMeanFlow initialisation) the r embedding is ignored."""
    mean = synthetic_module(ConditionalDecoder(SMALL.estimator), salt=1).eval()
    plain = synthetic_module(ConditionalDecoder(dataclasses.replace(SMALL.estimator, meanflow=False)), salt=1).eval()
    d = SMALL.estimator.time_embed_dim
    mean.time_embed_mixer.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
    mu, cond, x, spks = inputs()
    t, r = torch.tensor([0.25]), torch.tensor([0.75])
    torch.testing.assert_close(mean(x, None, mu, t, spks, cond, r=r), plain(x, None, mu, t, spks, cond),
                               rtol=1e-5, atol=1e-6)


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_two_plain_euler_steps(batch):
    cfm = synthetic_module(CausalCFM(SMALL), salt=2).eval()
    mu, cond, noise, spks = inputs(batch=batch)
    seen = []
    out = cfm(mu, None, spks, cond, noise, on_step=lambda k, x, t: seen.append((k, float(t))))
    assert out.shape == noise.shape
    assert seen == [(0, 0.0), (1, 0.5)]
    x = noise
    for t, r in ((0.0, 0.5), (0.5, 1.0)):
        v = cfm.estimator(x, None, mu, torch.full((batch,), t), spks, cond, r=torch.full((batch,), r))
        x = x + (r - t) * v
    torch.testing.assert_close(out, x)
    assert torch.isfinite(out).all()


@torch.inference_mode()
def test_mask_of_ones_equals_no_mask():
    cfm = synthetic_module(CausalCFM(SMALL), salt=2).eval()
    mu, cond, noise, spks = inputs()
    ones = torch.ones(1, 1, noise.shape[-1])
    torch.testing.assert_close(cfm(mu, ones, spks, cond, noise), cfm(mu, None, spks, cond, noise))


def test_start_noise_layout():
    frames = torch.randn(1, 80, 50)
    speech = torch.randn(1, 80, 20)
    z = meanflow_start_noise(frames, speech)
    assert torch.equal(z[..., :30], frames[..., :30]) and torch.equal(z[..., 30:], speech)
    with pytest.raises(ValueError, match="longer"):
        meanflow_start_noise(speech, frames)


@torch.inference_mode()
def test_tiny_meanflow_s3gen_renders():
    cfg = S3GenConfig.tiny()
    cfg = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, cfm=dataclasses.replace(
        CFMConfig.small_meanflow(), estimator=dataclasses.replace(cfg.flow.cfm.estimator, meanflow=True))))
    s3gen = synthetic_module(S3Gen(cfg), salt=3).eval()
    ref = S3GenRef(prompt_token=torch.randint(0, 6561, (1, 6)), prompt_token_len=torch.tensor([6]),
                   prompt_feat=torch.randn(1, 12, cfg.flow.n_mels), embedding=torch.randn(1, cfg.flow.spk_embed_dim))
    tokens = torch.randint(0, 6561, (1, 9))
    mel = s3gen.flow_inference(tokens, ref, generator=torch.Generator().manual_seed(0))
    assert mel.shape == (1, cfg.flow.n_mels, 18)
    wav = s3gen.inference(tokens, ref, generator=torch.Generator().manual_seed(0))
    assert wav.shape[0] == 1 and wav.shape[1] % 18 == 0 and torch.isfinite(wav).all()  # whole frames
