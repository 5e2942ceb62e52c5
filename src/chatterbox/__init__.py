"""chatterbox-fast: Chatterbox TTS (and its streaming API) reimplemented for speed."""
from __future__ import annotations

__version__ = "0.1.0"
