from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, load_fixture

from chatterbox.checkpoint import load_strict
from chatterbox.constants import S3_SR
from chatterbox.dsp import periodic_hann, slaney_mel_filterbank
from chatterbox.models.s3tokenizer import S3Tokenizer, S3TokenizerConfig, log_mel_spectrogram
from chatterbox.synthetic import synth_state_dict

PREFIX = "tokenizer."
# The synthetic FSQ projection is scaled for the 1280-wide encoder; the tiny one needs more gain to
# spread its ids over many codes (otherwise equality checks on ids would be nearly vacuous).
TINY_FSQ_GAIN = 4.0


def _build(cfg: S3TokenizerConfig, fsq_gain: float = 1.0) -> S3Tokenizer:
    with torch.device("meta"):
        tok = S3Tokenizer(cfg)
    state = synth_state_dict(tok.state_dict(), prefix=PREFIX)
    key = "quantizer._codebook.project_down.weight"
    state[key] = state[key] * fsq_gain
    load_strict(tok, state, "s3tokenizer")
    return tok.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fx():
    return load_fixture("s3tokenizer")


@pytest.fixture(scope="module")
def published() -> S3Tokenizer:
    return _build(S3TokenizerConfig.published())


@pytest.fixture(scope="module")
def tiny() -> S3Tokenizer:
    return _build(S3TokenizerConfig.tiny(), fsq_gain=TINY_FSQ_GAIN)


def _noise_wav(seconds: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = int(seconds * S3_SR)
    t = torch.arange(n) / S3_SR
    tone = 0.3 * torch.sin(2 * torch.pi * (150 + 100 * torch.sin(2 * torch.pi * 0.3 * t)) * t)
    return tone + 0.05 * torch.randn(n, generator=gen)


def test_state_dict_matches_manifest():
    manifest = json.loads((DATA / "manifest.json").read_text())
    entries = manifest["files"]["s3gen.safetensors"]["entries"]
    expected = {e["key"][len(PREFIX):]: tuple(e["shape"]) for e in entries if e["key"].startswith(PREFIX)}
    with torch.device("meta"):
        tok = S3Tokenizer(S3TokenizerConfig.published())
    got = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert got == expected
    # deterministic buffers are real even when the module is built on meta; the rotary table is not saved
    assert torch.equal(tok._mel_filters, slaney_mel_filterbank(16000, 400, 128, 0.0, 8000.0))
    assert torch.equal(tok.window, periodic_hann(400))
    assert tok.encoder.rope_cos.device.type == "cpu"


def test_checkpoint_without_mel_buffers_loads():
    with torch.device("meta"):
        tok = S3Tokenizer(S3TokenizerConfig.tiny())
    state = synth_state_dict(tok.state_dict(), prefix=PREFIX)
    del state["_mel_filters"], state["window"]
    load_strict(tok, state, "tiny", optional=("_mel_filters", "window"))
    assert tok._mel_filters.device.type == "cpu" and tok.window.shape == (400,)


def test_parity_with_fixture(published, fx):
    wav, wav_b = fx["wav16"], fx["wav16_b"]
    with torch.inference_mode():
        tokens, lens = published([wav])
        mel = published.log_mel(wav[None])
        hidden, _ = published.encoder(mel, torch.tensor([mel.shape[-1]]))
        tokens_ml, lens_ml = published([wav], max_len=20)
        tokens_b2, lens_b2 = published([wav, wav_b])
    assert tokens.dtype == lens.dtype == torch.int64
    assert torch.equal(tokens, fx["tokens"]) and torch.equal(lens, fx["token_lens"])
    tol = 1e-5 + 1e-4 * fx["encoder_hidden"].abs().max()
    assert (hidden - fx["encoder_hidden"]).abs().max() <= tol
    assert torch.equal(tokens_ml, fx["tokens_maxlen"]) and torch.equal(lens_ml, fx["token_lens_maxlen"])
    assert torch.equal(lens_b2, fx["token_lens_batch2"])
    for row, n in enumerate(lens_b2.tolist()):
        assert torch.equal(tokens_b2[row, :n], fx["tokens_batch2"][row, :n])
    assert 0 <= int(tokens.min()) and int(tokens.max()) < S3TokenizerConfig.published().codebook_size


def test_log_mel_shape_and_per_row_floor():
    filters, window = slaney_mel_filterbank(16000, 400, 128, 0.0, 8000.0), periodic_hann(400)
    loud, quiet = _noise_wav(0.5, 1), 1e-3 * _noise_wav(0.5, 2)
    both = log_mel_spectrogram(torch.stack([loud, quiet]), filters, window)
    assert both.shape == (2, 128, loud.shape[0] // 160)
    # each row is normalised against its own peak, exactly as if it were computed alone
    assert torch.equal(both[1], log_mel_spectrogram(quiet[None], filters, window)[0])
    with pytest.raises(ValueError):
        log_mel_spectrogram(loud, filters, window)


def test_batch_with_padding_matches_individual_runs(published, tiny, fx):
    tokens, lens = published([fx["wav16"], fx["wav16_b"]])
    alone, alone_len = published([fx["wav16_b"]])
    assert lens[1] == alone_len[0]
    assert torch.equal(tokens[1, : alone_len[0]], alone[0])

    wavs = [_noise_wav(s, i) for i, s in enumerate((2.0, 0.73, 1.31))]
    tokens, lens = tiny(wavs)
    assert tokens.shape == (3, 50)
    for i, wav in enumerate(wavs):
        one, one_len = tiny([wav])
        assert lens[i] == one_len[0] == -(-(wav.shape[0] // 160) // 4)
        assert torch.equal(tokens[i, : lens[i]], one[0])
    # a (B, L) tensor and (1, L) list items mean the same as a list of 1-D waveforms
    same = torch.stack([wavs[0], wavs[0]])
    assert torch.equal(tiny(same)[0], tiny([wavs[0][None], wavs[0]])[0])


def test_max_len_cuts_the_mel_before_encoding(tiny):
    wav = _noise_wav(2.0, 7)
    full, full_len = tiny([wav])
    cut, cut_len = tiny([wav], max_len=20)
    assert cut.shape == (1, 20) and cut_len.tolist() == [20]
    same, _ = tiny([wav], max_len=10_000)
    assert torch.equal(same, full) and full_len.tolist() == [50]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            tiny([wav], max_len=bad)


def test_long_input_uses_sliding_windows(tiny):
    cfg = tiny.cfg
    wav = _noise_wav(35.0, 11)  # 3500 mel frames: windows [0, 3000) and [2600, 3500)
    tokens, lens = tiny([wav])
    assert lens.tolist() == [875] and tokens.shape == (1, 875)
    # first window == the plain path on the first 3000 frames (same log-mel normalisation)
    first, _ = tiny([wav], max_len=cfg.window_frames // cfg.mel_frames_per_token)
    drop = cfg.seam_drop_tokens
    assert torch.equal(tokens[0, : 750 - drop], first[0, : 750 - drop])
    # second window: its ids after the seam's dropped half
    mel = tiny.log_mel(wav[None])[:, :, cfg.window_stride_frames:]
    second, second_len = tiny.encode_mels(mel, torch.tensor([mel.shape[-1]]))
    assert second_len.tolist() == [225]
    assert torch.equal(tokens[0, 750 - drop:], second[0, drop:])

    # mixed batch: the short item is unaffected, the batch is padded with zeros
    short = _noise_wav(3.0, 12)
    mixed, mixed_lens = tiny([wav, short])
    assert mixed_lens.tolist() == [875, 75]
    assert torch.equal(mixed[0], tokens[0])
    assert torch.equal(mixed[1, :75], tiny([short])[0][0])
    assert not mixed[1, 75:].any()


def test_window_merge_keeps_upstream_tail_loss(tiny):
    # 5300 frames: windows start at 0, 2600 and 5200; the 100-frame last window yields 25 ids, all
    # inside the dropped half-overlap, and upstream's stitching then loses the final 50 ids.
    tokens, lens = tiny([_noise_wav(53.0, 13)])
    assert lens.tolist() == [700 + 575 + 0] and tokens.shape == (1, 1275)


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="no waveforms"):
        tiny([])
    with pytest.raises(ValueError, match="too short"):
        tiny([torch.zeros(0)])
    with pytest.raises(ValueError, match="too short"):
        tiny(torch.zeros(1, 100))
    with pytest.raises(TypeError, match="floating"):
        tiny([torch.zeros(16000, dtype=torch.int16)])
    with pytest.raises(ValueError, match="shape"):
        tiny(torch.zeros(1, 1, 16000))
    with pytest.raises(ValueError, match="shape"):
        tiny([torch.zeros(2, 16000)])
    with pytest.raises(TypeError):
        tiny("speech.wav")


@pytest.mark.parametrize("mode", ["plain", "no_grad", "inference"])
def test_works_in_every_grad_mode(tiny, mode):
    wav = _noise_wav(1.0, 21)
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with ctx():
        tokens, lens = tiny([wav])
    expected, _ = tiny([wav])
    assert torch.equal(tokens, expected) and lens.tolist() == [25]
    if mode != "inference":
        lens[0] = 0  # callers may edit the returned lengths in place (embed_ref does)
