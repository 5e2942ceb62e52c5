"""Optional Perth implicit watermark, applied as its own (timed, switchable) stage."""
from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def watermark_available() -> bool:
    return importlib.util.find_spec("perth") is not None


class Watermarker:
    """Wraps resemble-perth's implicit watermarker (install the ``watermark`` extra)."""

    def __init__(self) -> None:
        try:
            import perth
        except ImportError as exc:
            raise RuntimeError("watermarking needs resemble-perth: pip install 'chatterbox-fast[watermark]'") from exc
        self._impl = perth.PerthImplicitWatermarker()

    def apply(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """(1, L) float waveform -> watermarked (1, L) float32 CPU tensor."""
        marked = self._impl.apply_watermark(wav.detach().float().cpu().numpy()[0], sample_rate=sample_rate)
        return torch.from_numpy(np.ascontiguousarray(marked, dtype=np.float32)).unsqueeze(0)
