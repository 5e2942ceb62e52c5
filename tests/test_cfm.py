"""CFM sampler and its ConditionalDecoder estimator: parity with s3gen_flow.safetensors, masking, API."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DATA, load_fixture

from chatterbox.checkpoint import load_strict
from chatterbox.models.s3gen.cfm import CausalCFM, CFMConfig, cosine_timesteps
from chatterbox.models.s3gen.decoder import ConditionalDecoder, ConditionalDecoderConfig
from chatterbox.synthetic import synth_state_dict
from tools.parity.runner import compare

RTOL, ATOL = 1e-4, 1e-5  # FIXTURES.md "accept" for est0_out, euler_x_in_steps_final, mel_final
PROMPT_FRAMES = 101  # mel_len1 of the fixture: the output mel starts after the prompt frames


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def flow_fx():
    return load_fixture("s3gen_flow")


@pytest.fixture(scope="module")
def published_cfm() -> CausalCFM:
    with torch.device("meta"):
        cfm = CausalCFM(CFMConfig.published())
    load_strict(cfm, synth_state_dict(cfm.state_dict(), prefix="flow.decoder."), "flow.decoder")
    return cfm.eval()


def _small_cfm(seed: int = 0) -> CausalCFM:
    cfm = CausalCFM(CFMConfig.small())
    load_strict(cfm, synth_state_dict(cfm.state_dict(), prefix="flow.decoder.", salt=seed), "small")
    return cfm.eval()


def _small_inputs(b: int, t: int, seed: int = 1):
    cfg = CFMConfig.small().estimator
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, cfg.n_feats, t, generator=g)
    spks = torch.randn(b, cfg.spk_dim, generator=g)
    cond = torch.randn(b, cfg.n_feats, t, generator=g)
    noise = torch.randn(b, cfg.n_feats, t, generator=g)
    return mu, spks, cond, noise


def _check(name, ours, ref):
    c = compare(name, ours, ref, rtol=RTOL, atol=ATOL)
    assert c.ok, c.line()


def test_estimator_keys_match_manifest():
    manifest = json.loads((DATA / "manifest.json").read_text())
    prefix = "flow.decoder.estimator."
    want = {e["key"][len(prefix):]: tuple(e["shape"])
            for e in manifest["files"]["s3gen.safetensors"]["entries"] if e["key"].startswith(prefix)}
    with torch.device("meta"):
        est = ConditionalDecoder(ConditionalDecoderConfig.published())
    got = {k: tuple(v.shape) for k, v in est.state_dict().items()}
    assert got == want


def test_estimator_parity_est0(flow_fx, published_cfm):
    est = published_cfm.estimator
    args = [flow_fx[f"est0_{n}"] for n in ("x", "mask", "mu", "t", "spks", "cond")]
    with torch.inference_mode():
        out = est(*args)
        unmasked = est(args[0], None, *args[2:])
    _check("est0_out", out, flow_fx["est0_out"])
    # the fixture's mask is all ones, so the no-padding path must give the same velocity
    torch.testing.assert_close(unmasked, out, rtol=0, atol=1e-6)


def test_cfm_parity_final(flow_fx, published_cfm):
    xs, ts = [], []
    with torch.inference_mode():
        out = published_cfm(flow_fx["mu_final"], flow_fx["mask_final"], flow_fx["spks_final"],
                            flow_fx["cond_final"], flow_fx["cfm_noise_final"],
                            on_step=lambda k, x, t: (xs.append(x), ts.append(t)))
    assert len(xs) == 10
    _check("euler_x_in_steps_final", torch.cat(xs, dim=0), flow_fx["euler_x_in_steps_final"])
    # the accumulated t is bit-exact with upstream's
    assert torch.equal(torch.stack(ts), flow_fx["euler_t_final"])
    _check("mel_final", out[..., PROMPT_FRAMES:], flow_fx["mel_final"])


def test_cosine_timesteps():
    ts = cosine_timesteps(10)
    assert ts.shape == (11,)
    want = torch.tensor([1 - math.cos(k / 10 * math.pi / 2) for k in range(11)], dtype=torch.float64)
    torch.testing.assert_close(ts.double(), want, rtol=0, atol=1e-6)
    assert ts[0] == 0 and ts[-1] == 1


def test_step_count_and_shapes():
    cfm = _small_cfm()
    mu, spks, cond, noise = _small_inputs(1, 12)
    mask = torch.ones(1, 1, 12)
    for n in (1, 10):
        seen = []
        out = cfm(mu, mask, spks, cond, noise, n_timesteps=n, on_step=lambda k, x, t: seen.append((k, t)))
        assert out.shape == mu.shape
        assert [k for k, _ in seen] == list(range(n))
        torch.testing.assert_close(torch.stack([t for _, t in seen]), cosine_timesteps(n)[:n], rtol=0, atol=0)
    # one step: a single Euler step of size 1 from t = 0 with the guided velocity
    out1 = cfm(mu, mask, spks, cond, noise, n_timesteps=1)
    z = torch.zeros_like(mu)
    est = cfm.estimator
    t0 = torch.zeros(1)
    v = 1.7 * est(noise, mask, mu, t0, spks, cond) - 0.7 * est(noise, mask, z, t0, torch.zeros_like(spks), z)
    torch.testing.assert_close(out1, noise + v, rtol=1e-5, atol=1e-5)
    # default step count comes from the config
    calls = []
    cfm(mu, mask, spks, cond, noise, on_step=lambda k, x, t: calls.append(k))
    assert len(calls) == CFMConfig.small().n_timesteps


def test_padded_tail_does_not_touch_valid_frames():
    # Convolutions are causal and attention masks padded keys, so frames before the padding do not
    # see it; padded frames get zero velocity and keep their start noise.
    cfm = _small_cfm()
    valid, total = 9, 15
    mu, spks, cond, noise = _small_inputs(1, total)
    garbage = torch.randn(1, mu.shape[1], total - valid) * 100
    mu_p = torch.cat([mu[..., :valid], garbage], dim=-1)
    cond_p = torch.cat([cond[..., :valid], -garbage], dim=-1)
    mask = torch.cat([torch.ones(1, 1, valid), torch.zeros(1, 1, total - valid)], dim=-1)

    ref = cfm(mu[..., :valid], None, spks, cond[..., :valid], noise[..., :valid])
    out = cfm(mu_p, mask, spks, cond_p, noise)
    torch.testing.assert_close(out[..., :valid], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., valid:], noise[..., valid:])

    v = cfm.estimator(noise, mask, mu_p, torch.full((1,), 0.3), spks, cond_p)
    assert torch.equal(v[..., valid:], torch.zeros_like(v[..., valid:]))


def test_batch_rows_independent_and_fully_padded_row_finite():
    cfm = _small_cfm()
    mu, spks, cond, noise = _small_inputs(2, 10)
    mask = torch.ones(2, 1, 10)
    mask_b = torch.cat([mask[:1], torch.zeros(1, 1, 10)], dim=0)  # row 1 entirely padded
    out = cfm(mu, mask_b, spks, cond, noise, n_timesteps=3)
    assert torch.isfinite(out).all()
    single = cfm(mu[:1], mask[:1], spks[:1], cond[:1], noise[:1], n_timesteps=3)
    torch.testing.assert_close(out[:1], single, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1:], noise[1:])


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "plain"])
def test_modes_and_inputs_untouched(mode):
    cfm = _small_cfm()
    mu, spks, cond, noise = _small_inputs(1, 8)
    mask = torch.ones(1, 1, 8)
    before = [a.clone() for a in (mu, spks, cond, noise, mask)]
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(mode)
    if ctx is None:
        out = cfm(mu, mask, spks, cond, noise, n_timesteps=2)
    else:
        with ctx():
            out = cfm(mu, mask, spks, cond, noise, n_timesteps=2)
    assert torch.isfinite(out).all()
    for a, b in zip((mu, spks, cond, noise, mask), before):
        assert torch.equal(a, b)
    if mode == "plain":
        out.sum().backward()  # autograd works through the whole solver


def test_bad_inputs_raise():
    cfm = _small_cfm()
    mu, spks, cond, noise = _small_inputs(1, 8)
    mask = torch.ones(1, 1, 8)
    with pytest.raises(ValueError, match="n_timesteps"):
        cfm(mu, mask, spks, cond, noise, n_timesteps=0)
    with pytest.raises(ValueError, match="noise"):
        cfm(mu, mask, spks, cond, noise[..., :5])
    with pytest.raises(ValueError, match="spks"):
        cfm(mu, mask, spks[:, :3], cond, noise)
    with pytest.raises(ValueError, match="mask"):
        cfm(mu, mask[..., :4], spks, cond, noise)
    with pytest.raises(ValueError, match="x must be"):
        cfm.estimator(torch.zeros(1, 3, 8), None, torch.zeros(1, 3, 8), torch.zeros(1), spks, torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="t_scheduler"):
        CFMConfig(t_scheduler="sigmoid")
