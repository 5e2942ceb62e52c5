"""Inference-tensor safety: every public path under each autograd mode, with state made in one mode
and used or edited in another (UPSTREAM_AUDIT.md §2-§4).

Rules checked: what the pipeline hands out (conditionals, waveforms, stream chunks) is an ordinary
tensor the caller may edit in place anywhere; pipeline calls never leave the caller's autograd mode
changed; model-level calls (embed_ref, the vocoder, the flow) work in whatever mode the caller is
in, read inputs made in any other mode, and return tensors editable in that same mode.
One full-size synthetic pipeline per module, a 2 s reference, 1 CFM step, <= 2 new tokens.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from chatterbox import ChatterboxTTS, Conditionals
from chatterbox.opt import AUTOGRAD_MODES, OptConfig, autograd_context
from chatterbox.voice import synthetic_reference

SR = 24000
MAX_TOKENS = 2
TEXT = "Hi."


def caller_context(mode: str) -> contextlib.AbstractContextManager:
    """The mode a *caller* may be in around a model-level call."""
    return autograd_context(mode)


def grad_state() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


@pytest.fixture()
def tts(synthetic_tts):
    # the session's shared pipeline, with one CFM step to keep the matrix cheap; restored afterwards
    saved_opt, saved_conds = synthetic_tts.opt, synthetic_tts.conds
    synthetic_tts.set_opt(OptConfig.reference().replace(cfm_steps=1))
    yield synthetic_tts
    synthetic_tts.set_opt(saved_opt)
    synthetic_tts.conds = saved_conds


@pytest.fixture(scope="module")
def ref_wav():
    return synthetic_reference(seconds=2.0, seed=1)


def use_mode(tts: ChatterboxTTS, mode: str) -> None:
    tts.set_opt(tts.opt.replace(autograd_mode=mode))


def assert_plain(t: torch.Tensor, what: str) -> None:
    assert not t.is_inference(), f"{what} is an inference tensor"
    assert not t.requires_grad, f"{what} requires grad"


def edit_conds_in_place(conds: Conditionals) -> None:
    conds.t3.speaker_emb *= 1
    conds.t3.emotion_adv += 0
    conds.gen.embedding *= 1
    conds.gen.prompt_feat *= 1
    conds.gen.prompt_token_len += 0


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "none"])
def test_prepare_conditionals_hands_out_plain_tensors(tts, ref_wav, mode):
    use_mode(tts, mode)
    before = grad_state()
    conds = tts.prepare_conditionals(ref_wav, sample_rate=SR)
    assert grad_state() == before
    for name, t in {**conds.t3.as_dict(), **conds.gen.as_dict()}.items():
        if torch.is_tensor(t):
            assert_plain(t, f"conds.{name}")
    edit_conds_in_place(conds)  # outside any context
    with torch.no_grad():
        edit_conds_in_place(conds)
    with torch.inference_mode():
        edit_conds_in_place(conds)


@pytest.mark.parametrize("mode", AUTOGRAD_MODES)
def test_generate_returns_an_editable_wav_and_keeps_the_callers_mode(tts, mode):
    use_mode(tts, mode)
    before = grad_state()
    wav = tts.generate(TEXT, max_new_tokens=MAX_TOKENS, seed=0, watermark=False)
    assert grad_state() == before
    assert_plain(wav, "wav")
    wav *= 0.5
    with torch.no_grad():
        wav *= 2.0


@pytest.mark.parametrize("made, used", [("inference_mode", "none"),
                                        ("inference_mode", "no_grad"),
                                        ("none", "inference_mode"), ("no_grad", "inference_mode")])
def test_voice_made_in_one_mode_is_used_and_edited_in_another(tts, ref_wav, made, used):
    use_mode(tts, made)
    conds = tts.prepare_conditionals(ref_wav, sample_rate=SR)
    edit_conds_in_place(tts.conds)  # the stored voice, edited outside any context
    with caller_context(used):
        edit_conds_in_place(conds)
    use_mode(tts, used)
    wav = tts.generate(TEXT, max_new_tokens=MAX_TOKENS, seed=1, watermark=False)
    assert_plain(wav, "wav")
    assert wav.shape[1] > 0


def test_exaggeration_change_under_inference_mode_keeps_the_voice_plain(tts, ref_wav):
    use_mode(tts, "none")
    tts.prepare_conditionals(ref_wav, sample_rate=SR)
    use_mode(tts, "inference_mode")
    tts.generate(TEXT, exaggeration=0.7, max_new_tokens=2, seed=0, watermark=False)
    assert float(tts.conds.t3.emotion_adv.reshape(-1)[0]) == pytest.approx(0.7)
    edit_conds_in_place(tts.conds)


@pytest.mark.parametrize("mode", AUTOGRAD_MODES)
def test_conditionals_save_and_load_in_any_mode(tts, ref_wav, tmp_path, mode):
    with torch.inference_mode():
        conds = tts.conds.with_exaggeration(0.5)  # holds tensors made in inference mode
    path = tmp_path / "conds.pt"
    with caller_context(mode):
        conds.save(path)
        loaded = Conditionals.load(path)
    edit_conds_in_place(loaded)  # outside: loaded tensors are plain whatever mode loaded them
    with caller_context(mode):
        edit_conds_in_place(loaded)
    assert torch.equal(loaded.gen.prompt_feat, conds.gen.prompt_feat.cpu())
    assert loaded.t3.cond_prompt_speech_tokens.dtype == torch.long
    with caller_context(mode):
        mel = tts.s3gen.flow_inference(loaded.gen.prompt_token[:, :4], loaded.gen, n_timesteps=1,
                                       cfm_noise=tts.s3gen.draw_cfm_noise(torch.Generator().manual_seed(0)))
    assert mel.shape[1] == 80 and torch.isfinite(mel).all()


@pytest.mark.parametrize("mode", AUTOGRAD_MODES)
def test_embed_ref_and_vocoder_work_in_the_callers_mode_on_inputs_from_any_mode(tts, ref_wav, mode):
    wav = torch.from_numpy(ref_wav)
    noise = tts.s3gen.draw_cfm_noise(torch.Generator().manual_seed(0))  # made outside any mode
    with torch.inference_mode():
        ref_inf = tts.s3gen.embed_ref(wav, SR)
        mel_inf = tts.s3gen.flow_inference(ref_inf.prompt_token[:, :8], ref_inf, cfm_noise=noise, n_timesteps=1)
    with caller_context(mode):
        ref = tts.s3gen.embed_ref(wav, SR)
        for t in (ref.prompt_token_len, ref.prompt_feat, ref.embedding):
            t.mul_(1)  # made in this mode: editable in this mode
        # reads inference tensors made earlier
        mel = tts.s3gen.flow_inference(ref_inf.prompt_token[:, :8], ref_inf, cfm_noise=noise, n_timesteps=1)
        out, source = tts.s3gen.hift_inference(mel_inf, generator=torch.Generator().manual_seed(0))
        faded = tts.s3gen.apply_trim_fade(out)
        faded *= 0.5
        source *= 1
    assert torch.equal(ref.prompt_token, ref_inf.prompt_token)
    assert torch.allclose(mel, mel_inf)
    assert grad_state() == (True, False)


@pytest.mark.parametrize("mode", AUTOGRAD_MODES)
def test_generate_stream_chunks_are_plain_and_the_mode_never_leaks(tts, ref_wav, mode):
    if not hasattr(tts, "generate_stream"):
        pytest.skip("generate_stream is not implemented yet")
    use_mode(tts, "inference_mode")
    tts.prepare_conditionals(ref_wav, sample_rate=SR)
    use_mode(tts, mode)
    chunks = []
    for chunk, _ in tts.generate_stream(TEXT, chunk_size=1, max_new_tokens=MAX_TOKENS, seed=3,
                                        watermark=False, print_metrics=False):
        assert grad_state() == (True, False)  # the consumer's loop body runs in its own mode
        assert_plain(chunk, "stream chunk")
        chunks.append(chunk)
    for c in chunks:
        c *= 0.5
    if mode == "none":
        return  # nothing could leak from a stream that never enters another mode
    stream = tts.generate_stream(TEXT, chunk_size=1, max_new_tokens=MAX_TOKENS, seed=3, watermark=False,
                                 print_metrics=False)
    next(stream)
    x = torch.ones(3)  # made while the stream is suspended mid-utterance
    x += 1
    assert not x.is_inference() and grad_state() == (True, False)
    stream.close()
    assert grad_state() == (True, False)


# ----------------------------------------------------------------- the caller's own mode (issue 17)
CALLER_MODES = ["inference_mode", "no_grad", "none"]


def _handed_out(tiny_tts, entry: str) -> list[torch.Tensor]:
    if entry == "generate":
        return [tiny_tts.generate(TEXT, max_new_tokens=4, seed=0, watermark=False)]
    if entry == "synthesize":
        res = tiny_tts.synthesize(TEXT, max_new_tokens=4, seed=0, watermark=False)
        return [res.wav, *res.speech_tokens]
    if entry == "generate_stream":
        return [c for c, _ in tiny_tts.generate_stream(TEXT, max_new_tokens=6, chunk_size=2, seed=0,
                                                        watermark=False, print_metrics=False)]
    conds = tiny_tts.engine.prepare_conditionals(synthetic_reference(seconds=2.0, seed=3), sample_rate=SR)
    return [t for t in {**conds.t3.as_dict(), **conds.gen.as_dict()}.values() if torch.is_tensor(t)]


@pytest.mark.parametrize("entry", ["generate", "synthesize", "generate_stream", "prepare_conditionals"])
@pytest.mark.parametrize("mode", CALLER_MODES)
def test_outputs_are_ordinary_tensors_whatever_mode_the_caller_is_in(tiny_tts, entry, mode):
    """``with torch.inference_mode(): w = tts.generate(...)`` then ``w.mul_(0.5)`` outside must work."""
    with caller_context(mode):
        outs = _handed_out(tiny_tts, entry)
    assert outs
    for t in outs:
        assert_plain(t, entry)
        if t.is_floating_point():
            t.mul_(0.5)  # outside the caller's context
            with torch.no_grad():
                t.mul_(2.0)
        else:
            t.add_(0)
