"""Compatibility import path: ``from chatterbox.opt import OptConfig`` (the settings live in ``chatterbox.optim``)."""
from .optim.config import (ATTENTION_BACKENDS, AUTOGRAD_MODES, CHANNELS_LAST_COMPONENTS, COMPILE_MODES, COMPONENTS,
                           CUDA_GRAPH_COMPONENTS, DTYPES, PRESETS, ComponentOpt, OptConfig)
from .optim.modes import attention_context, autograd_context

__all__ = ["ATTENTION_BACKENDS", "AUTOGRAD_MODES", "CHANNELS_LAST_COMPONENTS", "COMPILE_MODES", "COMPONENTS",
           "CUDA_GRAPH_COMPONENTS", "DTYPES", "PRESETS", "ComponentOpt", "OptConfig", "attention_context",
           "autograd_context"]
