"""Deterministic synthetic weights in the published checkpoint layout (the embedded default).

The values follow the parity kit's recipe (version 1): one CPU generator per state-dict key, seeded
with the CRC-32 of the key, drawing the whole shape at once; a handful of rules pick the scale.
Weights made this way are not a trained model: whatever they synthesise is not speech.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from typing import Iterable, Mapping

import torch

from .constants import S3_SR
from .dsp import periodic_hann, slaney_mel_filterbank

RECIPE_VERSION = 1
NOT_SPEECH_WARNING = (
    "synthetic checkpoint: weights are deterministic noise, the output is NOT speech "
    "(pass a real checkpoint directory to hear a voice)"
)

_SCALE_JITTER = 0.05
_BIAS_SCALE = 0.02
_WEIGHT_NORM_GAIN_SUFFIX = "parametrizations.weight.original0"

# Per-key constants and gains that keep the synthetic model in a healthy numeric range.
_CONSTANT_BY_KEY = {"mel2wav.f0_predictor.classifier.bias": 50.0}
_GAIN_BY_KEY = {
    "mel2wav.f0_predictor.classifier.weight": 120.0,
    "mel2wav.conv_post.parametrizations.weight.original0": 0.25,
    "tokenizer.quantizer._codebook.project_down.weight": 0.25,
    "speech_head.weight": 4.0,
}


def key_seed(key: str, salt: int = 0) -> int:
    text = key if salt == 0 else f"{salt}:{key}"
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _standard_normal(key: str, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key_seed(key, salt))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _fixed_buffer(key: str) -> torch.Tensor | None:
    if key == "tokenizer._mel_filters":
        return slaney_mel_filterbank(S3_SR, 400, 128)
    if key == "tokenizer.window":
        return periodic_hann(400)
    return None


def synth_tensor(key: str, shape: Iterable[int], dtype: torch.dtype = torch.float32, salt: int = 0) -> torch.Tensor:
    """The synthetic value of one checkpoint entry (``key`` as stored inside its file)."""
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_mean":
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var":
        return torch.ones(shape, dtype=dtype)
    fixed = _fixed_buffer(key)
    if fixed is not None:
        if tuple(fixed.shape) != shape:
            raise ValueError(f"{key}: fixed buffer has shape {tuple(fixed.shape)}, expected {shape}")
        return fixed.to(dtype)
    if key in _CONSTANT_BY_KEY:
        return torch.full(shape, _CONSTANT_BY_KEY[key], dtype=dtype)
    gain = _GAIN_BY_KEY.get(key, 1.0)
    z = _standard_normal(key, shape, salt)
    if key.endswith(_WEIGHT_NORM_GAIN_SUFFIX):
        return (gain * (1.0 + _SCALE_JITTER * z)).to(dtype)
    if len(shape) == 1:
        if leaf.endswith("weight") or leaf == "alpha":
            return (1.0 + _SCALE_JITTER * z).to(dtype)
        return (_BIAS_SCALE * z).to(dtype)
    fan_in = math.prod(shape[1:])
    return (gain * z / math.sqrt(fan_in)).to(dtype)


def synth_state_dict(template: Mapping[str, torch.Tensor], prefix: str = "", salt: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic values for every entry of ``template`` (a state dict, meta tensors are fine).

    ``prefix`` is prepended to each key to form the key as stored in the checkpoint file, e.g.
    ``"mel2wav."`` for a vocoder built on its own; the returned dict keeps the template's keys.
    """
    return {k: synth_tensor(prefix + k, t.shape, t.dtype, salt) for k, t in template.items()}


def state_dict_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 over each key's UTF-8 bytes followed by its tensor's raw little-endian bytes."""
    h = hashlib.sha256()
    for key in keys:
        t = state[key].contiguous()
        h.update(key.encode("utf-8"))
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def synthetic_module(module: torch.nn.Module, prefix: str = "", salt: int = 0) -> torch.nn.Module:
    """Fill a built module (on any device, meta included) with synthetic weights, strictly."""
    values = synth_state_dict(module.state_dict(), prefix=prefix, salt=salt)
    module.load_state_dict(values, strict=True, assign=True)
    return module
