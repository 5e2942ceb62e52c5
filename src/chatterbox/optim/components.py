"""The components an ``OptConfig`` addresses: their module types and where they sit in the pipeline."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from .config import COMPONENTS


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    module_type: type
    path: str  # where the component sits under the pipeline's models (``Models``: t3, s3gen, ve)
    cast_path: str = ""  # subtree whose dtype a pass lowers ("" = the whole component)
    keep_float32: tuple[str, ...] = ()  # paths, relative to the cast subtree, that stay float32


@functools.lru_cache(maxsize=1)
def component_specs() -> dict[str, ComponentSpec]:
    # Imported here: the model modules are heavy, and this table is only needed once a pass runs.
    from ..models.s3gen.decoder import ConditionalDecoder
    from ..models.s3gen.encoder import UpsampleConformerEncoder
    from ..models.s3gen.hift import HiFTGenerator
    from ..models.s3gen.xvector import CAMPPlus
    from ..models.s3tokenizer import S3Tokenizer
    from ..models.t3.t3 import T3
    from ..models.voice_encoder import VoiceEncoder

    specs = [
        # the log-mel front end and the FSQ quantizer stay float32: only the encoder is lowered
        ComponentSpec("s3tokenizer", S3Tokenizer, "s3gen.tokenizer", cast_path="encoder"),
        ComponentSpec("voice_encoder", VoiceEncoder, "ve"),
        ComponentSpec("campplus", CAMPPlus, "s3gen.speaker_encoder"),
        # the output heads stay float32, so sampling sees float32 logits
        ComponentSpec("t3", T3, "t3", keep_float32=("speech_head", "text_head")),
        ComponentSpec("flow_encoder", UpsampleConformerEncoder, "s3gen.flow.encoder"),
        ComponentSpec("cfm_estimator", ConditionalDecoder, "s3gen.flow.decoder.estimator"),
        # the sine source and the F0 predictor stay float32 (phase accumulation, F0 in Hz)
        ComponentSpec("hift", HiFTGenerator, "s3gen.mel2wav", keep_float32=("m_source", "f0_predictor")),
    ]
    assert tuple(s.name for s in specs) == COMPONENTS
    return {s.name: s for s in specs}


def component_spec(name: str) -> ComponentSpec:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {COMPONENTS}")
    return component_specs()[name]


def find_components(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every component found under ``root`` (``root`` itself included), by type."""
    by_type = [(spec.module_type, name) for name, spec in component_specs().items()]
    found = []
    for module in root.modules():
        for cls, name in by_type:
            if isinstance(module, cls):
                found.append((name, module))
    return found


def models_get(models, path: str) -> nn.Module:
    """The module at a component's ``path`` (``ComponentSpec.path``) in a pipeline's models
    (``loader.Models``: ``t3``, ``s3gen``, ``ve``)."""
    head, _, rest = path.partition(".")
    module = getattr(models, head)
    return module.get_submodule(rest) if rest else module


def models_set(models, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in a pipeline's models (a load-time module swap)."""
    head, _, rest = path.partition(".")
    if not rest:
        setattr(models, head, module)
        return
    parent_path, _, name = rest.rpartition(".")
    parent = getattr(models, head)
    if parent_path:
        parent = parent.get_submodule(parent_path)
    setattr(parent, name, module)
