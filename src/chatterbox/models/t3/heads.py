"""The two output heads every T3 has (speech and text), read in the heads' own dtype."""
from __future__ import annotations

from torch import Tensor, nn

from ...nn.dtype import cast_floating


class T3Heads:
    """For a T3 module with ``speech_head`` and ``text_head`` linears."""

    speech_head: nn.Linear
    text_head: nn.Linear

    def speech_logits(self, hidden: Tensor) -> Tensor:
        """Hidden states (..., C) -> speech logits (..., V) in the head's dtype (float32 by default)."""
        return self.speech_head(cast_floating(hidden, self.speech_head.weight.dtype))

    def text_logits(self, hidden: Tensor) -> Tensor:
        return self.text_head(cast_floating(hidden, self.text_head.weight.dtype))
