"""prepare_conditionals' front ends with prebuilt constants and no device round trips.

Every fast path is checked against the computation it replaced (torchaudio's resampler and Kaldi
fbank, per-call filterbanks and windows, the voice encoder fed from numpy). On the CPU the two
are equal bit for bit, so the tolerance everywhere below is exact equality.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as ta_kaldi

from chatterbox.audio import (S3GenMelConfig, VEMelConfig, resample_sinc, resample_soxr, resample_torchaudio,
                              s3gen_mel_spectrogram, sinc_resample_kernel, trim_silence, ve_mel_spectrogram)
from chatterbox.models.s3gen.flow import FlowConfig
from chatterbox.models.s3gen.hift import HiFTConfig
from chatterbox.models.s3gen.kaldi_fbank import KaldiFbankConfig, kaldi_fbank
from chatterbox.models.s3gen.s3gen import S3Gen, S3GenConfig
from chatterbox.models.s3gen.xvector import CAMPPlusConfig, campplus_features
from chatterbox.models.s3tokenizer import S3TokenizerConfig
from chatterbox.models.voice_encoder import DEFAULT_TRIM_TOP_DB, VoiceEncoder, VoiceEncoderConfig
from chatterbox.nn.transfer import host_to_device
from chatterbox.voice import VoiceConfig, prepare_conditionals, synthetic_reference

SR24, SR16 = 24000, 16000


def _noise(n: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    # The tiny voice encoder's default-initialised LSTM decays into float32 denormals, which the CPU
    # computes ~100x slower; both sides of every comparison here run under the same setting.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = S3GenConfig(tokenizer=S3TokenizerConfig.tiny(), speaker_encoder=CAMPPlusConfig.tiny(),
                      flow=FlowConfig.tiny(), hift=HiFTConfig.tiny())
    s3gen, ve = S3Gen(cfg), VoiceEncoder(VoiceEncoderConfig.tiny())
    for m in (s3gen, ve):
        m.eval().requires_grad_(False)
    return SimpleNamespace(s3gen=s3gen, ve=ve)


# ---------------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("src,dst", [(24000, 16000), (44100, 16000), (16000, 24000)])
@pytest.mark.parametrize("length", [7, 33, 12345, 10 * 24000 + 1])
def test_sinc_kernel_resampling_equals_torchaudio(src, dst, length):
    kernel, width = sinc_resample_kernel(src, dst)
    x = _noise(length, length)[None]
    expected = resample_torchaudio(x, src, dst)
    got = resample_sinc(x, kernel, width, src, dst)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_sinc_resampling_keeps_leading_dims_and_checks_the_kernel():
    kernel, width = sinc_resample_kernel(SR24, SR16)
    x = _noise(3 * 2 * 5000, 1).reshape(3, 2, 5000)
    assert torch.equal(resample_sinc(x, kernel, width, SR24, SR16), resample_torchaudio(x, SR24, SR16))
    with pytest.raises(ValueError, match="kernel"):
        resample_sinc(x, kernel, width, 44100, SR16)


# ---------------------------------------------------------------------------------------------- Kaldi fbank
def test_fbank_config_derives_the_kaldi_framing():
    cfg = KaldiFbankConfig.published()
    assert (cfg.window_samples, cfg.hop_samples, cfg.fft_size) == (400, 160, 512)
    assert cfg.mel_banks().shape == (80, 257) and torch.all(cfg.mel_banks()[:, -1] == 0)
    assert cfg.n_frames(399) == 0 and cfg.n_frames(400) == 1 and cfg.n_frames(16000) == 98


@pytest.mark.parametrize("length", [400, 401, 719, 12345, 96000, 160000])
def test_kaldi_fbank_equals_torchaudio(length):
    wav = _noise(length, length)
    expected = ta_kaldi.fbank(wav[None], num_mel_bins=80, sample_frequency=float(SR16))
    cfg = KaldiFbankConfig.published()
    for got in (kaldi_fbank(wav), kaldi_fbank(wav, cfg, cfg.mel_banks(), cfg.window())):
        assert got.shape == expected.shape and torch.equal(got, expected)


def test_kaldi_fbank_of_silence_hits_the_floor_like_torchaudio():
    wav = torch.zeros(4000)
    assert torch.equal(kaldi_fbank(wav), ta_kaldi.fbank(wav[None], num_mel_bins=80))


def test_campplus_uses_its_buffers_and_matches_torchaudio_features(tiny):
    campplus = tiny.s3gen.speaker_encoder
    cfg = campplus.cfg.fbank
    assert torch.equal(campplus.fbank_mel_banks, cfg.mel_banks())
    assert torch.equal(campplus.fbank_window, cfg.window())
    wav = _noise(16000, 3)[None]
    fb = ta_kaldi.fbank(wav, num_mel_bins=80, sample_frequency=float(SR16))
    old_features = (fb - fb.mean(dim=0, keepdim=True))[None]
    assert torch.equal(campplus.features(wav), old_features)
    assert torch.equal(campplus_features(wav), old_features)
    assert torch.equal(campplus.inference(wav), campplus(old_features))


# ---------------------------------------------------------------------------------------------- buffers
def test_constants_are_real_after_meta_construction_and_not_checkpoint_entries():
    cfg = S3GenConfig(tokenizer=S3TokenizerConfig.tiny(), speaker_encoder=CAMPPlusConfig.tiny(),
                      flow=FlowConfig.tiny(), hift=HiFTConfig.tiny())
    with torch.device("meta"):
        s3gen, ve = S3Gen(cfg), VoiceEncoder(VoiceEncoderConfig.tiny())
    kernel, width = sinc_resample_kernel(SR24, SR16)
    assert torch.equal(s3gen.ref_resample_kernel, kernel) and s3gen.ref_resample_width == width
    assert torch.equal(s3gen.ref_mel_basis, cfg.mel.mel_basis())
    assert torch.equal(s3gen.ref_mel_window, cfg.mel.window())
    assert torch.equal(s3gen.speaker_encoder.fbank_mel_banks, cfg.speaker_encoder.fbank.mel_banks())
    assert torch.equal(ve.mel_filters, ve.cfg.mel.mel_basis()) and torch.equal(ve.mel_window, ve.cfg.mel.window())
    names = ("ref_mel_basis", "ref_mel_window", "ref_resample_kernel", "fbank_mel_banks", "fbank_window",
             "mel_filters", "mel_window")
    keys = list(s3gen.state_dict()) + list(ve.state_dict())
    assert not [k for k in keys if k.rsplit(".", 1)[-1] in names]


def test_building_on_meta_leaves_torchaudio_usable():
    # torchaudio makes module-level tensors when first imported; an import first reached inside a
    # meta-device construction would leave them on meta (then kaldi.fbank fails). Fresh interpreter.
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1])\n"
            "from chatterbox.loader import build_models\n"
            "build_models()\n"
            "import torchaudio.compliance.kaldi as k\n"
            "assert k.EPSILON.device.type == 'cpu'\n"
            "k.fbank(torch.randn(1, 4000))\n")
    done = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- pieces
def test_reference_mel_equals_the_per_call_mel(tiny):
    wav = _noise(SR24 * 3 + 17, 4)[None]
    expected = s3gen_mel_spectrogram(wav, S3GenMelConfig.published()).transpose(1, 2)
    assert torch.equal(tiny.s3gen.reference_mel(wav, SR24), expected)
    assert torch.equal(tiny.s3gen.resample_to_tokenizer_rate(wav, SR24), resample_torchaudio(wav, SR24, SR16))


def test_voice_encoder_mel_equals_the_per_call_mel(tiny):
    wav = _noise(SR16 * 2 + 5, 5)
    assert torch.equal(tiny.ve.mel(wav), ve_mel_spectrogram(wav, VEMelConfig.published()).transpose(0, 1))


def test_voice_encoder_host_and_device_inputs_agree(tiny):
    wav = synthetic_reference(3.0, SR16, seed=6)
    start, end = trim_silence(wav, top_db=DEFAULT_TRIM_TOP_DB)
    old = ve_mel_spectrogram(torch.from_numpy(wav[start:end]), VEMelConfig.published()).transpose(0, 1)
    (from_numpy,) = tiny.ve.mels_from_wavs([wav], SR16)
    (from_tensor,) = tiny.ve.mels_from_wavs([torch.from_numpy(wav)], SR16)
    assert torch.equal(from_numpy, old) and torch.equal(from_tensor, old)
    (untrimmed,) = tiny.ve.mels_from_wavs([torch.from_numpy(wav)], SR16, trim_top_db=None)
    assert torch.equal(untrimmed, tiny.ve.mel(torch.from_numpy(wav)))


def test_host_to_device_on_the_cpu():
    arr = np.arange(6, dtype=np.float64)
    t = host_to_device(arr, "cpu", torch.float32)
    assert t.dtype == torch.float32 and torch.equal(t, torch.arange(6, dtype=torch.float32))
    x = torch.arange(4)
    assert host_to_device(x, "cpu") is x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_to_device_on_cuda_is_asynchronous_and_exact():
    arr = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = host_to_device(arr, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    arr[:] = 0.0  # the copy was staged: changing the source afterwards does not matter
    assert torch.equal(t.cpu(), torch.from_numpy(np.random.default_rng(0).standard_normal(100_000).astype(np.float32)))


# ---------------------------------------------------------------------------------------------- whole call
def _previous_prepare_conditionals(s3gen, ve, wav24: np.ndarray, exaggeration: float) -> dict:
    """The computation before this change: per-call constants, torchaudio's resampler and fbank,
    the voice encoder fed from numpy, everything in upstream's order."""
    cfg = VoiceConfig()
    ref_16k = resample_soxr(wav24, SR24, SR16)
    wav = torch.from_numpy(wav24[: int(cfg.s3gen_reference_seconds * SR24)])[None]
    prompt_feat = s3gen_mel_spectrogram(wav, s3gen.cfg.mel).transpose(1, 2)
    wav16 = resample_torchaudio(wav, SR24, SR16)
    fb = ta_kaldi.fbank(wav16, num_mel_bins=80, sample_frequency=float(SR16))
    embedding = s3gen.speaker_encoder((fb - fb.mean(dim=0, keepdim=True))[None])
    tokens, _ = s3gen.tokenizer(wav16)
    tokens = tokens[:, : prompt_feat.shape[1] // 2]
    prompt = torch.from_numpy(ref_16k[: int(cfg.t3_reference_seconds * SR16)])
    prompt_tokens, _ = s3gen.tokenizer([prompt], max_len=cfg.t3_prompt_tokens)
    start, end = trim_silence(ref_16k, top_db=DEFAULT_TRIM_TOP_DB)
    mel = ve_mel_spectrogram(torch.from_numpy(ref_16k[start:end]), ve.cfg.mel).transpose(0, 1)
    speaker = ve.embeds_from_mels([mel]).mean(0, keepdim=True)
    return {"t3.speaker_emb": speaker, "t3.cond_prompt_speech_tokens": prompt_tokens,
            "t3.emotion_adv": torch.full((1, 1, 1), exaggeration), "gen.prompt_token": tokens,
            "gen.prompt_token_len": torch.tensor([tokens.shape[1]]), "gen.prompt_feat": prompt_feat,
            "gen.embedding": embedding}


def _flat(conds) -> dict:
    out = {f"t3.{k}": v for k, v in conds.t3.as_dict().items() if torch.is_tensor(v)}
    out.update({f"gen.{k}": v for k, v in conds.gen.as_dict().items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("seconds", [10.0, 12.5])
def test_prepare_conditionals_equals_the_previous_computation(tiny, seconds):
    wav = synthetic_reference(seconds, SR24, seed=7)
    wav[: SR24 // 2] *= 1e-3  # a quiet lead-in for the voice encoder's trim
    with torch.inference_mode():
        got = _flat(prepare_conditionals(tiny.s3gen, tiny.ve, wav, exaggeration=0.3, sample_rate=SR24))
        expected = _previous_prepare_conditionals(tiny.s3gen, tiny.ve, wav, 0.3)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


class _Recorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        self.names.append(name)
        yield


def test_timer_sees_every_stage_and_changes_nothing(tiny):
    wav = synthetic_reference(3.0, SR24, seed=8)
    timer = _Recorder()
    with torch.inference_mode():
        timed = _flat(prepare_conditionals(tiny.s3gen, tiny.ve, wav, sample_rate=SR24, timer=timer))
        plain = _flat(prepare_conditionals(tiny.s3gen, tiny.ve, wav, sample_rate=SR24))
    assert all(torch.equal(timed[k], plain[k]) for k in plain)
    assert set(timer.names) == {"load", "resample_16k_soxr", "ve.trim", "h2d_16k", "ve.mel", "ve.net",
                                "t3.tokenizer", "s3gen.h2d", "s3gen.mel", "s3gen.resample_16k",
                                "s3gen.tokenizer", "campplus.fbank", "campplus.net", "assemble"}
    assert len(timer.names) == len(set(timer.names))


def test_profile_conds_stage_breakdown_on_the_tiny_pipeline(tiny, capsys):
    from eval import profile_conds

    fake = SimpleNamespace(s3gen=tiny.s3gen, ve=tiny.ve, engine=SimpleNamespace(cfg=SimpleNamespace(voice=VoiceConfig())),
                           device=torch.device("cpu"))
    wav = synthetic_reference(3.0, SR24, seed=9)
    per_stage, equal, diff = profile_conds.time_stages(fake, wav, SR24, 1, torch.inference_mode)
    assert equal and diff == 0.0
    assert all(len(v) == 1 and v[0] >= 0.0 for v in per_stage.values())
    assert {"campplus.net", "ve.net", "t3.tokenizer", "s3gen.tokenizer"} <= set(per_stage)
    summary = profile_conds._summary([0.003, 0.001, 0.002])
    assert summary["median_ms"] == pytest.approx(2.0) and summary["min_ms"] == pytest.approx(1.0)
    result = {"env": {"device_name": "cpu", "device": "cpu"},
              "settings": {"opt": "reference", "reference_seconds": 3.0, "reps": 1},
              "stages": {k: profile_conds._summary(v) for k, v in per_stage.items()},
              "totals": {k: summary for k in ("voice_host", "voice_total", "tts_total")},
              "breakdown_output_equal": equal}
    assert profile_conds.frontend_check(fake, wav, SR24) == {
        "s3gen_mel": 0.0, "resample_16k": 0.0, "campplus_fbank": 0.0, "ve_mel": 0.0}
    profile_conds.print_table(result)
    printed = capsys.readouterr().out
    assert "campplus.net" in printed and "sum of stages" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_voice_encoder_lstm_weights_stay_in_one_cudnn_buffer_after_a_move():
    import warnings

    ve = VoiceEncoder(VoiceEncoderConfig.tiny()).eval().to("cuda")
    mels = torch.rand(3, 160, 40, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "RNN module weights are not part of single contiguous chunk"
        out = ve(mels)
    assert torch.allclose(out.cpu(), ve.to("cpu")(mels.cpu()), rtol=1e-4, atol=1e-5)
