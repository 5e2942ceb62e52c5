"""Write a complete synthetic checkpoint directory in the published layout."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import CONDS_FILE, SYNTHETIC_MARKER, TOKENIZER_FILE
from .loader import build_models
from .synthetic import NOT_SPEECH_WARNING, RECIPE_VERSION, state_dict_digest, synth_state_dict
from .text_vocab import write_tokenizer_json

log = logging.getLogger(__name__)

STEMS = ("ve", "t3_cfg", "s3gen")


def write_synthetic_checkpoint(out_dir: str | Path, salt: int = 0, also_pt: bool = False,
                               with_conds: bool = True) -> dict[str, str]:
    """Write ``ve``/``t3_cfg``/``s3gen`` ``.safetensors`` (and ``.pt`` with ``also_pt``), ``tokenizer.json``
    and, with ``with_conds``, a built-in voice ``conds.pt`` made from the synthetic reference signal.

    Returns the SHA-256 digest of each weights file's tensors (keys in state-dict order).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = build_models()
    digests = {}
    for stem, module in zip(STEMS, (models.ve, models.t3, models.s3gen)):
        state = {k: v.contiguous() for k, v in synth_state_dict(module.state_dict(), salt=salt).items()}
        digests[stem] = state_dict_digest(state, list(state))
        meta = {"format": "pt", "synthetic": f"chatterbox-fast recipe v{RECIPE_VERSION} salt {salt}",
                "sha256_tensors": digests[stem]}
        save_file(state, str(out_dir / f"{stem}.safetensors"), metadata=meta)
        if also_pt:
            torch.save(state, str(out_dir / f"{stem}.pt"))
        log.info("wrote %s (%d tensors)", out_dir / f"{stem}.safetensors", len(state))
        del state
    write_tokenizer_json(out_dir / TOKENIZER_FILE)
    if with_conds:
        from .loader import load_models_from_dir
        from .voice import prepare_conditionals, synthetic_reference

        loaded = load_models_from_dir(out_dir, torch.device("cpu"))
        with torch.inference_mode():
            conds = prepare_conditionals(loaded.s3gen, loaded.ve, synthetic_reference(), sample_rate=24000)
        conds.save(out_dir / CONDS_FILE)
    (out_dir / SYNTHETIC_MARKER).write_text(NOT_SPEECH_WARNING + "\n")
    return digests
