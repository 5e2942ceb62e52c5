"""Write a synthetic Chatterbox-Turbo/Nano checkpoint directory in the published layout.

Values follow the parity kit's recipe (``synthetic.py``) key by key, including the token table
``tfmr.wte.weight`` the published T3 files carry. No gain beyond the recipe's is needed: GPT-2's
LayerNorms keep the backbone's scale, and the recipe's ``speech_head.weight`` gain (keyed by name)
makes the Turbo speech logits peaked too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import CONDS_FILE, SYNTHETIC_MARKER
from .loader_turbo import (S3GEN_MEANFLOW_STEM, VE_STEM, build_turbo_models, load_turbo_models,
                           t3_checkpoint_shapes, t3_stem)
from .synthetic import NOT_SPEECH_WARNING, RECIPE_VERSION, state_dict_digest, synth_tensor
from .text_vocab_turbo import write_turbo_tokenizer_files

log = logging.getLogger(__name__)

VARIANTS = ("turbo", "nano")


Entries = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _write(path: Path, entries: Entries, salt: int) -> str:
    from safetensors.torch import save_file

    state = {k: synth_tensor(k, shape, dtype, salt).contiguous() for k, (shape, dtype) in entries.items()}
    digest = state_dict_digest(state, list(state))
    meta = {"format": "pt", "synthetic": f"chatterbox-fast recipe v{RECIPE_VERSION} salt {salt}",
            "sha256_tensors": digest}
    save_file(state, str(path), metadata=meta)
    log.info("wrote %s (%d tensors)", path, len(state))
    return digest


def _entries(module: torch.nn.Module) -> Entries:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def write_synthetic_turbo_checkpoint(out_dir: str | Path, salt: int = 0, variants: Iterable[str] = VARIANTS,
                                     with_conds: bool = False) -> dict[str, str]:
    """Write the T3 file of each of ``variants`` (``turbo``, ``nano``), ``s3gen_meanflow`` and ``ve``
    ``.safetensors``, the tokenizer files and the synthetic marker; with ``with_conds`` also a built-in
    voice ``conds.pt`` (Turbo front end on ``voice.synthetic_reference``). Returns each weights file's
    tensor digest (SHA-256, keys in file order)."""
    variants = tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {variants}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for variant in variants:
        t3, _, _ = build_turbo_models(nano=variant == "nano")
        stem = t3_stem(variant == "nano")
        digests[stem] = _write(out_dir / f"{stem}.safetensors",
                                {k: (shape, torch.float32) for k, shape in t3_checkpoint_shapes(t3).items()}, salt)
    _, s3gen, ve = build_turbo_models()
    digests[S3GEN_MEANFLOW_STEM] = _write(out_dir / f"{S3GEN_MEANFLOW_STEM}.safetensors", _entries(s3gen), salt)
    digests[VE_STEM] = _write(out_dir / f"{VE_STEM}.safetensors", _entries(ve), salt)
    write_turbo_tokenizer_files(out_dir)
    (out_dir / SYNTHETIC_MARKER).write_text(NOT_SPEECH_WARNING + "\n")
    if with_conds:
        from .voice import synthetic_reference
        from .voice_turbo import TurboVoiceConfig, prepare_turbo_conditionals

        models = load_turbo_models(out_dir, "cpu", nano=variants[0] == "nano")
        reference = synthetic_reference(seconds=TurboVoiceConfig().min_reference_seconds + 1.0)
        with torch.inference_mode():
            conds = prepare_turbo_conditionals(models.s3gen, models.ve, reference, sample_rate=24000)
        conds.save(out_dir / CONDS_FILE)
    return digests
