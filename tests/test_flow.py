from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DATA, load_fixture

from chatterbox.checkpoint import load_strict
from chatterbox.models.s3gen.conformer import (
    ConformerLayerConfig,
    RelPosSelfAttention,
    rel_pos_table,
    rel_shift,
)
from chatterbox.models.s3gen.cfm import CFMConfig
from chatterbox.models.s3gen.encoder import UpsampleConformerEncoder, UpsampleConformerEncoderConfig
from chatterbox.models.s3gen.flow import FlowConfig, S3GenFlow
from chatterbox.synthetic import synth_state_dict
from tools.parity.runner import compare

RTOL, ATOL = 1e-4, 1e-5
VOCAB = 6561


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _espnet_table(max_len: int, d: int) -> torch.Tensor:
    """ESPnet's precomputed table, written out independently of the model code."""
    pos = torch.arange(0, max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    plus = torch.zeros(max_len, d)
    minus = torch.zeros(max_len, d)
    plus[:, 0::2], plus[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    minus[:, 0::2], minus[:, 1::2] = torch.sin(-1 * pos * div), torch.cos(-1 * pos * div)
    return torch.cat([plus.flip(0), minus[1:]], dim=0)  # (2*max_len-1, d)


@pytest.mark.parametrize("length", [1, 2, 7, 160])
def test_rel_pos_table_is_centre_of_espnet_table(length):
    full = _espnet_table(500, 64)
    centre = full.shape[0] // 2
    want = full[centre - length + 1: centre + length]
    got = rel_pos_table(length, 64, 10000.0)
    assert got.shape == (1, 2 * length - 1, 64)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)


def test_rel_pos_table_rejects_empty():
    with pytest.raises(ValueError, match="length"):
        rel_pos_table(0, 8, 10000.0)


def test_rel_shift_picks_relative_rows():
    b, h, t = 2, 3, 5
    full = torch.randn(b, h, t, 2 * t - 1)
    got = rel_shift(full)
    want = torch.empty(b, h, t, t)
    for i in range(t):
        for j in range(t):
            want[:, :, i, j] = full[:, :, i, t - 1 - i + j]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rel_pos_attention_matches_explicit_scores():
    cfg = ConformerLayerConfig.tiny()
    attn = RelPosSelfAttention(cfg)
    torch.nn.init.normal_(attn.pos_bias_u)
    torch.nn.init.normal_(attn.pos_bias_v)
    x = torch.randn(2, 9, cfg.d_model)
    pos = rel_pos_table(9, cfg.d_model, cfg.pos_base)
    got = attn(x, pos)

    hd, nh, t = cfg.head_dim, cfg.n_heads, 9
    q = attn.linear_q(x).view(2, t, nh, hd)
    k = attn.linear_k(x).view(2, t, nh, hd).transpose(1, 2)
    v = attn.linear_v(x).view(2, t, nh, hd).transpose(1, 2)
    p = attn.linear_pos(pos).view(1, -1, nh, hd).transpose(1, 2)
    ac = ((q + attn.pos_bias_u).transpose(1, 2)) @ k.transpose(-2, -1)
    bd_full = ((q + attn.pos_bias_v).transpose(1, 2)) @ p.transpose(-2, -1)
    idx = torch.arange(t).view(1, t) - torch.arange(t).view(t, 1) + t - 1  # row for (i, j)
    bd = torch.gather(bd_full, -1, idx.expand(2, nh, t, t))
    w = torch.softmax((ac + bd) / math.sqrt(hd), dim=-1)
    want = attn.linear_out((w @ v).transpose(1, 2).reshape(2, t, cfg.d_model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tiny_encoder_shapes_and_modes(n):
    cfg = UpsampleConformerEncoderConfig.tiny()
    enc = UpsampleConformerEncoder(cfg).eval()
    x = torch.randn(1, n, cfg.input_dim)
    y = enc(x)
    assert y.shape == (1, cfg.upsample_stride * n, cfg.d_model)
    with torch.no_grad():
        y_ng = enc(x)
    with torch.inference_mode():
        y_inf = enc(x)
    # SDPA may pick another kernel when autograd records, hence not bit-equal
    torch.testing.assert_close(y_ng, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_inf, y_ng, rtol=0, atol=0)
    # an inference-mode output must not have leaked into module state used in grad mode
    y.sum().backward()


def test_encoder_lookahead_and_causal_conv_reach():
    """Token i's frames see tokens up to i+3 before attention; the upsample conv looks back only."""
    cfg = UpsampleConformerEncoderConfig.tiny()
    enc = UpsampleConformerEncoder(cfg).eval()
    x = torch.randn(1, 8, cfg.input_dim)
    h0, _ = enc.embed(x)
    h1 = enc.pre_lookahead_layer(h0)
    x2 = x.clone()
    x2[:, 6] += 1.0
    h2 = enc.pre_lookahead_layer(enc.embed(x2)[0])
    changed = (h1 - h2).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False, False, False, True, True, True, True, True]
    up1 = enc.up_layer(h1)
    bump = h1.clone()
    bump[:, 4] += 1.0
    up2 = enc.up_layer(bump)
    frames = ((up1 - up2).abs().amax(-1)[0] > 0).nonzero().flatten().tolist()
    assert min(frames) == 8


def test_encoder_rejects_bad_input():
    enc = UpsampleConformerEncoder(UpsampleConformerEncoderConfig.tiny())
    with pytest.raises(ValueError, match="encoder input"):
        enc(torch.randn(1, 0, enc.cfg.input_dim))
    with pytest.raises(ValueError, match="encoder input"):
        enc(torch.randn(1, 4, enc.cfg.input_dim + 1))


# ---------------------------------------------------------------- whole flow


def test_flow_keys_match_manifest():
    manifest = json.loads((DATA / "manifest.json").read_text())
    prefix = "flow."
    want = {e["key"][len(prefix):]: tuple(e["shape"])
            for e in manifest["files"]["s3gen.safetensors"]["entries"] if e["key"].startswith(prefix)}
    with torch.device("meta"):
        flow = S3GenFlow(FlowConfig.published())
    got = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    assert got == want


@pytest.fixture(scope="module")
def published_flow():
    with torch.device("meta"):
        flow = S3GenFlow(FlowConfig.published())
    load_strict(flow, synth_state_dict(flow.state_dict(), prefix="flow."), "flow")
    return flow.eval()


def _ref(fx) -> dict:
    return dict(prompt_token=fx["ref_prompt_token"], prompt_feat=fx["ref_prompt_feat"],
                embedding=fx["ref_embedding"])


def test_flow_parity_final(published_flow):
    """Odd prompt (F = 101 = 2P + 1): 2N - 1 output frames, every intermediate within tolerance."""
    fx = load_fixture("s3gen_flow")
    with torch.inference_mode():
        c = published_flow.prepare(fx["speech_tokens"], finalize=True, **_ref(fx))
        mel = published_flow.decode(c, fx["cfm_noise_final"])
    assert c.prompt_frames == 101 and mel.shape == (1, 80, 2 * fx["speech_tokens"].shape[1] - 1)
    for name, ours in (("encoder_out_final", c.encoder_out), ("mu_final", c.mu), ("spks_final", c.spks),
                       ("cond_final", c.cond), ("mask_final", c.mask), ("mel_final", mel)):
        res = compare(name, ours, fx[name], rtol=RTOL, atol=ATOL)
        assert res.ok, res.line()


def test_flow_parity_stream_conditioning(published_flow):
    """finalize=False drops the last 3 tokens' 6 frames from mu/cond/mask, not from the encoder output."""
    fx = load_fixture("s3gen_flow")
    with torch.inference_mode():
        c = published_flow.prepare(fx["speech_tokens"], finalize=False, **_ref(fx))
    assert c.total_frames == 154
    for name, ours in (("encoder_out_stream", c.encoder_out), ("mu_stream", c.mu), ("cond_stream", c.cond),
                       ("mask_stream", c.mask), ("spks_stream", c.spks)):
        res = compare(name, ours, fx[name], rtol=RTOL, atol=ATOL)
        assert res.ok, res.line()


@pytest.fixture(scope="module")
def tiny_flow():
    torch.manual_seed(3)
    return S3GenFlow(FlowConfig.tiny()).eval()


def _tiny_inputs(flow, n_speech: int, n_prompt: int, n_prompt_frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = flow.cfg
    speech = torch.randint(0, cfg.vocab_size, (1, n_speech), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (1, n_prompt), generator=g)
    feat = torch.randn(1, n_prompt_frames, cfg.n_mels, generator=g)
    emb = torch.randn(1, cfg.spk_embed_dim, generator=g)
    noise = torch.randn(1, cfg.n_mels, 2 * (n_speech + n_prompt) + 5, generator=g)
    return speech, prompt, feat, emb, noise


@pytest.mark.parametrize("n_speech,n_prompt,n_frames,finalize,want", [
    (7, 4, 8, True, 14),  # even prompt: 2N frames
    (7, 4, 9, True, 13),  # odd prompt (F = 2P + 1): 2N - 1 frames
    (7, 4, 8, False, 8),  # non-final: the last 3 tokens' 6 frames are held back
    (7, 4, 9, False, 7),
    (1, 0, 0, True, 2),  # no prompt at all
    (3, 2, 4, False, 0),  # non-final call with nothing left to render
])
def test_tiny_flow_output_lengths(tiny_flow, n_speech, n_prompt, n_frames, finalize, want):
    speech, prompt, feat, emb, noise = _tiny_inputs(tiny_flow, n_speech, n_prompt, n_frames)
    with torch.inference_mode():
        mel = tiny_flow(speech, prompt, feat, emb, noise, finalize=finalize, n_timesteps=2)
    assert mel.shape == (1, tiny_flow.cfg.n_mels, want)
    assert torch.isfinite(mel).all()
    assert tiny_flow.total_frames(n_prompt, n_speech, finalize) == want + n_frames


def test_tiny_flow_matches_prepare_decode_and_uses_noise_prefix(tiny_flow):
    speech, prompt, feat, emb, noise = _tiny_inputs(tiny_flow, 6, 3, 7, seed=1)
    total = tiny_flow.total_frames(3, 6)
    steps = []
    mel = tiny_flow(speech, prompt, feat, emb, noise, n_timesteps=3, on_step=lambda k, x, t: steps.append(k))
    c = tiny_flow.prepare(speech, prompt, feat, emb)
    mel_exact = tiny_flow.decode(c, noise[:, :, :total].clone(), n_timesteps=3)
    torch.testing.assert_close(mel, mel_exact, rtol=0, atol=0)
    assert steps == [0, 1, 2]
    # the prompt frames of cond hold the prompt mel, the rest is zero
    torch.testing.assert_close(c.cond[:, :, :7], feat.transpose(1, 2), rtol=0, atol=0)
    assert not c.cond[:, :, 7:].any()


def test_tiny_flow_grad_modes_agree(tiny_flow):
    speech, prompt, feat, emb, noise = _tiny_inputs(tiny_flow, 5, 2, 4, seed=2)
    args = (speech, prompt, feat, emb, noise)
    with torch.inference_mode():
        a = tiny_flow(*args, n_timesteps=2)
    with torch.no_grad():
        b = tiny_flow(*args, n_timesteps=2)
    c = tiny_flow(*args, n_timesteps=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c.detach(), b, rtol=1e-5, atol=1e-5)
    c.sum().backward()


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1, -1])
def test_flow_rejects_out_of_vocab_ids(tiny_flow, bad):
    speech, prompt, feat, emb, noise = _tiny_inputs(tiny_flow, 5, 2, 4)
    with pytest.raises(ValueError, match=r"speech_tokens holds ids outside \[0, 6561\)"):
        tiny_flow(torch.cat([speech, torch.tensor([[bad]])], dim=1), prompt, feat, emb, noise)
    with pytest.raises(ValueError, match=r"prompt_token holds ids outside"):
        tiny_flow(speech, torch.cat([prompt, torch.tensor([[bad]])], dim=1), feat, emb, noise)
    with pytest.raises(ValueError, match=r"flow tokens holds ids outside"):
        tiny_flow.encode(torch.tensor([[0, bad]]))


def test_flow_rejects_bad_shapes(tiny_flow):
    speech, prompt, feat, emb, noise = _tiny_inputs(tiny_flow, 5, 2, 4)
    with pytest.raises(ValueError, match="integer"):
        tiny_flow(speech.float(), prompt, feat, emb, noise)
    with pytest.raises(ValueError, match=r"shape \(1, N\)"):
        tiny_flow(speech[0], prompt, feat, emb, noise)
    with pytest.raises(ValueError, match="empty"):
        tiny_flow(speech[:, :0], prompt, feat, emb, noise)
    with pytest.raises(ValueError, match="noise must be"):
        tiny_flow(speech, prompt, feat, emb, noise[:, :, :10])
    with pytest.raises(ValueError, match="prompt_feat has 30 frames"):
        tiny_flow(speech, prompt, torch.randn(1, 30, tiny_flow.cfg.n_mels), emb, noise[:, :, :30].repeat(1, 1, 2))
    with pytest.raises(ValueError, match="prompt_feat must be"):
        tiny_flow(speech, prompt, feat.transpose(1, 2), emb, noise)
    with pytest.raises(ValueError, match="speaker embedding"):
        tiny_flow(speech, prompt, feat, emb[:, :-1], noise)


def test_flow_config_rejects_mismatched_estimator():
    with pytest.raises(ValueError, match="mel bins"):
        FlowConfig(cfm=CFMConfig.small())
