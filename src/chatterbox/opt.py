"""Optimisation settings: one frozen ``OptConfig``, a field per component, applied as passes.

``OptConfig.reference()`` is fp32 eager and numerically equal to upstream: the A/B baseline and the
parity target. Model files never read this object; ``apply_opt`` changes built modules, and the
pipeline reads the global fields (autograd mode, CFM steps, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

AUTOGRAD_MODES = ("inference_mode", "no_grad", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPONENTS = ("s3tokenizer", "voice_encoder", "campplus", "t3", "flow_encoder", "cfm_estimator", "hift")


@dataclass(frozen=True)
class ComponentOpt:
    dtype: str = "float32"
    channels_last: bool = False
    compile: str | None = None
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class OptConfig:
    s3tokenizer: ComponentOpt = field(default_factory=ComponentOpt)
    voice_encoder: ComponentOpt = field(default_factory=ComponentOpt)
    campplus: ComponentOpt = field(default_factory=ComponentOpt)
    t3: ComponentOpt = field(default_factory=ComponentOpt)
    flow_encoder: ComponentOpt = field(default_factory=ComponentOpt)
    cfm_estimator: ComponentOpt = field(default_factory=ComponentOpt)
    hift: ComponentOpt = field(default_factory=ComponentOpt)
    autograd_mode: str = "inference_mode"
    cfm_steps: int = 10
    attention_backend: str = "sdpa"
    # T3 checks for the stop token every this many steps (one host sync per check).
    stop_check_every: int = 8

    def __post_init__(self) -> None:
        if self.autograd_mode not in AUTOGRAD_MODES:
            raise ValueError(f"autograd_mode must be one of {AUTOGRAD_MODES}, got {self.autograd_mode!r}")
        if self.cfm_steps < 1:
            raise ValueError(f"cfm_steps must be >= 1, got {self.cfm_steps}")
        if self.stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {self.stop_check_every}")

    @classmethod
    def reference(cls) -> "OptConfig":
        """fp32, eager, upstream-equivalent numerics."""
        return cls()

    def replace(self, **changes) -> "OptConfig":
        return dataclasses.replace(self, **changes)

    def with_component(self, name: str, **changes) -> "OptConfig":
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; known: {COMPONENTS}")
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **changes)})


def autograd_context(mode: str) -> contextlib.AbstractContextManager:
    """The context a public call runs in; entered once per call (once per chunk when streaming)."""
    if mode == "inference_mode":
        return torch.inference_mode()
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "none":
        return contextlib.nullcontext()
    raise ValueError(f"autograd_mode must be one of {AUTOGRAD_MODES}, got {mode!r}")


def apply_opt(tts, opt: OptConfig) -> None:
    """Apply ``opt`` to a loaded pipeline's modules. The reference configuration changes nothing."""
    if not isinstance(opt, OptConfig):
        raise TypeError(f"opt must be an OptConfig, got {type(opt).__name__}")
    # Passes for dtype, channels_last, compile and CUDA graphs are added per component here.
