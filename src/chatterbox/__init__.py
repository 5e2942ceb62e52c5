"""chatterbox-fast: Chatterbox TTS (and its streaming API) reimplemented for speed."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ChatterboxTTS", "ChatterboxTurboTTS", "Conditionals", "OptConfig", "T3Cond", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import chatterbox` stays cheap for tools that only need a submodule.
    if name == "ChatterboxTTS":
        from .tts import ChatterboxTTS

        return ChatterboxTTS
    if name == "ChatterboxTurboTTS":
        from .tts_turbo import ChatterboxTurboTTS

        return ChatterboxTurboTTS
    if name == "Conditionals":
        from .conditionals import Conditionals

        return Conditionals
    if name == "OptConfig":
        from .opt import OptConfig

        return OptConfig
    if name == "T3Cond":
        from .models.t3.cond import T3Cond

        return T3Cond
    raise AttributeError(f"module 'chatterbox' has no attribute {name!r}")
