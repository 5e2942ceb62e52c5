"""The model families this package runs (original Chatterbox, Chatterbox-Turbo, Chatterbox-Nano) and
how each is loaded, so that the command line, the server and the benchmarks choose a family by
name in one place. Turbo and Nano share a class (``ChatterboxTurboTTS``) and differ in T3's size."""
from __future__ import annotations

from pathlib import Path

import torch

from .optim.config import OptConfig

FAMILIES = ("original", "turbo", "nano")
DEFAULT_FAMILY = "original"
# What each family's checkpoint directory must hold besides its tokenizer (stems of .safetensors/.pt).
_ORIGINAL_STEMS = ("ve", "t3_cfg", "s3gen")


def check_family(name: str) -> str:
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(FAMILIES)}")
    return name


def is_turbo(family: str) -> bool:
    """Turbo and Nano: GPT-2 T3 without guidance, meanflow S3Gen, byte-level BPE text."""
    return check_family(family) != "original"


def model_class(family: str) -> type:
    if is_turbo(family):
        from .tts_turbo import ChatterboxTurboTTS

        return ChatterboxTurboTTS
    from .tts import ChatterboxTTS

    return ChatterboxTTS


def load(family: str, device: str | torch.device = "cpu", opt: OptConfig | None = None, ckpt: str | Path | None = None,
         pretrained: bool = False, salt: int = 0):
    """A model of ``family``: from ``ckpt`` (a directory), the published checkpoint (``pretrained``),
    or else full-size synthetic weights of ``salt`` (not speech)."""
    cls = model_class(family)
    extra = {"nano": family == "nano"} if is_turbo(family) else {}
    if ckpt is not None:
        return cls.from_local(ckpt, device, opt=opt, **extra)
    if pretrained:
        return cls.from_pretrained(device, opt=opt, **extra)
    return cls.from_synthetic(device, salt=salt, opt=opt, **extra)


def checkpoint_stems(family: str) -> tuple[str, ...]:
    """The weights files (stems) a checkpoint directory of ``family`` must hold."""
    if not is_turbo(family):
        return _ORIGINAL_STEMS
    from .loader_turbo import S3GEN_MEANFLOW_STEM, VE_STEM, t3_stem

    return (t3_stem(family == "nano"), S3GEN_MEANFLOW_STEM, VE_STEM)


def missing_tokenizer(family: str, ckpt: Path) -> str | None:
    """What tokenizer file ``ckpt`` lacks for ``family``, or None."""
    from .checkpoint import TOKENIZER_FILE

    if not is_turbo(family):
        return None if (ckpt / TOKENIZER_FILE).is_file() else TOKENIZER_FILE
    from .text_turbo import MERGES_FILE, TOKENIZER_JSON_FILE, VOCAB_FILE

    if (ckpt / TOKENIZER_JSON_FILE).is_file() or all((ckpt / f).is_file() for f in (VOCAB_FILE, MERGES_FILE)):
        return None
    return f"{TOKENIZER_JSON_FILE} (or {VOCAB_FILE} and {MERGES_FILE})"


def tokenizer(family: str, ckpt: Path | None):
    """``family``'s text tokenizer from ``ckpt``, or the synthetic checkpoint's without one (no model
    is loaded). Turbo's is byte-level BPE: it encodes any text."""
    import tempfile

    if is_turbo(family):
        from .text_turbo import TurboTokenizer

        if ckpt is not None:
            return TurboTokenizer(ckpt)
        from .text_vocab_turbo import write_turbo_tokenizer_files

        with tempfile.TemporaryDirectory() as tmp:
            return TurboTokenizer(write_turbo_tokenizer_files(tmp))
    from .checkpoint import TOKENIZER_FILE
    from .text import EnTokenizer

    if ckpt is not None:
        return EnTokenizer(ckpt / TOKENIZER_FILE)
    from .text_vocab import write_tokenizer_json

    with tempfile.TemporaryDirectory() as tmp:
        return EnTokenizer(write_tokenizer_json(Path(tmp) / TOKENIZER_FILE))


def min_reference_seconds(family: str) -> float | None:
    """The shortest reference a voice of ``family`` accepts (strictly longer), or None (no minimum
    beyond the front end's own)."""
    if not is_turbo(family):
        return None
    from .voice_turbo import TurboVoiceConfig

    return TurboVoiceConfig.published().min_reference_seconds


def request_defaults(family: str) -> dict:
    """Sampling settings a request of ``family`` gets when it names none (upstream's ``generate``
    defaults): the original model's are ``SynthesisRequest``'s own; Turbo and Nano sample with top-k
    1000 and top-p 0.95 and have no min-p, guidance or exaggeration."""
    if not is_turbo(family):
        return {}
    return {"exaggeration": 0.0, "cfg_weight": 0.0, "min_p": 0.0, "top_p": 0.95, "top_k": 1000}
