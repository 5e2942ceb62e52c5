"""End-to-end pipeline on the full-size synthetic checkpoint (CPU)."""
import numpy as np
import pytest
import torch

from chatterbox import ChatterboxTTS, Conditionals
from chatterbox.audio import ReferenceAudioError
from chatterbox.text import TextSplitConfig
from chatterbox.voice import synthetic_reference

SR = 24000


@pytest.fixture()
def tts(synthetic_tts):
    return synthetic_tts


def test_generate_is_reproducible_with_a_seed_and_returns_a_plain_tensor(tts):
    a = tts.generate("Hello.", max_new_tokens=12, seed=3, watermark=False)
    b = tts.generate("Hello.", max_new_tokens=12, seed=3, watermark=False)
    assert a.dim() == 2 and a.shape[0] == 1 and a.shape[1] > 0
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not a.is_inference()
    a *= 0.5  # the caller owns it
    assert a.shape[1] % 480 == 0
    assert tts.sr == SR


def test_different_seeds_sample_different_tokens(tts):
    r1 = tts.synthesize("Hello.", max_new_tokens=12, seed=1, watermark=False)
    r2 = tts.synthesize("Hello.", max_new_tokens=12, seed=2, watermark=False)
    assert r1.seed == 1 and r2.seed == 2
    assert not torch.equal(r1.wav, r2.wav)
    for tokens in r1.speech_tokens:
        assert tokens.dtype == torch.long and bool(((tokens >= 0) & (tokens < 6561)).all())
    assert {"t3", "flow", "hift"} <= set(r1.timings)


def test_torch_manual_seed_makes_unseeded_calls_repeatable(tts):
    torch.manual_seed(123)
    a = tts.synthesize("Hi there.", max_new_tokens=8, watermark=False)
    torch.manual_seed(123)
    b = tts.synthesize("Hi there.", max_new_tokens=8, watermark=False)
    assert a.seed == b.seed and torch.equal(a.wav, b.wav)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_a_clear_error(tts, text):
    with pytest.raises(ValueError, match="empty"):
        tts.generate(text, max_new_tokens=5)


def test_long_text_is_split_into_segments_in_order(tts):
    old = tts.split_cfg
    tts.split_cfg = TextSplitConfig(max_text_tokens=12)
    try:
        r = tts.synthesize("First sentence is here. Second one follows it. Third closes.",
                           max_new_tokens=6, seed=0, watermark=False)
    finally:
        tts.split_cfg = old
    assert len(r.segments) >= 2
    assert " ".join(r.segments) == "First sentence is here. Second one follows it. Third closes."
    assert len(r.speech_tokens) == len(r.segments)


def test_exaggeration_changes_the_conditioning_and_not_the_stored_voice_object(tts):
    before = tts.conds
    tts.generate("Hey.", exaggeration=0.9, max_new_tokens=4, seed=0, watermark=False)
    assert float(tts.conds.t3.emotion_adv.reshape(-1)[0]) == pytest.approx(0.9)
    assert float(before.t3.emotion_adv.reshape(-1)[0]) == pytest.approx(0.5)
    tts.conds = before


def test_missing_voice_is_a_clear_error(tts):
    saved, tts.conds = tts.conds, None
    try:
        with pytest.raises(ValueError, match="prepare_conditionals"):
            tts.generate("Hello.", max_new_tokens=4)
    finally:
        tts.conds = saved


def test_conditionals_round_trip_and_load_into_generation(tts, tmp_path):
    path = tmp_path / "conds.pt"
    tts.conds.save(path)
    loaded = Conditionals.load(path)
    for name, value in tts.conds.t3.as_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, getattr(loaded.t3, name)), name
    for name, value in tts.conds.gen.as_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, getattr(loaded.gen, name)), name
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"t3", "gen"}
    assert {"speaker_emb", "cond_prompt_speech_tokens", "emotion_adv"} <= set(raw["t3"])
    assert {"prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding"} == set(raw["gen"])
    saved = tts.conds
    try:
        tts.conds = loaded
        a = tts.generate("Hello.", max_new_tokens=6, seed=5, watermark=False)
        tts.conds = saved
        b = tts.generate("Hello.", max_new_tokens=6, seed=5, watermark=False)
    finally:
        tts.conds = saved
    assert torch.equal(a, b)


def test_conditionals_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ValueError, match="conds.pt"):
        Conditionals.load(bad)
    with pytest.raises(FileNotFoundError):
        Conditionals.load(tmp_path / "absent.pt")


def test_prepare_conditionals_from_array_truncates_long_references(tts):
    long_ref = synthetic_reference(seconds=12.0, seed=1)
    saved = tts.conds
    try:
        conds = tts.prepare_conditionals(long_ref, sample_rate=SR)
    finally:
        tts.conds = saved
    assert conds.gen.prompt_feat.shape[1] == 500  # 10 s at 50 frames/s
    assert conds.t3.cond_prompt_speech_tokens.shape[1] == 150  # 6 s at 25 tokens/s
    assert conds.t3.speaker_emb.shape == (1, 256)


def test_prepare_conditionals_downmixes_stereo(tts):
    mono = synthetic_reference(seconds=2.0, seed=2)
    saved = tts.conds
    try:
        a = tts.prepare_conditionals(np.stack([mono, mono]), sample_rate=SR)
        b = tts.prepare_conditionals(mono, sample_rate=SR)
    finally:
        tts.conds = saved
    assert torch.allclose(a.t3.speaker_emb, b.t3.speaker_emb, atol=1e-6)


@pytest.mark.parametrize("wav, sr, message", [
    (np.zeros(48000, dtype=np.float32), SR, "zeros"),
    (np.full(48000, 1e-6, dtype=np.float32), SR, "silent"),
    (np.full(48000, np.nan, dtype=np.float32), SR, "NaN"),
    (synthetic_reference(seconds=0.2), SR, "too short"),
    (synthetic_reference(seconds=2.0), None, "sample_rate"),
])
def test_bad_references_are_clear_errors(tts, wav, sr, message):
    with pytest.raises(ReferenceAudioError, match=message):
        tts.prepare_conditionals(wav, sample_rate=sr)


def test_unreadable_reference_file_is_a_clear_error(tts, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"definitely not audio")
    with pytest.raises(ReferenceAudioError, match="junk.wav"):
        tts.prepare_conditionals(str(junk))


def test_reference_at_another_sample_rate_is_resampled(tts):
    import librosa

    ref = synthetic_reference(seconds=3.0, seed=4)
    ref_44k = librosa.resample(ref, orig_sr=SR, target_sr=44100)
    saved = tts.conds
    try:
        conds = tts.prepare_conditionals(ref_44k, sample_rate=44100)
    finally:
        tts.conds = saved
    assert conds.gen.prompt_feat.shape[1] == 150


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ChatterboxTTS.from_synthetic("cuda")
