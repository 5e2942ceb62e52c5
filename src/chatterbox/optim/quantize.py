"""Dynamic int8 quantisation of a component's dense layers, for the CPU.

T3 decodes one token per step: every projection is a matrix-vector product, bound by how fast the
weights stream from memory. Stored as int8 (one scale per output channel, symmetric) they are a
quarter of the float32 bytes, and the CPU's int8 GEMM (fbgemm / oneDNN, through
``torch.ops.quantized``) runs the step's projections about 3x faster than float32 on 2 cores
(patches/18). The activations are quantised per call (per tensor, affine, to uint8, hence
"dynamic"); the result is float32 with the float32 bias added.

One-shot and in place, as every pass (``optim.passes``): each ``nn.Linear`` and GPT-2 ``Conv1D``
under the component's target subtrees is replaced by an ``Int8DynamicLinear`` built from its weights.
Layers already replaced are left alone, so applying the pass twice changes nothing more.

CPU only: the int8 kernels exist for the CPU, and a layer whose weight lives elsewhere is refused
with an error naming the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.t3_turbo.gpt2 import Conv1D
from ..nn.dtype import as_float32
from .config import QUANTIZE_COMPONENTS, QUANTIZE_MODES

log = logging.getLogger(__name__)

# Per component: the subtrees (relative to the component) whose dense layers the pass replaces. T3's
# backbone projections and its speech head are what a decode step multiplies by (the same paths in
# the Llama T3 and the GPT-2 T3 of Turbo/Nano); the conditioning encoder runs once per request, and
# the text head is only read by teacher forcing.
QUANTIZE_TARGETS = {"t3": ("tfmr", "speech_head")}
assert tuple(QUANTIZE_TARGETS) == QUANTIZE_COMPONENTS


@dataclass(frozen=True)
class Int8DynamicConfig:
    # Activations quantised to 7 bits instead of 8. x86 CPUs without VNNI sum pairs of uint8 x int8
    # products in int16 (vpmaddubsw), which saturates at full range; 7 bits never does, on any CPU.
    # With VNNI the products are summed in int32 and the 8th bit halves the activations' rounding
    # error (T3 Nano logits: 8 % -> 4.4 % relative error, patches/18).
    reduce_range: bool = True
    # A weight row that is all zero still needs a positive scale.
    min_scale: float = 1e-12

    def __post_init__(self) -> None:
        if not self.min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {self.min_scale}")

    @classmethod
    def for_this_cpu(cls) -> "Int8DynamicConfig":
        """Full-range activations where the CPU has VNNI (int32 sums), 7 bits elsewhere."""
        return cls(reduce_range=not cpu_has_vnni())


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (torch's own probe; False where torch has none)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


# int8 weights are symmetric: [-127, 127] with zero point 0
_INT8_MAX = 127


def quantize_weight(weight: Tensor, cfg: Int8DynamicConfig) -> Tensor:
    """float32 (out, in) -> a qint8 tensor with one symmetric scale per output row."""
    scales = (weight.abs().amax(dim=1) / _INT8_MAX).clamp(min=cfg.min_scale).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(weight, scales, zero_points, axis=0, dtype=torch.qint8)


class Int8DynamicLinear(nn.Module):
    """y = x @ W^T + b with W stored as per-channel int8 and x quantised per call; float32 in and out.

    ``weight`` is the float32 (out, in) weight the layer was quantised from (nn.Linear's layout),
    kept for what code reads off a layer's weight: its dtype (the heads cast their input to it) and
    its device. On the CPU an engine's copy shares it with the float32 weights the engine was built
    from, so keeping it costs no memory there. Computing with it gives the unquantised layer.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, cfg: Int8DynamicConfig):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
        if weight.device.type != "cpu":
            raise ValueError(f"int8 dynamic quantisation runs on the CPU only; this weight is on {weight.device}")
        if weight.dtype != torch.float32:
            raise ValueError(f"int8 dynamic quantisation starts from float32 weights, got {weight.dtype}")
        self.cfg = cfg
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach()
        fp_bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.packed = torch.ops.quantized.linear_prepack(quantize_weight(self.weight, cfg), fp_bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear, cfg: Int8DynamicConfig) -> "Int8DynamicLinear":
        return cls(layer.weight, layer.bias, cfg)

    @classmethod
    def from_conv1d(cls, layer: Conv1D, cfg: Int8DynamicConfig) -> "Int8DynamicLinear":
        """GPT-2's ``Conv1D`` keeps its weight (in, out): transposed to (out, in), a view, no copy."""
        return cls(layer.weight.t(), layer.bias, cfg)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = as_float32(x).reshape(-1, self.in_features)  # (N, in)
        out = torch.ops.quantized.linear_dynamic(flat, self.packed, self.cfg.reduce_range)  # (N, out)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"reduce_range={self.cfg.reduce_range}")


def _quantized(layer: nn.Module, cfg: Int8DynamicConfig) -> Int8DynamicLinear | None:
    """The int8 replacement of a dense layer, or None for any other module."""
    if isinstance(layer, nn.Linear):
        return Int8DynamicLinear.from_linear(layer, cfg)
    if isinstance(layer, Conv1D):
        return Int8DynamicLinear.from_conv1d(layer, cfg)
    return None


def _replace_in(parent: nn.Module, name: str, cfg: Int8DynamicConfig) -> int:
    """Replace ``parent.<name>`` (if a dense layer) or every dense layer below it; -> how many."""
    target = parent.get_submodule(name)
    new = _quantized(target, cfg)
    if new is not None:
        parent.set_submodule(name, new)
        return 1
    count = 0
    for child_name, child in list(target.named_modules()):
        new = _quantized(child, cfg)
        if new is not None:
            target.set_submodule(child_name, new)
            count += 1
    return count


def quantize_component(name: str, module: nn.Module, mode: str,
                       cfg: Int8DynamicConfig | None = None) -> int:
    """Replace the dense layers of component ``name``'s target subtrees in ``module`` by ``mode``'s
    quantised layers, in place; -> how many were replaced (0 when they already were)."""
    if mode is None or mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES[1:]}, got {mode!r}")
    if name not in QUANTIZE_TARGETS:
        raise ValueError(f"{name} has no quantisation pass (supported: {QUANTIZE_COMPONENTS})")
    cfg = cfg or Int8DynamicConfig.for_this_cpu()
    for p in module.parameters():
        if p.device.type != "cpu":
            raise ValueError(f"{name}.quantize={mode} runs on the CPU only (int8 CPU kernels); "
                             f"{name} is on {p.device}: turn it off for this device")
    with torch.inference_mode(False), torch.no_grad():
        count = sum(_replace_in(module, sub, cfg) for sub in QUANTIZE_TARGETS[name])
    log.debug("%s: %d dense layers quantised (%s)", name, count, mode)
    return count


__all__ = ["QUANTIZE_TARGETS", "Int8DynamicConfig", "Int8DynamicLinear", "cpu_has_vnni", "quantize_component",
           "quantize_weight"]
