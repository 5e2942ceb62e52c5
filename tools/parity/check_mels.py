"""Parity of the feature extractors (``mels`` fixture).

The S3 tokenizer log-mel and the Kaldi/CAMPPlus features belong to other components; they are
compared only once those modules exist.
"""
from __future__ import annotations

import torch

from chatterbox.audio import (S3GenMelConfig, VEMelConfig, resample_soxr, resample_torchaudio, s3gen_mel_spectrogram,
                     trim_silence, ve_mel_spectrogram)
from chatterbox.dsp import periodic_hann, slaney_mel_filterbank

from .runner import Comparison, Fixture, ParityContext, compare

# FIXTURES.md accept tolerance for every `mels.*` tensor (trim indices are exact).
FEAT_RTOL = 1e-4
FEAT_ATOL = 1e-5
S3GEN_SR = 24000
S3_SR = 16000
VE_TRIM_TOP_DB = 20.0
# The S3 tokenizer front end: 400-point STFT, 128 slaney bands.
S3TOK_N_FFT = 400
S3TOK_N_MELS = 128


def _optional_comparisons(fx: Fixture) -> list[Comparison]:
    out: list[Comparison] = []
    wav16 = fx["wav16"]
    try:
        from chatterbox.models.s3tokenizer import log_mel_spectrogram
    except (ImportError, AttributeError):
        log_mel_spectrogram = None
    if log_mel_spectrogram is not None:
        filters = slaney_mel_filterbank(S3_SR, S3TOK_N_FFT, S3TOK_N_MELS)
        logmel = log_mel_spectrogram(wav16[None], filters, periodic_hann(S3TOK_N_FFT))
        out.append(compare("s3tok_logmel_16k", logmel, fx["s3tok_logmel_16k"], FEAT_RTOL, FEAT_ATOL))
    try:
        from chatterbox.models.s3gen.xvector import campplus_features, kaldi_fbank
    except (ImportError, AttributeError):
        return out
    out.append(compare("kaldi_fbank_raw", kaldi_fbank(wav16), fx["kaldi_fbank_raw"], FEAT_RTOL, FEAT_ATOL))
    out.append(compare("campplus_fbank_meannorm", campplus_features(wav16[None]),
                       fx["campplus_fbank_meannorm"], FEAT_RTOL, FEAT_ATOL))
    return out


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    wav16, wav24 = fx["wav16"], fx["wav24"]
    s3_cfg, ve_cfg = S3GenMelConfig.published(), VEMelConfig.published()
    tol = dict(rtol=FEAT_RTOL, atol=FEAT_ATOL)
    start, end = trim_silence(wav16, top_db=VE_TRIM_TOP_DB)
    results = [
        compare("mel_basis_s3gen_24k", s3_cfg.mel_basis(), fx["mel_basis_s3gen_24k"], **tol),
        compare("mel_basis_ve_16k", ve_cfg.mel_basis(), fx["mel_basis_ve_16k"], **tol),
        compare("s3gen_mel_24k", s3gen_mel_spectrogram(wav24[None], s3_cfg), fx["s3gen_mel_24k"], **tol),
        compare("ve_mel_untrimmed", ve_mel_spectrogram(wav16, ve_cfg), fx["ve_mel_untrimmed"], **tol),
        compare("ve_trim_index", torch.tensor([start, end]), fx["ve_trim_index"]),
        compare("ve_mel_trimmed", ve_mel_spectrogram(wav16[start:end], ve_cfg), fx["ve_mel_trimmed"], **tol),
        compare("resample_24k_to_16k_torchaudio", resample_torchaudio(wav24[None], S3GEN_SR, S3_SR),
                fx["resample_24k_to_16k_torchaudio"], **tol),
        compare("resample_24k_to_16k_librosa", torch.from_numpy(resample_soxr(wav24.numpy(), S3GEN_SR, S3_SR)),
                fx["resample_24k_to_16k_librosa"], **tol),
    ]
    return results + _optional_comparisons(fx)
