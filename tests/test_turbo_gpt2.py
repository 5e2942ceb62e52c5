"""GPT-2 backbone of Turbo/Nano: static-cache decode equals a full recompute, layout and limits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatterbox.models.t3_turbo.gpt2 import Conv1D, GPT2Config, GPT2Model, gelu_tanh
from chatterbox.synthetic import synthetic_module

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = GPT2Config.tiny()


def tiny_gpt2(salt: int = 5) -> GPT2Model:
    return synthetic_module(GPT2Model(CFG), salt=salt).eval()


def test_presets_match_upstream_sizes():
    medium, small = GPT2Config.medium(), GPT2Config.small()
    assert (medium.hidden_size, medium.num_layers, medium.num_heads, medium.head_dim) == (1024, 24, 16, 64)
    assert (small.hidden_size, small.num_layers, small.num_heads, small.head_dim) == (768, 12, 12, 64)
    assert medium.max_position_embeddings == small.max_position_embeddings == 8196
    assert medium.intermediate_size == 4096 and medium.layer_norm_eps == 1e-5


def test_checkpoint_layout():
    with torch.device("meta"):
        model = GPT2Model(GPT2Config.medium())
    sd = model.state_dict()
    assert tuple(sd["h.0.attn.c_attn.weight"].shape) == (1024, 3072)  # Conv1D: (in, out)
    assert tuple(sd["h.0.mlp.c_proj.weight"].shape) == (4096, 1024)
    assert tuple(sd["wpe.weight"].shape) == (8196, 1024)
    assert "wte.weight" not in sd
    assert len(sd) == 1 + 24 * 12 + 2  # wpe, 12 tensors a block, ln_f


def test_conv1d_is_x_at_weight_plus_bias():
    layer = Conv1D(5, 3)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
    want = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))  # x = 1: x + 0.044715 x^3
    assert gelu_tanh(torch.tensor([1.0])).item() == pytest.approx(want)


def test_positions_are_learned_over_the_whole_sequence():
    model = tiny_gpt2()
    x = torch.zeros(1, 3, CFG.hidden_size)
    with torch.no_grad():
        model.wpe.weight[1].add_(1.0)  # only position 1 changes
        out_a = model(x)
        model.wpe.weight[1].sub_(1.0)
        out_b = model(x)
    assert torch.equal(out_a[:, 0], out_b[:, 0])  # causal: position 0 never sees position 1
    assert not torch.allclose(out_a[:, 1], out_b[:, 1])


@torch.inference_mode()
def test_prefill_then_decode_equals_full_recompute():
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, CFG.hidden_size, generator=g)
    full = model(x)
    cache = model.init_cache(2, 16, "cpu", torch.float32)
    prefill = model(x[:, :8], cache)
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-5, atol=1e-5)
    for pos in range(8, 13):
        step = model.decode(x[:, pos:pos + 1], torch.tensor([pos]), cache)
        torch.testing.assert_close(step[:, 0], full[:, pos], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_decode_of_several_positions_at_once():
    model = tiny_gpt2()
    x = torch.randn(1, 10, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    full = model(x)
    cache = model.init_cache(1, 10, "cpu", torch.float32)
    model(x[:, :6], cache)
    out = model.decode(x[:, 6:], torch.arange(6, 10), cache)
    torch.testing.assert_close(out, full[:, 6:], rtol=1e-5, atol=1e-5)


def test_limits():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="position table"):
        model(torch.zeros(1, CFG.max_position_embeddings + 1, CFG.hidden_size))
    with pytest.raises(ValueError, match="cache length"):
        model.init_cache(1, CFG.max_position_embeddings + 1, "cpu", torch.float32)
    cache = model.init_cache(1, 4, "cpu", torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 5, CFG.hidden_size), cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 3, CFG.hidden_size), cache)
    with pytest.raises(ValueError, match="multiple"):
        GPT2Config(hidden_size=10, num_layers=1, num_heads=3, max_position_embeddings=8)
