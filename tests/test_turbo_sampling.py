"""Turbo T3 sampling rules and generation loop (tiny model): processor order, the penalty's id rule,
the unchecked first token, the cap, the stop check per block, and the clean-up before S3Gen."""
from __future__ import annotations

import pytest
import torch

from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.sampling import REC_RAW_LOGITS, StepRecorder
from chatterbox.models.t3_turbo.sampling import (REC_PROCESSED, SpeechTokenCleanup, TurboSamplingConfig,
                                                 apply_top_k, clean_speech_tokens, ids_mask, process_turbo_logits)
from chatterbox.models.t3_turbo.t3_turbo import T3Turbo, T3TurboConfig
from chatterbox.synthetic import synthetic_module

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = T3TurboConfig.tiny()
STOP, START = CFG.stop_speech_token, CFG.start_speech_token
PENALTY_ONLY = TurboSamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=2.0)


@pytest.fixture(scope="module")
def t3() -> T3Turbo:
    return synthetic_module(T3Turbo(CFG), salt=11).eval()


def cond(prompt_len: int = 5) -> T3Cond:
    g = torch.Generator().manual_seed(2)
    return T3Cond(speaker_emb=torch.randn(1, CFG.speaker_embed_size, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, START, (1, prompt_len), generator=g))


TEXT = torch.tensor([[464, 2068, 7586, 21831, 50265, 13]])  # any GPT-2 ids, a tag among them


def test_presets():
    turbo, nano = T3TurboConfig.turbo(), T3TurboConfig.nano()
    for c in (turbo, nano):
        ids = (c.text_vocab_size, c.speech_vocab_size, c.start_speech_token, c.stop_speech_token)
        assert ids == (50276, 6563, 6561, 6562)
        assert c.speech_cond_prompt_len == 375 and c.speaker_embed_size == 256
    assert (turbo.dim, nano.dim) == (1024, 768)
    assert TurboSamplingConfig.published() == TurboSamplingConfig(0.8, 1000, 0.95, 1.2)
    assert SpeechTokenCleanup.published() == SpeechTokenCleanup(6561, 4299, 3)


def test_top_k_keeps_ties_with_the_kth():
    out = apply_top_k(torch.tensor([[3.0, 1.0, 1.0, 0.0, 2.0]]), 3)
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, True, True, False, True]]))
    assert torch.equal(apply_top_k(torch.tensor([[1.0, 2.0]]), 1000), torch.tensor([[1.0, 2.0]]))


def test_processor_order_temperature_topk_topp_then_penalty():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    seen = ids_mask(1, 4, torch.tensor([[0, 2]]))
    cfg = TurboSamplingConfig(temperature=0.5, top_k=3, top_p=1.0, repetition_penalty=2.0)
    out = process_turbo_logits(logits, seen, cfg)
    # /0.5 -> [4, 2, -2, 1]; top-3 drops id 2; the penalty halves id 0 and leaves the dropped id at -inf
    assert torch.equal(out, torch.tensor([[2.0, 2.0, float("-inf"), 1.0]]))
    # top-p runs before the penalty: it sees the unpenalised scores
    cfg_p = TurboSamplingConfig(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=4.0)
    out_p = process_turbo_logits(torch.tensor([[3.0, 0.0, 0.0]]), ids_mask(1, 3, torch.tensor([[0]])), cfg_p)
    assert torch.equal(out_p, torch.tensor([[0.75, float("-inf"), float("-inf")]]))


@pytest.mark.parametrize("temperature", [1.0, 0.0, -0.5])
def test_temperature_skipped_like_upstream(temperature):
    logits = torch.tensor([[1.5, -0.5, 0.25]])
    cfg = TurboSamplingConfig(temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0)
    assert torch.equal(process_turbo_logits(logits, ids_mask(1, 3, torch.tensor([[0]])), cfg), logits)


def test_clean_speech_tokens():
    out = clean_speech_tokens(torch.tensor([[STOP, 5, START, 7, STOP]]))
    assert out.tolist() == [5, 7, 4299, 4299, 4299]


@torch.inference_mode()
def test_penalty_id_rule(t3):
    """Step 0 penalises the start token only; later steps the generated tokens, without the start."""
    forced = torch.tensor([[11, 22, 11, 33]])
    rec = StepRecorder()
    t3.inference(cond(), TEXT, 4, sampling=PENALTY_ONLY, forced_tokens=forced, recorder=rec)
    raw, processed = rec.stacked(REC_RAW_LOGITS)[:, 0], rec.stacked(REC_PROCESSED)[:, 0]
    changed = [set((raw[i] != processed[i]).nonzero().flatten().tolist()) for i in range(4)]
    assert changed == [{START}, {11}, {11, 22}, {11, 22}]


@torch.inference_mode()
def test_first_token_is_never_a_stop_and_later_stops_end(t3):
    forced = torch.tensor([[STOP, 40, STOP, 41, 42]])
    for block in (1, 2, 8):
        tokens = t3.inference(cond(), TEXT, 10, forced_tokens=forced, stop_check_every=block)
        assert tokens.tolist() == [[STOP, 40, STOP]], block


@torch.inference_mode()
def test_cap_and_blocks(t3):
    forced = torch.arange(100, 110)[None]
    assert t3.inference(cond(), TEXT, 4, forced_tokens=forced).tolist() == [[100, 101, 102, 103]]
    blocks = list(t3.generate_tokens(cond(), TEXT, 7, forced_tokens=forced, block_size=3))
    assert [b.shape[1] for b in blocks] == [3, 3, 1]


@torch.inference_mode()
def test_forced_replay_equals_the_sampled_run(t3):
    """Sampling with a generator is reproducible, and replaying its tokens gives the same logits."""
    rec_a, rec_b = StepRecorder(), StepRecorder()
    a = t3.inference(cond(), TEXT, 12, generator=torch.Generator().manual_seed(3), recorder=rec_a)
    b = t3.inference(cond(), TEXT, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    t3.inference(cond(), TEXT, 12, forced_tokens=a, recorder=rec_b)
    n = a.shape[1]
    torch.testing.assert_close(rec_a.stacked(REC_RAW_LOGITS)[:n], rec_b.stacked(REC_RAW_LOGITS)[:n])


@torch.inference_mode()
def test_prompt_layout_and_cached_prompt_embeddings(t3):
    c = cond(prompt_len=5)
    embeds = t3.prompt_embeds(c, TEXT)
    assert embeds.shape == (1, 1 + 5 + TEXT.shape[1] + 1, CFG.dim)
    torch.testing.assert_close(embeds[0, -1], t3.speech_emb.weight[START])
    torch.testing.assert_close(embeds[0, 1:6], t3.speech_emb(c.cond_prompt_speech_tokens)[0])
    assert torch.equal(t3.prompt_embeds(t3.with_prompt_embeds(c), TEXT), embeds)


def test_rejects_bad_inputs(t3):
    with pytest.raises(ValueError, match="one non-empty row"):
        t3.inference(cond(), TEXT.repeat(2, 1), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        t3.inference(cond(), TEXT, 0)
    with pytest.raises(ValueError, match="position table"):
        t3.inference(cond(), TEXT, CFG.gpt2.max_position_embeddings)
    with pytest.raises(ValueError, match="top_p"):
        TurboSamplingConfig(top_p=0.0)
