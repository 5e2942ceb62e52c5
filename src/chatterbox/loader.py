"""Building the three published models and filling them from a checkpoint directory, the hub, or
the synthetic recipe."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (CHECKPOINT_STEMS, CONDS_FILE, OPTIONAL_S3GEN_KEYS, REPO_ID, TOKENIZER_FILE,
                         CheckpointError, find_checkpoint_file, is_synthetic_checkpoint, load_strict,
                         read_state_dict)
from .models.s3gen.hift import fold_weight_norm
from .models.s3gen.s3gen import S3Gen, S3GenConfig
from .models.t3.t3 import T3, T3Config
from .models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from .synthetic import NOT_SPEECH_WARNING, synth_state_dict

log = logging.getLogger(__name__)

HUB_FILES = tuple(f"{stem}.safetensors" for stem in CHECKPOINT_STEMS) + (TOKENIZER_FILE, CONDS_FILE)


@dataclass
class Models:
    t3: T3
    s3gen: S3Gen
    ve: VoiceEncoder


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available on this machine "
                           "(torch.cuda.is_available() is False); use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but MPS is not available; use device='cpu'")
    return device


def build_models() -> Models:
    """The three models at published size, on the meta device (no memory until loaded)."""
    with torch.device("meta"):
        return Models(t3=T3(T3Config.published()), s3gen=S3Gen(S3GenConfig.published()),
                      ve=VoiceEncoder(VoiceEncoderConfig.published()))


def build_tiny_models(seed: int = 0) -> Models:
    """Every model small and randomly initialised (``seed``), with the published vocabularies and mel,
    so the whole pipeline runs end to end in seconds: for tests, never for audio."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ve = VoiceEncoder(VoiceEncoderConfig.tiny())
        models = Models(t3=T3(T3Config.tiny_pipeline(ve.cfg.embed_size)), s3gen=S3Gen(S3GenConfig.tiny()), ve=ve)
    for module in (models.ve, models.t3, models.s3gen):
        _finish(module, torch.device("cpu"))
    return models


def _finish(module: nn.Module, device: torch.device) -> nn.Module:
    """Inference-ready: no parameter requires grad (so plain autograd mode records nothing), eval
    mode, weight norm folded into plain weights (equal within float rounding, and cheaper)."""
    if isinstance(module, S3Gen):
        fold_weight_norm(module.mel2wav)
    module.requires_grad_(False)
    return module.to(device).eval()


def load_models_from_dir(ckpt_dir: str | Path, device: torch.device) -> Models:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    if is_synthetic_checkpoint(ckpt_dir):
        log.warning("%s: %s", ckpt_dir, NOT_SPEECH_WARNING)
    models = build_models()
    for stem, module in (("ve", models.ve), ("t3_cfg", models.t3), ("s3gen", models.s3gen)):
        path = find_checkpoint_file(ckpt_dir, stem)
        optional = OPTIONAL_S3GEN_KEYS if stem == "s3gen" else ()
        load_strict(module, read_state_dict(path), str(path), optional=optional)
        _finish(module, device)
    return models


def load_synthetic_models(device: torch.device, salt: int = 0) -> Models:
    models = build_models()
    for stem, module in (("ve", models.ve), ("t3_cfg", models.t3), ("s3gen", models.s3gen)):
        load_strict(module, synth_state_dict(module.state_dict(), salt=salt), f"synthetic {stem}")
        _finish(module, device)
    return models


def download_checkpoint(repo_id: str = REPO_ID) -> Path:
    """Fetch the published files with huggingface_hub (uses its cache); a clear error offline."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise RuntimeError("huggingface_hub is needed to download the checkpoint") from exc
    paths = []
    try:
        for name in HUB_FILES:
            paths.append(Path(hf_hub_download(repo_id=repo_id, filename=name)))
    except Exception as exc:
        raise RuntimeError(
            f"could not download the Chatterbox checkpoint from {repo_id} ({type(exc).__name__}: {exc}). "
            "Offline, use ChatterboxTTS.from_local(DIR, device) with a directory holding "
            f"{', '.join(HUB_FILES)}, or ChatterboxTTS.from_synthetic(device) for the synthetic stand-in "
            "(not speech)") from exc
    return paths[0].parent
