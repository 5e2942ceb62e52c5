"""Building the server's engines from a ``ModelSpec`` (one ``ChatterboxTTS`` per device) and warming
them up, so that the first real request does not pay for lazy initialisation or graph capture."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from ..constants import S3GEN_SR
from ..engine.request import SynthesisRequest
from ..optim.config import OptConfig
from .config import ModelSpec, ServerConfig

log = logging.getLogger(__name__)


def _tiny(device: str, opt: OptConfig):
    """Tiny random models (tests and smoke checks; the audio means nothing)."""
    from ..loader import build_tiny_models
    from ..text import EnTokenizer
    from ..text_vocab import write_tokenizer_json
    from ..tts import ChatterboxTTS
    from ..voice import synthetic_reference

    models = build_tiny_models()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = EnTokenizer(write_tokenizer_json(Path(tmp) / "tokenizer.json"))
    tts = ChatterboxTTS(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt, synthetic=True)
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    return tts


def load_one(spec: ModelSpec, device: str):
    from ..tts import ChatterboxTTS

    opt = OptConfig.parse(spec.opt)
    if spec.source == "synthetic":
        return ChatterboxTTS.from_synthetic(device, opt=opt)
    if spec.source == "pretrained":
        return ChatterboxTTS.from_pretrained(device, opt=opt)
    if spec.source == "local":
        return ChatterboxTTS.from_local(spec.ckpt, device, opt=opt)
    return _tiny(device, opt)


def load_engines(spec: ModelSpec) -> list:
    """One model per entry of ``spec.devices``, loaded one after another."""
    engines = []
    for device in spec.devices:
        start = time.perf_counter()
        tts = load_one(spec, device)
        log.info("engine %d loaded on %s in %.1f s (%s, opt %s)", len(engines), device,
                 time.perf_counter() - start, spec.source, spec.opt)
        if tts.conds is None:
            log.warning("the checkpoint has no built-in voice (conds.pt): requests must name a stored voice")
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
