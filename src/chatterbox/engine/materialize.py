"""An engine's own copy of the models: built from the float32 weights by the ``OptConfig``'s passes,
never by changing the weights a later configuration will start from.

The copy shares every tensor that needs no change (same device, same dtype: on the CPU a reference
engine costs no memory) and converts the others tensor by tensor while the module structure is
copied, so no component is ever held twice in float32 on the device. Parameters are always new
objects: a pass may rebind ``.data`` on the copy without touching the weights (passes never write
into a weight's storage in place).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..loader import Models
from ..optim.components import component_specs, models_get
from ..optim.config import OptConfig
from ..optim.passes import quantize_models, set_channels_last


def _lowered_ids(models: Models, opt: OptConfig) -> dict[int, torch.dtype]:
    """id(tensor) -> target dtype, for every floating tensor a dtype pass lowers."""
    out: dict[int, torch.dtype] = {}
    for name, spec in component_specs().items():
        dtype = opt.component(name).torch_dtype
        if dtype == torch.float32:
            continue
        root = models_get(models, spec.path).get_submodule(spec.cast_path)
        for sub_name, sub in root.named_modules():
            if any(sub_name == k or sub_name.startswith(k + ".") for k in spec.keep_float32):
                continue
            for t in list(sub._parameters.values()) + list(sub._buffers.values()):
                if t is not None and t.is_floating_point():
                    out[id(t)] = dtype
    return out


def materialize(weights: Models, opt: OptConfig, device: torch.device) -> Models:
    """``weights`` (float32) -> a new ``Models`` on ``device`` with ``opt``'s dtypes, layouts and
    quantised layers."""
    device = torch.device(device)
    lowered = _lowered_ids(weights, opt)
    memo: dict[int, object] = {}
    with torch.inference_mode(False), torch.no_grad():
        for root in (weights.t3, weights.s3gen, weights.ve):
            for module in root.modules():
                for attr, t in module._parameters.items():
                    if t is not None and id(t) not in memo:
                        data = t.detach().to(device=device, dtype=lowered.get(id(t), t.dtype))
                        memo[id(t)] = nn.Parameter(data, requires_grad=False)
                for attr, t in module._buffers.items():
                    if t is not None and id(t) not in memo:
                        memo[id(t)] = t.to(device=device, dtype=lowered.get(id(t), t.dtype))
        models = copy.deepcopy(weights, memo)
        for name, spec in component_specs().items():
            if opt.component(name).channels_last:
                set_channels_last(models_get(models, spec.path))
        for module in models.ve.modules():
            if isinstance(module, nn.LSTM):
                module.flatten_parameters()
        quantize_models(models, opt)  # module swaps on the copy (t3.quantize, CPU only)
    return models
