"""The fused T3 decode (packed projections, stacked cache) against the reference decode."""
from __future__ import annotations

import pytest
import torch

from chatterbox.graphed import T3GraphDecoder
from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.fused_decode import (FusedDecoder, allocate_stacked_cache, attention_inputs,
                                               attention_outputs, stacked_view)
from chatterbox.models.t3.llama import KVCache, LlamaConfig, LlamaModel
from chatterbox.models.t3.t3 import T3, T3Config
from chatterbox.opt import OptConfig
from chatterbox.passes import apply_to_components

# float32 on the CPU: a packed GEMM sums in another order than three separate ones.
ATOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_llama(seed: int = 0, cfg: LlamaConfig | None = None) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(cfg or LlamaConfig.tiny())
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval().requires_grad_(False)


def tiny_t3(seed: int = 0) -> T3:
    torch.manual_seed(seed)
    t3 = T3(T3Config.tiny())
    for p in t3.parameters():
        p.data.normal_(0, 0.3)
    return t3.eval().requires_grad_(False)


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

    def inputs(*args):
        calls.append("in")
        return attention_inputs(*args)

    def outputs(*args):
        calls.append("out")
        return attention_outputs(*args)

    fused = FusedDecoder.pack(model).with_kernels(inputs, outputs)
    cache = allocate_stacked_cache(model.cfg, 2, 8, "cpu", torch.float32)
    fused.decode(torch.randn(2, 1, model.cfg.hidden_size), torch.tensor([0]), cache)
    assert calls == ["in", "out"] * model.cfg.num_layers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_t3_generation_with_the_fused_decoder_equals_the_eager_loop(dtype):
    t3, ref = tiny_t3(), tiny_t3()
    if dtype != "float32":
        for m in (t3, ref):
            apply_to_components([("t3", m)], OptConfig.reference().with_component("t3", dtype=dtype))
    cond, text = t3_inputs(t3.cfg)
    decoder = T3GraphDecoder(t3, window=8, enabled=False, fused=FusedDecoder.pack(t3.tfmr))
    for seed in range(3):
        g_ref, g_fused = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            want = ref.inference(cond, text, 25, generator=g_ref, top_p=0.9, min_p=0.05, stop_check_every=4)
        with torch.no_grad():
            got = t3.inference(cond, text, 25, generator=g_fused, top_p=0.9, min_p=0.05, stop_check_every=4,
                               decoder=decoder)
        if dtype == "float32":
            assert got.tolist() == want.tolist()
            assert torch.equal(g_ref.get_state(), g_fused.get_state())
        else:  # bf16 GEMMs in another grouping may flip a near-tie draw; most tokens must agree
            n = min(got.shape[1], want.shape[1])
            agree = (got[0, :n] == want[0, :n]).float().mean()
            assert float(agree) >= 0.5


def tiny_pipeline():
    """A stand-in for ChatterboxTTS holding tiny T3, S3Gen and voice encoder (what apply_opt reads)."""
    from types import SimpleNamespace

    from chatterbox.models.s3gen.flow import FlowConfig
    from chatterbox.models.s3gen.hift import HiFTConfig, fold_weight_norm
    from chatterbox.models.s3gen.s3gen import S3Gen, S3GenConfig
    from chatterbox.models.s3gen.xvector import CAMPPlusConfig
    from chatterbox.models.s3tokenizer import S3TokenizerConfig
    from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    cfg = S3GenConfig(tokenizer=S3TokenizerConfig.tiny(), speaker_encoder=CAMPPlusConfig.tiny(),
                      flow=FlowConfig.tiny(), hift=HiFTConfig.tiny())
    s3gen = S3Gen(cfg)
    fold_weight_norm(s3gen.mel2wav)
    return SimpleNamespace(t3=tiny_t3(), s3gen=s3gen.eval(), ve=VoiceEncoder(VoiceEncoderConfig.tiny()).eval())


def test_opt_switch_builds_a_fused_decoder_and_reverts():
    from chatterbox.passes import apply_opt

    p = tiny_pipeline()
    state = apply_opt(p, OptConfig.parse("reference+t3_fused_decode=1+t3.compile=default"))
    dec = state.t3_decoder
    assert isinstance(dec, T3GraphDecoder) and dec.fused is not None and dec.enabled is False
    assert dec.fused.inputs_fn is attention_inputs  # compiled on CUDA only; eager here
    assert apply_opt(p, OptConfig.parse("reference+t3_fused_decode=1+t3.compile=default")).t3_decoder is dec
    assert apply_opt(p, OptConfig.reference()).t3_decoder is None


def test_t3_generation_with_gemv_fusion_equals_the_eager_loop():
    t3, ref = tiny_t3(), tiny_t3()
    cond, text = t3_inputs(t3.cfg)
    fused = FusedDecoder.pack(t3.tfmr, interleave_gate_up=True).with_gemv_fusion()
    decoder = T3GraphDecoder(t3, window=8, enabled=False, fused=fused)
    for seed in range(3):
        g_ref, g_fused = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            want = ref.inference(cond, text, 25, generator=g_ref, top_p=0.9, min_p=0.05, stop_check_every=4)
            got = t3.inference(cond, text, 25, generator=g_fused, top_p=0.9, min_p=0.05, stop_check_every=4,
                               decoder=decoder)
        assert got.tolist() == want.tolist()
        assert torch.equal(g_ref.get_state(), g_fused.get_state())


def test_opt_switch_with_the_new_t3_kernels_keeps_the_weights():
    from chatterbox.passes import apply_opt

    p = tiny_pipeline()
    t3 = p.t3
    before = {k: v.clone() for k, v in t3.state_dict().items()}
    state = apply_opt(p, OptConfig.parse("reference+t3_fused_decode=1+t3_decode_attention=1+t3_gemv_fusion=1"))
    fused = state.t3_decoder.fused
    assert fused.gemv_fusion and fused.gate_up_interleaved
    assert fused.attend_fn is None  # the Triton attention is CUDA-only; the torch reference runs here
    after = t3.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert apply_opt(p, OptConfig.reference()).t3_decoder is None
    assert all(torch.equal(t3.state_dict()[k], before[k]) for k in before)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_gpu_graphed_fused_decoder_matches_the_eager_loop(compile_mode):
    t3, ref = tiny_t3().cuda(), tiny_t3().cuda()
    cond, text = t3_inputs(t3.cfg)
    cond, text = cond.to("cuda"), text.cuda()
    fused = FusedDecoder.pack(t3.tfmr)
    if compile_mode is not None:
        fused = fused.with_kernels(torch.compile(attention_inputs, fullgraph=True, dynamic=False),
                                   torch.compile(attention_outputs, fullgraph=True, dynamic=False))
    decoder = T3GraphDecoder(t3, window=8, fused=fused)
    for seed in range(3):
        g1, g2 = torch.Generator("cuda").manual_seed(seed), torch.Generator("cuda").manual_seed(seed)
        with torch.inference_mode():
            want = ref.inference(cond, text, 30, generator=g1, top_p=0.9)
            got = t3.inference(cond, text, 30, generator=g2, top_p=0.9, decoder=decoder)
        n = min(got.shape[1], want.shape[1])
        # float32 on the GPU: packed GEMMs and fused kernels round differently; a near tie may flip a draw
        assert float((got[0, :n] == want[0, :n]).float().mean()) >= 0.9
    assert any(g.captured for g in decoder._graphs.values())


@pytest.mark.gpu
@gpu
def test_gpu_graphed_prefill_pads_and_matches_the_eager_prefill():
    t3 = tiny_t3().cuda()
    cond, text = t3_inputs(t3.cfg)
    cond, text = cond.to("cuda"), text.cuda()
    decoder = T3GraphDecoder(t3, window=8, prefill_bucket=16)
    with torch.inference_mode():
        embeds = t3._bos_prefill(cond, text)  # not a multiple of 16 positions
        assert embeds.shape[1] % 16
        cache = decoder.cache(embeds.shape[1] + 4, embeds.device, embeds.dtype)
        got = decoder.prefill(embeds, cache)
        again = decoder.prefill(embeds, cache)  # replay
        ref_cache = t3.init_cache(2, embeds.shape[1], embeds.device, embeds.dtype)
        want = t3.prefill(embeds, ref_cache)
    assert cache.max_len >= decoder.prefill_length(embeds.shape[1])
    assert float((got - want).abs().max()) <= 1e-4 and torch.equal(got, again)
    n = embeds.shape[1]
    assert float((cache.k[:, :, :, :n] - ref_cache.k).abs().max()) <= 1e-4
    assert len(decoder._prefill_graphs) == 1


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


def _pick_inputs(seed: int, device: str = "cpu"):
    from chatterbox.models.t3.sampling import SamplingConfig

    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(2, 300, generator=g, device=device) * 3
    seen = torch.rand(1, 300, generator=g, device=device) < 0.1
    return logits, seen, SamplingConfig.resemble(), g


def test_race_pick_equals_processing_then_race_draw():
    from chatterbox.graphed import race_draw
    from chatterbox.models.t3.sampling import cfg_mix, process_logits, race_pick

    for seed in range(5):
        logits, seen, cfg, g = _pick_inputs(seed)
        state = g.get_state()
        probs = process_logits(cfg_mix(logits[0:1], logits[1:2], cfg.cfg_weight), seen, cfg).softmax(dim=-1)
        want = race_draw(probs, g)
        g.set_state(state)
        race = torch.empty_like(logits[0:1]).exponential_(1, generator=g)
        assert torch.equal(race_pick(logits, seen, race, cfg), want)


def test_race_pick_traces_whole_under_torch_compile():
    from chatterbox.models.t3.sampling import race_pick

    compiled = torch.compile(race_pick, backend="aot_eager", fullgraph=True, dynamic=False)
    for seed in range(3):
        logits, seen, cfg, g = _pick_inputs(seed)
        race = torch.empty_like(logits[0:1]).exponential_(1, generator=g)
        assert torch.equal(compiled(logits, seen, race, cfg), race_pick(logits, seen, race, cfg))


@pytest.mark.gpu
@gpu
def test_gpu_inductor_race_pick_matches_eager():
    from chatterbox.models.t3.sampling import race_pick

    compiled = torch.compile(race_pick, fullgraph=True, dynamic=False)
    same = 0
    for seed in range(40):
        logits, seen, cfg, g = _pick_inputs(seed, "cuda")
        race = torch.empty_like(logits[0:1]).exponential_(1, generator=g)
        same += int(torch.equal(compiled(logits, seen, race, cfg), race_pick(logits, seen, race, cfg)))
    assert same >= 39  # fp32 reductions in another order may flip a near-tie, nothing more


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("stop_at", [None, 0, 3, 4, 9, 15])
def test_gpu_lagged_stop_check_yields_what_the_immediate_check_yields(stop_at):
    t3 = tiny_t3().cuda()
    stop = t3.cfg.stop_speech_token
    ids = [5 + (i % 7) for i in range(16)]
    if stop_at is not None:
        ids[stop_at] = stop
    make = lambda: iter(torch.tensor([[i]], device="cuda") for i in ids)  # noqa: E731
    for block in (1, 4, 5):
        want = [c.tolist() for c in t3._stop_checked_blocks(make(), len(ids), block)]
        got = [c.tolist() for c in t3._lagged_stop_checked_blocks(make(), len(ids), block)]
        assert got == want
