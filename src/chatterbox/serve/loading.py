"""Building the server's engines from ``ModelSpec``s (one model per device and family) and warming
them up, so that the first real request does not pay for lazy initialisation or graph capture."""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..constants import S3GEN_SR
from ..engine.request import SynthesisRequest
from ..family import is_turbo, load
from ..optim.config import OptConfig
from .config import ModelSpec, ServerConfig

log = logging.getLogger(__name__)


def _tiny(device: str, opt: OptConfig, family: str):
    """Tiny random models of ``family`` (tests and smoke checks; the audio means nothing)."""
    from ..voice import synthetic_reference

    if is_turbo(family):
        from ..loader_turbo import build_tiny_turbo_models
        from ..tts_turbo import SYNTHETIC_REFERENCE_SECONDS, ChatterboxTurboTTS

        m = build_tiny_turbo_models()
        tts = ChatterboxTurboTTS(m.t3, m.s3gen, m.ve, m.tokenizer, device, opt=opt, synthetic=True)
        tts.family = family
        tts.prepare_conditionals(synthetic_reference(seconds=SYNTHETIC_REFERENCE_SECONDS), sample_rate=S3GEN_SR)
        return tts
    from ..loader import build_tiny_models
    from ..text import EnTokenizer
    from ..text_vocab import write_tokenizer_json
    from ..tts import ChatterboxTTS

    models = build_tiny_models()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = EnTokenizer(write_tokenizer_json(Path(tmp) / "tokenizer.json"))
    tts = ChatterboxTTS(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt, synthetic=True)
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    return tts


def load_one(spec: ModelSpec, device: str):
    opt = OptConfig.parse(spec.opt)
    if spec.source == "tiny":
        tts = _tiny(device, opt, spec.family)
    else:
        tts = load(spec.family, device, opt=opt, ckpt=spec.ckpt, pretrained=spec.source == "pretrained")
    if spec.s3gen_batch != tts.engine_cfg.s3gen_batch:  # an engine of its own for the batched S3Gen worker
        tts.engine_cfg = dataclasses.replace(tts.engine_cfg, s3gen_batch=spec.s3gen_batch)
        tts.set_opt(opt)
    return tts


def load_engines(specs: ModelSpec | Sequence[ModelSpec]) -> list:
    """One model per device of each spec (one spec per model family), loaded one after another; each
    model's ``family`` says which requests it serves."""
    specs = (specs,) if isinstance(specs, ModelSpec) else tuple(specs)
    engines = []
    for spec in specs:
        for device in spec.devices:
            start = time.perf_counter()
            tts = load_one(spec, device)
            log.info("engine %d (%s) loaded on %s in %.1f s (%s, opt %s)", len(engines), spec.family, device,
                     time.perf_counter() - start, spec.source, spec.opt)
            if tts.conds is None:
                log.warning("the %s checkpoint has no built-in voice (conds.pt): its requests must name a stored "
                            "voice", spec.family)
            engines.append(tts)
    return engines


def warm_up(tts, cfg: ServerConfig) -> float:
    """Stream one short request through ``tts``'s engine with the server's schedule; returns seconds."""
    if tts.conds is None:
        return 0.0
    start = time.perf_counter()
    request = SynthesisRequest(cfg.warmup_text, max_new_tokens=min(cfg.warmup_tokens, cfg.max_new_tokens), seed=0,
                               watermark=False, chunk_size=cfg.engine_chunk_size,
                               context_window=cfg.context_window)
    for _ in tts.engine.session(request, tts.conds).stream():
        pass
    return time.perf_counter() - start
