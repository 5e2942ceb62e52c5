"""The runtime: an ``Engine`` built once per ``OptConfig`` from the float32 weights, and one
``Session`` per request (see docs/architecture.md)."""
from .engine import Engine, EngineConfig
from .request import SynthesisRequest
from .session import Session, SynthesisResult
from .t3_runner import T3RunnerConfig

__all__ = ["Engine", "EngineConfig", "Session", "SynthesisRequest", "SynthesisResult", "T3RunnerConfig"]
