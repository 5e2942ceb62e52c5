"""Chatterbox-Turbo and Chatterbox-Nano: checkpoint layout, strict loading, synthetic weights.

A Turbo directory (``ResembleAI/chatterbox-turbo``) holds ``t3_turbo_v1.safetensors``,
``s3gen_meanflow.safetensors``, ``ve.safetensors``, the GPT-2 tokenizer files and optionally a
built-in voice ``conds.pt``; a Nano directory (``ResembleAI/chatterbox-nano``) holds the same with
``t3_nano_v1.safetensors``. Every file is loaded strictly (``checkpoint.load_strict``: missing,
unexpected and mis-shaped keys are named). The one key remapped is GPT-2's token table
``tfmr.wte.weight``, which the checkpoints carry and inference never reads: it is checked and
dropped, as upstream deletes it after loading.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import (CONDS_FILE, OPTIONAL_S3GEN_KEYS, CheckpointError, find_checkpoint_file,
                         is_synthetic_checkpoint, load_strict, read_state_dict)
from .conditionals import Conditionals
from .loader import _finish
from .models.s3gen.s3gen import S3Gen, S3GenConfig
from .models.t3_turbo.t3_turbo import T3Turbo, T3TurboConfig
from .models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from .synthetic import NOT_SPEECH_WARNING, synth_state_dict
from .text_turbo import TurboTokenizer
from .text_vocab_turbo import write_turbo_tokenizer_files

log = logging.getLogger(__name__)

TURBO_REPO_ID = "ResembleAI/chatterbox-turbo"
NANO_REPO_ID = "ResembleAI/chatterbox-nano"
T3_TURBO_STEM = "t3_turbo_v1"
T3_NANO_STEM = "t3_nano_v1"
S3GEN_MEANFLOW_STEM = "s3gen_meanflow"
VE_STEM = "ve"
# What upstream's from_pretrained fetches from either repository.
HUB_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.pt", "*.model")
# GPT-2's token table: in the checkpoint, never used (inputs are embeddings).
WTE_KEY = "tfmr.wte.weight"


@dataclass
class TurboModels:
    t3: T3Turbo
    s3gen: S3Gen
    ve: VoiceEncoder
    tokenizer: TurboTokenizer
    conds: Conditionals | None = None


def t3_stem(nano: bool) -> str:
    return T3_NANO_STEM if nano else T3_TURBO_STEM


def t3_config(nano: bool) -> T3TurboConfig:
    return T3TurboConfig.nano() if nano else T3TurboConfig.turbo()


def t3_checkpoint_shapes(model: T3Turbo) -> dict[str, tuple[int, ...]]:
    """Every key of the published T3 file with its shape: the model's own plus the token table."""
    shapes = {WTE_KEY: (model.cfg.text_vocab_size, model.cfg.dim)}
    shapes.update({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return shapes


def t3_state_from_checkpoint(state: Mapping[str, torch.Tensor], model: T3Turbo, what: str) -> dict[str, torch.Tensor]:
    """The checkpoint's T3 state without the token table (checked for shape when present)."""
    state = dict(state)
    wte = state.pop(WTE_KEY, None)
    want = (model.cfg.text_vocab_size, model.cfg.dim)
    if wte is not None and tuple(wte.shape) != want:
        raise CheckpointError(f"{what}: {WTE_KEY} has shape {list(wte.shape)}, the model expects {list(want)} "
                              "(a Turbo file loaded as Nano, or the reverse?)")
    return state


def build_turbo_models(nano: bool = False) -> tuple[T3Turbo, S3Gen, VoiceEncoder]:
    """T3 (Turbo or Nano), the meanflow S3Gen and the voice encoder at published size, on meta."""
    with torch.device("meta"):
        return (T3Turbo(t3_config(nano)), S3Gen(S3GenConfig.published_meanflow()),
                VoiceEncoder(VoiceEncoderConfig.published()))


def load_t3_turbo(path: str | Path, nano: bool = False, device: torch.device | str = "cpu",
                  cfg: T3TurboConfig | None = None) -> T3Turbo:
    """One T3 file, strictly, into a fresh model (of ``cfg``, default the published Turbo or Nano)."""
    with torch.device("meta"):
        model = T3Turbo(cfg or t3_config(nano))
    state = t3_state_from_checkpoint(read_state_dict(path), model, str(path))
    load_strict(model, state, str(path))
    return _finish(model, torch.device(device))


def load_turbo_models(ckpt_dir: str | Path | None, device: torch.device | str = "cpu", nano: bool = False,
                      salt: int = 0) -> TurboModels:
    """The Turbo (or Nano) models from a checkpoint directory, or, with ``ckpt_dir=None``, the
    synthetic stand-in of ``salt`` (deterministic noise in the published layout: not speech) with the
    synthetic tokenizer. The built-in voice is loaded when the directory has ``conds.pt``."""
    device = torch.device(device)
    if ckpt_dir is None:
        return _synthetic_models(device, nano, salt)
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    if is_synthetic_checkpoint(ckpt_dir):
        log.warning("%s: %s", ckpt_dir, NOT_SPEECH_WARNING)
    # every file located before any is read: a missing one fails in a moment, not after gigabytes
    t3_path, s3gen_path, ve_path = (find_checkpoint_file(ckpt_dir, stem)
                                    for stem in (t3_stem(nano), S3GEN_MEANFLOW_STEM, VE_STEM))
    t3 = load_t3_turbo(t3_path, nano, device)
    _, s3gen, ve = build_turbo_models(nano)
    load_strict(s3gen, read_state_dict(s3gen_path), str(s3gen_path), optional=OPTIONAL_S3GEN_KEYS)
    load_strict(ve, read_state_dict(ve_path), str(ve_path))
    conds_path = ckpt_dir / CONDS_FILE
    conds = Conditionals.load(conds_path, map_location=device) if conds_path.is_file() else None
    return TurboModels(t3=t3, s3gen=_finish(s3gen, device), ve=_finish(ve, device),
                       tokenizer=TurboTokenizer(ckpt_dir), conds=conds)


def _synthetic_models(device: torch.device, nano: bool, salt: int) -> TurboModels:
    t3, s3gen, ve = build_turbo_models(nano)
    for name, module in (("t3", t3), ("s3gen_meanflow", s3gen), ("ve", ve)):
        load_strict(module, synth_state_dict(module.state_dict(), salt=salt), f"synthetic {name}")
        _finish(module, device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = TurboTokenizer(write_turbo_tokenizer_files(tmp))
    return TurboModels(t3=t3, s3gen=s3gen, ve=ve, tokenizer=tokenizer)


def download_turbo_checkpoint(nano: bool = False) -> Path:
    """Fetch the published files with huggingface_hub (uses its cache); a clear error offline."""
    repo_id = NANO_REPO_ID if nano else TURBO_REPO_ID
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise RuntimeError("huggingface_hub is needed to download the checkpoint") from exc
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=list(HUB_PATTERNS)))
    except Exception as exc:
        raise RuntimeError(
            f"could not download {repo_id} ({type(exc).__name__}: {exc}). Offline, load a local directory "
            f"holding {t3_stem(nano)}.safetensors, {S3GEN_MEANFLOW_STEM}.safetensors, {VE_STEM}.safetensors and "
            "the tokenizer files, or the synthetic stand-in (not speech)") from exc


def build_tiny_turbo_models(seed: int = 0) -> TurboModels:
    """Every Turbo model small, with synthetic-recipe weights (salt ``seed``), the published vocabularies
    and mel and the synthetic tokenizer: the Turbo pipeline end to end in seconds, for tests."""
    from .loader import build_tiny_models
    from .synthetic import synthetic_module

    base = build_tiny_models(seed)
    t3 = synthetic_module(T3Turbo(T3TurboConfig.tiny(speaker_embed_size=base.ve.cfg.embed_size)), salt=seed)
    s3gen = synthetic_module(S3Gen(S3GenConfig.tiny_meanflow()), salt=seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = TurboTokenizer(write_turbo_tokenizer_files(tmp))
    return TurboModels(t3=_finish(t3, torch.device("cpu")), s3gen=_finish(s3gen, torch.device("cpu")), ve=base.ve,
                       tokenizer=tokenizer)
