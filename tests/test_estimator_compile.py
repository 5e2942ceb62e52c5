"""ConditionalDecoder under torch.compile (one graph, no breaks) and its shared-work simplifications.

The estimator masks each stage input once, applies Mish to the time embedding once and runs q/k/v
as one GEMM. ``_straightforward`` below spells the computation out the plain way (every block masks
its own input, Mish per resnet, three projections, transpose + copy after each transformer stack);
the module must match it within 1e-6 in float32 (bit-identical on CPU, the tolerance only covers
a BLAS that splits the stacked q/k/v product differently from three separate ones).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatterbox.checkpoint import load_strict
from chatterbox.models.s3gen.decoder import ConditionalDecoder, ConditionalDecoderConfig
from chatterbox.models.s3gen.decoder_blocks import (
    CausalBlock1D,
    CausalResnetBlock1D,
    TransformerBlock,
    apply_mask,
    channels_first,
    key_padding_bias,
    sinusoidal_embedding,
)
from chatterbox.synthetic import synth_state_dict

ATOL = 1e-6  # float32, vs the straightforward formulation
LENGTHS = (16, 24)  # two frame counts for the compiled estimator
PAD = 5  # padded frames at the end of the masked inputs


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _estimator(seed: int = 0) -> ConditionalDecoder:
    est = ConditionalDecoder(ConditionalDecoderConfig.small())
    load_strict(est, synth_state_dict(est.state_dict(), prefix="flow.decoder.estimator.", salt=seed), "small")
    return est.eval()


def _inputs(b: int, t: int, mask_kind: str, seed: int = 3):
    cfg = ConditionalDecoderConfig.small()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.n_feats, t, generator=g)
    mu = torch.randn(b, cfg.n_feats, t, generator=g)
    cond = torch.randn(b, cfg.n_feats, t, generator=g)
    spks = torch.randn(b, cfg.spk_dim, generator=g)
    times = torch.rand(b, generator=g)
    if mask_kind == "none":
        mask = None
    else:
        mask = torch.ones(b, 1, t)
        mask[..., t - PAD:] = 0
        if mask_kind == "padded_row":
            mask[-1] = 0  # one row entirely padded
    return x, mask, mu, times, spks, cond


# ------------------------------------------------------------------ the plain formulation
def _block(block: CausalBlock1D, x, mask):
    conv, _, norm = block.block
    return apply_mask(F.mish(norm(conv(apply_mask(x, mask)))), mask)


def _resnet(res: CausalResnetBlock1D, x, mask, t_emb):
    h = _block(res.block1, x, mask)
    h = h + res.mlp[1](F.mish(t_emb)).unsqueeze(-1)
    h = _block(res.block2, h, mask)
    return h + res.res_conv(apply_mask(x, mask))


def _transformer(blk: TransformerBlock, x, bias):
    attn = blk.attn1
    b, t, _ = x.shape
    n = blk.norm1(x)

    def heads(y):
        return y.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)

    q, k, v = heads(attn.to_q(n)), heads(attn.to_k(n)), heads(attn.to_v(n))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, -1)
    x = attn.to_out[0](a) + x
    return blk.ff(blk.norm3(x)) + x


def _stack(blocks, x, bias):
    h = x.transpose(1, 2)
    for blk in blocks:
        h = _transformer(blk, h, bias)
    return h.transpose(1, 2).contiguous()


def _straightforward(est: ConditionalDecoder, x, mask, mu, t, spks, cond):
    cfg = est.cfg
    t_emb = est.time_mlp(sinusoidal_embedding(t, cfg.in_channels, cfg.time_scale, cfg.max_period))
    h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)
    bias = key_padding_bias(mask, h.dtype)
    res, blocks, conv = est.down_blocks[0]
    h = _stack(blocks, _resnet(res, h, mask, t_emb), bias)
    skip = h
    h = conv(apply_mask(h, mask))
    for res, blocks in est.mid_blocks:
        h = _stack(blocks, _resnet(res, h, mask, t_emb), bias)
    res, blocks, conv = est.up_blocks[0]
    h = _stack(blocks, _resnet(res, torch.cat([h, skip], dim=1), mask, t_emb), bias)
    h = _block(est.final_block, conv(apply_mask(h, mask)), mask)
    return apply_mask(est.final_proj(apply_mask(h, mask)), mask)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("mask_kind", ["padded", "padded_row", "none"])
@pytest.mark.parametrize("grad", [False, True])
def test_matches_straightforward_formulation(mask_kind, grad):
    est = _estimator()
    args = _inputs(2, 20, mask_kind)
    with torch.set_grad_enabled(grad):
        out = est(*args)
        ref = _straightforward(est, *args)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("grad", [False, True])
def test_channels_first_is_the_masked_copy(grad):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, 6, generator=g, requires_grad=grad)  # (B, T, C)
    mask = (torch.rand(3, 1, 7, generator=g) > 0.4).float()
    with torch.set_grad_enabled(grad):
        out = channels_first(h, mask)
    want = apply_mask(h.transpose(1, 2).contiguous(), mask)
    assert out.shape == (3, 6, 7) and out.is_contiguous()
    # bit-identical, signed zeros included
    assert torch.equal(out.detach().view(torch.int32), want.detach().view(torch.int32))
    unmasked = channels_first(h, None)
    assert unmasked.is_contiguous() and torch.equal(unmasked, h.transpose(1, 2))


def test_channels_first_promotes_like_the_product():
    h = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 5)
    with torch.no_grad():
        out = channels_first(h, mask)
    assert out.dtype == (h.transpose(1, 2) * mask).dtype == torch.float32


@pytest.mark.parametrize("mask_kind", ["padded", "none"])
def test_fullgraph_compile_matches_eager(mask_kind):
    est = _estimator(seed=1)
    compiled = torch.compile(est.forward, fullgraph=True, backend="eager")  # raises on any graph break
    with torch.inference_mode():
        for t in LENGTHS:
            args = _inputs(2, t, mask_kind, seed=t)
            assert torch.equal(compiled(*args), est(*args))


def test_explain_one_graph_and_lengths_recompile_at_most_once():
    est = _estimator(seed=2)
    with torch.inference_mode():
        explained = torch._dynamo.explain(est.forward)(*_inputs(2, LENGTHS[0], "padded"))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert not explained.break_reasons

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(est.forward, backend=counter, dynamic=None)
    with torch.inference_mode():
        for t in (*LENGTHS, 40):
            compiled(*_inputs(2, t, "padded", seed=t))
    # the first length compiles static, the second once more with a symbolic length, then no more
    assert counter.frame_count == 2
