"""One-shot module transforms from an ``OptConfig``: lower a component's dtype, run its convolutions
as 4-D channels_last, quantise its dense layers to int8 (``optim.quantize``, CPU only). They change
the modules they are given, once, and are never undone: the engine applies them to its own copy of
the float32 weights, and a new configuration builds a new engine from those weights
(``chatterbox.engine``; ``quantize_models`` is the int8 pass's entry for that copy).

What is not a module transform lives elsewhere: ``torch.compile`` and CUDA graphs are runners the
engine wraps around modules (``engine/runners``), the attention backend and the autograd mode are
contexts the engine enters (``optim.modes``). Dtype boundaries need no wrappers: each component casts
its floating inputs to its own weights' dtype and returns float32 (``nn.dtype``), so a lowered
component takes and returns what its neighbours expect.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.conv import Conv1d, ConvTranspose1d
from .components import component_spec, component_specs, find_components, models_get
from .config import ComponentOpt, OptConfig
from .quantize import quantize_component

log = logging.getLogger(__name__)


def apply_passes(root: nn.Module, opt: OptConfig) -> nn.Module:
    """Transform every component found under ``root`` (``root`` included) as ``opt`` says, in place.

    Runs outside inference mode, so converted weights are ordinary tensors. Returns ``root``.
    """
    with torch.inference_mode(False), torch.no_grad():
        for name, module in find_components(root):
            apply_component_passes(name, module, opt.component(name))
    return root


def apply_component_passes(name: str, module: nn.Module, comp: ComponentOpt) -> nn.Module:
    spec = component_spec(name)
    if not isinstance(module, spec.module_type):
        raise TypeError(f"component {name} must be a {spec.module_type.__name__}, got {type(module).__name__}")
    with torch.inference_mode(False), torch.no_grad():
        if comp.torch_dtype != torch.float32:
            lower_dtype(module.get_submodule(spec.cast_path), comp.torch_dtype, spec.keep_float32)
        if comp.channels_last:
            set_channels_last(module)
        if comp.quantize is not None:
            quantize_component(name, module, comp.quantize)
    return module


def quantize_models(models, opt: OptConfig) -> int:
    """Quantise the components ``opt`` asks for in a pipeline's models (``loader.Models``: ``t3``,
    ``s3gen``, ``ve``), in place, finding each by its path, so any model family's T3 is covered (the
    Llama T3 and Turbo's GPT-2 one). For an engine's own copy, after ``engine.materialize``: it
    replaces modules and never writes into a weight, so the float32 weights the copy shares stay as
    they are. Raises ``ValueError`` for a component that is not on the CPU. -> layers replaced.
    """
    count = 0
    for name, spec in component_specs().items():
        mode = opt.component(name).quantize
        if mode is None:
            continue
        count += quantize_component(name, models_get(models, spec.path), mode)
    return count


def _floating_slots(module: nn.Module, keep: tuple[str, ...]):
    """(owner, attribute, is_parameter) of floating params/buffers outside the ``keep`` subtrees."""
    for sub_name, sub in module.named_modules():
        if any(sub_name == k or sub_name.startswith(k + ".") for k in keep):
            continue
        for slots, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for attr, t in slots.items():
                if t is not None and t.is_floating_point():
                    yield sub, attr, is_param


def lower_dtype(module: nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = ()) -> None:
    """Convert ``module``'s floating parameters and buffers (except under ``keep``) to ``dtype``."""
    for owner, attr, is_param in list(_floating_slots(module, keep)):
        t = owner._parameters[attr] if is_param else owner._buffers[attr]
        if t.dtype == dtype:
            continue
        if is_param:
            t.data = t.data.to(dtype)
        else:
            owner._buffers[attr] = t.to(dtype)


def _channels_last_3d(w: torch.Tensor) -> torch.Tensor:
    """(O, I, k) with strides (I*k, 1, I): ``w.unsqueeze(2)`` is then channels_last-contiguous."""
    return w.permute(0, 2, 1).contiguous().permute(0, 2, 1)


def set_channels_last(module: nn.Module) -> None:
    """Run every convolution under ``module`` as a 4-D channels_last convolution."""
    for sub in module.modules():
        if isinstance(sub, (Conv1d, ConvTranspose1d)):
            sub.run_as_4d = True
            sub.channels_last = True
            if not parametrize.is_parametrized(sub, "weight"):
                sub.weight.data = _channels_last_3d(sub.weight.data)
        elif isinstance(sub, nn.Conv2d):
            sub.weight.data = sub.weight.data.contiguous(memory_format=torch.channels_last)
        elif isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            log.warning("%s is a plain torch 1-D conv and cannot run channels_last; use chatterbox.nn.conv",
                        type(sub).__name__)


__all__ = ["apply_component_passes", "apply_passes", "lower_dtype", "quantize_models", "set_channels_last"]
