"""Optimisation settings (``OptConfig``) and the one-shot module transforms they name."""
from .config import ComponentOpt, OptConfig
from .modes import attention_context, autograd_context
from .passes import apply_component_passes, apply_passes

__all__ = ["ComponentOpt", "OptConfig", "apply_component_passes", "apply_passes", "attention_context",
           "autograd_context"]
