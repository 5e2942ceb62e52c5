"""The fused T3 decode (packed projections, stacked cache) against the reference decode."""
from __future__ import annotations

import pytest
import torch

from conftest import random_tiny_t3, run_triton_interpreted

from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.fused_decode import FusedDecoder, allocate_stacked_cache, attention_outputs, stacked_view
from chatterbox.models.t3.llama import KVCache, LlamaConfig, LlamaModel
from chatterbox.models.t3.t3 import T3Config
from chatterbox.opt import OptConfig

# float32 on the CPU: a packed GEMM sums in another order than three separate ones.
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def random_llama(seed: int = 0, cfg: LlamaConfig | None = None) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(cfg or LlamaConfig.tiny())
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval().requires_grad_(False)


tiny_t3 = random_tiny_t3


def t3_inputs(cfg: T3Config) -> tuple[T3Cond, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond = T3Cond(speaker_emb=torch.randn(1, cfg.cond_enc.speaker_embed_size, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 30, (1, 8), generator=g), emotion_adv=0.5)
    text = torch.tensor([[cfg.start_text_token, 3, 4, 5, 6, cfg.stop_text_token]] * 2)
    return cond, text


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query and plain multi-head attention
def test_fused_decode_matches_llama_decode(kv_heads):
    base = LlamaConfig.tiny()
    cfg = LlamaConfig(**{**base.__dict__, "num_kv_heads": kv_heads})
    model = random_llama(cfg=cfg)
    ref_model = random_llama(cfg=cfg)  # same seed: identical weights, never packed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = FusedDecoder.pack(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(2, 7, cfg.hidden_size, generator=g)
    ref_cache = KVCache.allocate(cfg, 2, 16, "cpu", torch.float32)
    cache = allocate_stacked_cache(cfg, 2, 16, "cpu", torch.float32)
    ref_model(prompt, ref_cache)
    model(prompt, cache)  # the packed module's own prefill fills the stacked cache
    for pos in range(7, 12):
        x = torch.randn(2, 1, cfg.hidden_size, generator=g)
        position = torch.tensor([pos])
        want = ref_model.decode(x, position, ref_cache)
        window = KVCache(cache.k[:, :, :, :pos + 2], cache.v[:, :, :, :pos + 2])  # a window, as the graphs use
        got = fused.decode(x, position, window)
        assert float((got - want).abs().max()) <= ATOL
    assert float((cache.k[:, :, :, :12] - ref_cache.k[:, :, :, :12]).abs().max()) <= ATOL
    assert float((cache.v[:, :, :, :12] - ref_cache.v[:, :, :, :12]).abs().max()) <= ATOL


def test_packing_makes_parameters_views_of_one_tensor():
    model = random_llama()
    fused = FusedDecoder.pack(model)
    att = model.layers[0].self_attn
    packed = fused.layers[0].qkv
    assert att.q_proj.weight.data_ptr() == packed.data_ptr()
    assert att.v_proj.weight.data_ptr() == packed[-att.v_proj.weight.shape[0]:].data_ptr()
    assert model.layers[1].mlp.up_proj.weight.data_ptr() == fused.layers[1].gate_up[model.cfg.intermediate_size:].data_ptr()


def test_fused_decode_rejects_a_separate_cache_and_a_wrong_shape():
    model = random_llama()
    fused = FusedDecoder.pack(model)
    cfg = model.cfg
    separate = KVCache.allocate(cfg, 2, 8, "cpu", torch.float32)
    assert stacked_view(separate) is None
    with pytest.raises(ValueError, match="stacked KV cache"):
        fused.decode(torch.zeros(2, 1, cfg.hidden_size), torch.tensor([0]), separate)
    with pytest.raises(ValueError, match="one position"):
        fused.decode(torch.zeros(2, 3, cfg.hidden_size), torch.tensor([0]),
                     allocate_stacked_cache(cfg, 2, 8, "cpu", torch.float32))
    with pytest.raises(ValueError, match="batch"):
        fused.decode(torch.zeros(1, 1, cfg.hidden_size), torch.tensor([0]),
                     allocate_stacked_cache(cfg, 2, 8, "cpu", torch.float32))


def test_with_kernels_calls_the_given_functions():
    model = random_llama()
    calls = []

    def outputs(*args):
        calls.append("out")
        return attention_outputs(*args)

    def norm(*args):
        calls.append("norm")
        from chatterbox.nn.norm import rms_norm
        return rms_norm(*args)

    fused = FusedDecoder.pack(model).with_kernels(outputs, norm)
    cache = allocate_stacked_cache(model.cfg, 2, 8, "cpu", torch.float32)
    fused.decode(torch.randn(2, 1, model.cfg.hidden_size), torch.tensor([0]), cache)
    assert calls == ["norm"] + ["out"] * model.cfg.num_layers


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_with_linear_routes_every_projection_through_it():
    model = random_llama()
    fused = FusedDecoder.pack(model)
    shapes = []

    def linear(x, w):
        shapes.append(tuple(w.shape))
        return torch.nn.functional.linear(x, w)

    cfg = model.cfg
    x, pos = torch.randn(2, 1, cfg.hidden_size), torch.tensor([0])
    want = fused.decode(x, pos, allocate_stacked_cache(cfg, 2, 8, "cpu", torch.float32))
    got = fused.with_linear(linear).decode(x, pos, allocate_stacked_cache(cfg, 2, 8, "cpu", torch.float32))
    assert torch.equal(got, want)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert shapes == [(qkv, cfg.hidden_size), (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
                      (2 * cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)] * cfg.num_layers


def test_t3_gemv_needs_the_fused_decode():
    with pytest.raises(ValueError, match="t3_gemv needs t3_fused_decode"):
        OptConfig.parse("reference+t3_gemv=1")
    assert OptConfig.parse("reference+t3_fused_decode=1+t3_gemv=1").t3_gemv


@pytest.mark.gpu
@gpu
def test_gpu_fused_decode_with_the_small_m_gemv_matches_cublas():
    from chatterbox.kernels.small_m_linear import small_m_linear

    cfg = LlamaConfig.tiny()
    model = random_llama(cfg=cfg).cuda().to(torch.bfloat16)
    fused = FusedDecoder.pack(model)
    x, pos = torch.randn(2, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16), torch.tensor([0], device="cuda")
    with torch.inference_mode():
        want = fused.decode(x, pos, allocate_stacked_cache(cfg, 2, 8, "cuda", torch.bfloat16))
        got = fused.with_linear(small_m_linear).decode(x, pos, allocate_stacked_cache(cfg, 2, 8, "cuda", torch.bfloat16))
    # bf16 outputs of two fp32-accumulating GEMVs that sum in different orders
    assert float((got.float() - want.float()).abs().max()) <= 2e-2 * float(want.float().abs().max())


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_with_attention_routes_each_layer_through_it_and_matches_sdpa(kv_heads):
    from chatterbox.kernels.decode_attention import reference_decode_attention

    base = LlamaConfig.tiny()
    cfg = LlamaConfig(**{**base.__dict__, "num_kv_heads": kv_heads})
    fused = FusedDecoder.pack(random_llama(cfg=cfg))
    calls = []

    def attend(qkv, cos, sin, layer_kv, position, heads, kv_h):
        calls.append((tuple(qkv.shape), tuple(layer_kv.shape), heads, kv_h))
        return reference_decode_attention(qkv, cos, sin, layer_kv, position, heads, kv_h)

    g = torch.Generator().manual_seed(5)
    cache_a = allocate_stacked_cache(cfg, 2, 16, "cpu", torch.float32)
    cache_b = allocate_stacked_cache(cfg, 2, 16, "cpu", torch.float32)
    routed = fused.with_attention(attend)
    for pos in range(6):
        x, position = torch.randn(2, 1, cfg.hidden_size, generator=g), torch.tensor([pos])
        want = fused.decode(x, position, KVCache(cache_a.k[:, :, :, :8], cache_a.v[:, :, :, :8]))
        got = routed.decode(x, position, KVCache(cache_b.k[:, :, :, :8], cache_b.v[:, :, :, :8]))
        assert float((got - want).abs().max()) <= ATOL
    assert float((cache_a.k - cache_b.k).abs().max()) <= ATOL and float((cache_a.v - cache_b.v).abs().max()) <= ATOL
    heads = cfg.num_heads + 2 * kv_heads
    assert calls[:cfg.num_layers] == [((2, heads, cfg.head_dim), (2, 2, kv_heads, 8, cfg.head_dim), cfg.num_heads,
                                        kv_heads)] * cfg.num_layers


def test_t3_decode_attention_needs_the_fused_decode():
    with pytest.raises(ValueError, match="t3_decode_attention needs t3_fused_decode"):
        OptConfig.parse("reference+t3_decode_attention=1")
    assert OptConfig.parse("reference+t3_fused_decode=1+t3_decode_attention=1").t3_decode_attention


@pytest.mark.gpu
@gpu
def test_gpu_fused_decode_with_the_triton_attention_matches_sdpa():
    from chatterbox.kernels.decode_attention import decode_attention

    cfg = LlamaConfig.tiny()
    fused = FusedDecoder.pack(random_llama(cfg=cfg).cuda().to(torch.bfloat16))
    cache_a = allocate_stacked_cache(cfg, 2, 64, "cuda", torch.bfloat16)
    cache_b = allocate_stacked_cache(cfg, 2, 64, "cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.inference_mode():
        for pos in range(40):
            x = torch.randn(2, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
            position = torch.tensor([pos], device="cuda")
            want = fused.decode(x, position, cache_a)
            got = fused.with_attention(decode_attention).decode(x, position, cache_b)
            assert float((got.float() - want.float()).abs().max()) <= 3e-2 * float(want.float().abs().max())


TABLE_CHECK = """
import json, sys
import torch
from chatterbox.models.t3.fused_decode import FusedDecoder, allocate_stacked_cache
from chatterbox.models.t3.llama import KVCache, LlamaConfig, LlamaModel

torch.manual_seed(0)
cfg = LlamaConfig.tiny()
model = LlamaModel(cfg)
for p in model.parameters():
    p.data.normal_(0, 0.2)
model = model.eval().requires_grad_(False)
ref = LlamaModel(cfg)
ref.load_state_dict(model.state_dict())
ref = ref.eval()
res = {}
for fusion in (False, True):
    fused = FusedDecoder.pack(model, gemv_fusion=fusion)
    g = torch.Generator().manual_seed(1)
    # two requests with prompts of 7 and 5 positions and caches of 16 and 12 slots
    prompts = [torch.randn(2, n, cfg.hidden_size, generator=g) for n in (7, 5)]
    caches = [allocate_stacked_cache(cfg, 2, n, "cpu", torch.float32) for n in (16, 12)]
    refs = [KVCache.allocate(cfg, 2, n, "cpu", torch.float32) for n in (16, 12)]
    ptr = lambda cs: torch.tensor([c.k.data_ptr() for c in cs])
    lens = torch.tensor([16, 12])
    err = 0.0
    for i in range(2):
        hidden = fused.prefill_table(prompts[i], ptr(caches[i:i + 1]), lens[i:i + 1])
        want = ref(prompts[i], refs[i])
        err = max(err, float((hidden - want).abs().max()))
        n = prompts[i].shape[1]
        err = max(err, float((caches[i].k[:, :, :, :n] - refs[i].k[:, :, :, :n]).abs().max()))
    pos = [7, 5]
    for step in range(4):
        x = torch.randn(4, 1, cfg.hidden_size, generator=g)
        got = fused.decode_table(x, torch.tensor(pos), ptr(caches), lens, window=16)
        for i in range(2):
            want = ref.decode(x[2 * i:2 * i + 2], torch.tensor([pos[i]]), refs[i])
            err = max(err, float((got[2 * i:2 * i + 2] - want).abs().max()))
        pos = [p + 1 for p in pos]
    res[f"fusion={fusion}"] = err
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def table_errors() -> dict:
    return run_triton_interpreted(TABLE_CHECK, "")


@pytest.mark.parametrize("fusion", [False, True])
def test_interpreted_table_prefill_and_decode_equal_the_llama_model(table_errors, fusion):
    """Two requests with their own caches, prompts and positions, prefilled and decoded through the
    cache tables (the graphed runner's path, Triton under the interpreter) equal the reference model."""
    assert table_errors[f"fusion={fusion}"] <= 2e-5, table_errors
