"""T3: parity against upstream (full size), static KV cache vs recompute, generation and stop handling."""
from __future__ import annotations

import gc
import json

import pytest
import torch

from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.llama import KVCache, LlamaConfig
from chatterbox.models.t3.sampling import REC_RAW_LOGITS, StepRecorder
from chatterbox.models.t3.t3 import T3, T3Config
from chatterbox.synthetic import synthetic_module
from conftest import DATA, load_fixture

TINY = T3Config.tiny()


def tiny_t3(dtype: torch.dtype = torch.float32, salt: int = 3) -> T3:
    return synthetic_module(T3(TINY), salt=salt).to(dtype).eval()


def tiny_cond(prompt_len: int = 6, seed: int = 0) -> T3Cond:
    g = torch.Generator().manual_seed(seed)
    return T3Cond(speaker_emb=torch.randn(1, TINY.cond_enc.speaker_embed_size, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, TINY.start_speech_token, (1, prompt_len), generator=g),
                  emotion_adv=torch.full((1, 1, 1), 0.5))


def tiny_text(n: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(1, TINY.start_text_token, (n - 2,), generator=g)
    row = torch.cat([torch.tensor([TINY.start_text_token]), body, torch.tensor([TINY.stop_text_token])])
    return row[None].repeat(2, 1)


# ------------------------------------------------------------------------ full-size parity
@pytest.fixture(scope="module")
def published_t3():
    from tools.parity.check_t3_forward import load_t3
    from tools.parity.runner import ParityContext

    ctx = ParityContext()
    model = load_t3(ctx)
    yield ctx, model
    del model
    gc.collect()


@pytest.mark.full_size
def test_forward_parity(published_t3):
    from tools.parity.check_t3_forward import check

    ctx, model = published_t3
    results = check(load_fixture("t3_forward"), ctx, t3=model)
    assert len(results) == 6
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


@pytest.mark.full_size
def test_inference_steps_parity(published_t3):
    from tools.parity.check_t3_inference_steps import check

    ctx, model = published_t3
    results = check(load_fixture("t3_inference_steps"), ctx, t3=model)
    assert len(results) == 4
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


def test_state_dict_matches_manifest():
    with torch.device("meta"):
        model = T3(T3Config.published())
    manifest = json.loads((DATA / "manifest.json").read_text())["files"]["t3_cfg.safetensors"]
    want = {e["key"]: tuple(e["shape"]) for e in manifest["entries"]}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want


# ---------------------------------------------------------------------- KV cache vs recompute
def _recompute_logits(t3: T3, cond: T3Cond, text: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Last-position logits of a full causal forward over prefill + the tokens fed so far."""
    embeds = t3.prompt_embeds(cond, t3.check_text(text))
    out = []
    for i in range(tokens.shape[1]):
        out.append(t3.speech_head(t3.tfmr(embeds)[:, -1]))
        step = t3.next_token_embeds(tokens[:, i:i + 1], torch.tensor([i + 1]))
        embeds = torch.cat([embeds, step], dim=1)
    return out


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.float32, 1e-5)])
def test_kv_cache_decode_matches_full_recompute(dtype, atol):
    t3, cond, text = tiny_t3(dtype), tiny_cond().to(dtype=dtype), tiny_text()
    rec = StepRecorder()
    with torch.inference_mode():
        tokens = t3.inference(cond, text, 12, generator=torch.Generator().manual_seed(4), recorder=rec,
                              stop_check_every=1)
        raw = rec.stacked(REC_RAW_LOGITS)
        ref = _recompute_logits(t3, cond, text, tokens)
    assert tokens.shape[1] >= 2
    for step, want in enumerate(ref):
        scale = 1.0 if dtype == torch.float64 else max(1.0, float(want.abs().max()))
        assert (raw[step] - want).abs().max() <= atol * scale, step


def test_decode_on_oversized_cache_ignores_unwritten_slots():
    t3, cond, text = tiny_t3(), tiny_cond(), tiny_text()
    with torch.inference_mode():
        embeds = t3.prompt_embeds(cond, t3.check_text(text))
        p = embeds.shape[1]
        step = t3.next_token_embeds(torch.tensor([[4]]), torch.tensor([1]))
        small = t3.init_cache(2, p + 1, "cpu", torch.float32)
        big = KVCache(torch.full((TINY.llama.num_layers, 2, TINY.llama.num_kv_heads, p + 40, TINY.llama.head_dim), 7.0),
                      torch.full((TINY.llama.num_layers, 2, TINY.llama.num_kv_heads, p + 40, TINY.llama.head_dim), 7.0))
        t3.prefill(embeds, small), t3.prefill(embeds, big)
        a = t3.decode_step(step, torch.tensor([p]), small)
        b = t3.decode_step(step, torch.tensor([p]), big)
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- embeddings
def test_input_embeds_cfg_row_and_layout():
    t3, cond, text = tiny_t3(), tiny_cond(prompt_len=5), tiny_text(n=7)
    speech = torch.full((2, 3), TINY.start_speech_token)
    with torch.inference_mode():
        embeds, len_cond = t3.prepare_input_embeds(cond, text, speech)
        text_pos = t3.text_pos_emb.emb.weight[:7]
        token_emb = t3.text_emb(text[0])
    assert len_cond == 1 + TINY.cond_enc.perceiver.num_queries + 1
    assert embeds.shape == (2, len_cond + 7 + 3, TINY.dim)
    seg = slice(len_cond, len_cond + 7)
    assert torch.equal(embeds[1, seg], text_pos)  # uncond row: positions only
    assert torch.allclose(embeds[0, seg], token_emb + text_pos)
    assert torch.equal(embeds[0, :len_cond], embeds[1, :len_cond])
    assert torch.equal(embeds[0, len_cond + 7:], embeds[1, len_cond + 7:])
    assert cond.cond_prompt_speech_emb is None  # the caller's cond is not mutated


def test_conditioning_without_prompt_and_cached_prompt():
    t3 = tiny_t3()
    cond = tiny_cond()
    with torch.inference_mode():
        bare = t3.prepare_conditioning(cond.replace(cond_prompt_speech_tokens=None))
        cached = t3.with_prompt_embeds(cond)
        assert torch.equal(t3.prepare_conditioning(cached), t3.prepare_conditioning(cond))
    assert bare.shape == (1, 2, TINY.dim)


def test_t3_cond_roundtrip_and_to():
    cond = tiny_cond()
    again = T3Cond.from_dict(cond.as_dict())
    assert torch.equal(again.speaker_emb, cond.speaker_emb)
    half = cond.to(dtype=torch.float64)
    assert half.speaker_emb.dtype == torch.float64 and half.cond_prompt_speech_tokens.dtype == torch.long
    assert cond.speaker_emb.dtype == torch.float32
    assert T3Cond(speaker_emb=torch.zeros(1, 4)).emotion_adv.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="unknown"):
        T3Cond.from_dict({"speaker_emb": torch.zeros(1, 4), "bogus": 1})


def test_forward_masks_latents_past_lengths():
    t3, cond, text = tiny_t3(), tiny_cond(), tiny_text(n=6)
    speech = torch.randint(0, TINY.start_speech_token, (2, 4), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = t3(cond, text, speech, text_token_lens=torch.tensor([6, 4]), speech_token_lens=torch.tensor([4, 2]))
    assert out.speech_logits.shape == (2, 4, TINY.speech_vocab_size)
    assert out.text_logits.shape == (2, 6, TINY.text_vocab_size)
    assert torch.count_nonzero(out.text_logits[1, 4:]) == 0 and torch.count_nonzero(out.speech_logits[1, 2:]) == 0
    assert torch.count_nonzero(out.speech_logits[0]) > 0


# ------------------------------------------------------------------------------ generation
def test_generation_seeded_and_autograd_modes():
    t3, cond, text = tiny_t3(), tiny_cond(), tiny_text()

    def run(seed):
        return t3.inference(cond, text, 15, generator=torch.Generator().manual_seed(seed))

    with torch.inference_mode():
        a = run(5)
    with torch.no_grad():
        b = run(5)
    c = run(5)  # plain mode: the cache is created in the mode it is used in
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.dtype == torch.long and a.shape[0] == 1
    others = {tuple(run(s)[0].tolist()) for s in range(6, 12)}
    assert len(others) > 1


def test_stop_token_handling_is_independent_of_check_interval():
    t3, cond, text = tiny_t3(), tiny_cond(), tiny_text()
    eos = TINY.stop_speech_token
    forced = torch.tensor([[3, 9, 11, eos, 5, 6, 7]])
    results = []
    for every in (1, 2, 3, 4, 16):
        with torch.inference_mode():
            results.append(t3.inference(cond, text, 20, forced_tokens=forced, stop_check_every=every))
    for r in results:
        assert torch.equal(r, forced[:, :4])  # stop token kept, nothing after it


def test_max_new_tokens_without_stop_and_blocks():
    t3, cond, text = tiny_t3(), tiny_cond(), tiny_text()
    forced = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        out = t3.inference(cond, text, 7, forced_tokens=forced, stop_check_every=3)
        blocks = list(t3.generate_tokens(cond, text, 7, forced_tokens=forced, block_size=3))
    assert torch.equal(out, forced[:, :7])
    assert [b.shape[1] for b in blocks] == [3, 3, 1]
    with torch.inference_mode():
        blocks = list(t3.generate_tokens(cond, text, 20, forced_tokens=torch.tensor([[1, 2, 3, 4, TINY.stop_speech_token]]),
                                         block_size=2))
    assert [b.tolist() for b in blocks] == [[[1, 2]], [[3, 4]], [[TINY.stop_speech_token]]]


def test_bad_inputs_raise():
    t3, cond, text = tiny_t3(), tiny_cond(), tiny_text()
    with pytest.raises(ValueError, match="CFG pair"):
        t3.inference(cond, text[:1], 5)
    with pytest.raises(ValueError, match="start and stop"):
        t3.inference(cond, torch.ones_like(text), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        t3.inference(cond, text, 0)
    with pytest.raises(ValueError, match="top_p"):
        t3.inference(cond, text, 5, top_p=2.0)
    with pytest.raises(ValueError, match="cache"):
        list(t3.generate_tokens(cond, text, 5, cache=t3.init_cache(2, 3, "cpu", torch.float32)))
    with pytest.raises(ValueError, match="cache length"):
        KVCache.allocate(TINY.llama, 2, 0, "cpu", torch.float32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4,
                    rms_norm_eps=1e-5, rope_theta=1e4)
