"""A prepared voice: T3 conditioning plus the S3Gen reference, saved in upstream's ``conds.pt`` format."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .models.s3gen.s3gen import S3GenRef
from .models.t3.cond import T3Cond


# Where a Conditionals remembers its exaggeration (not a dataclass field: never saved or compared).
_EXAGGERATION = "_exaggeration"


@dataclass
class Conditionals:
    t3: T3Cond
    gen: S3GenRef

    def to(self, device: torch.device | str) -> "Conditionals":
        """A copy on ``device`` (the original is left untouched)."""
        return self._same_exaggeration(Conditionals(self.t3.to(device), self.gen.to(device)))

    def clone(self) -> "Conditionals":
        """A deep copy made of ordinary tensors (safe to edit in place whatever mode made the original)."""
        t3 = T3Cond.from_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.t3.as_dict().items()})
        return self._same_exaggeration(Conditionals(t3, self.gen.clone()))

    def with_exaggeration(self, exaggeration: float) -> "Conditionals":
        # An ordinary tensor even when called inside inference_mode: the result is kept as the voice.
        with torch.inference_mode(False):
            emotion = torch.full((1, 1, 1), float(exaggeration), device=self.t3.speaker_emb.device)
        out = Conditionals(self.t3.replace(emotion_adv=emotion), self.gen)
        out.__dict__[_EXAGGERATION] = float(exaggeration)
        return out

    def exaggeration(self) -> float:
        """The voice's emotion exaggeration. Remembered from when it was set, so asking costs no read of a
        device tensor (which would wait for every request queued on the device)."""
        cached = self.__dict__.get(_EXAGGERATION)
        if cached is None:
            cached = float(self.t3.emotion_adv.reshape(-1)[0])
            self.__dict__[_EXAGGERATION] = cached
        return cached

    def _same_exaggeration(self, other: "Conditionals") -> "Conditionals":
        if _EXAGGERATION in self.__dict__:
            other.__dict__[_EXAGGERATION] = self.__dict__[_EXAGGERATION]
        return other

    def save(self, path: str | Path) -> None:
        """Write ``{"t3": {...T3Cond fields}, "gen": {...ref_dict}}`` with ``torch.save``, as upstream does."""
        payload = {"t3": {k: _plain(v) for k, v in self.t3.as_dict().items()},
                   "gen": {k: _plain(v) for k, v in self.gen.as_dict().items()}}
        torch.save(payload, str(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Conditionals":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"conditionals file not found: {path}")
        try:
            # Ordinary tensors whatever the caller's mode, so the voice can be edited in place later.
            with torch.inference_mode(False):
                payload = torch.load(str(path), map_location=map_location, weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read conditionals from {path}: {exc}") from exc
        if not isinstance(payload, dict) or "t3" not in payload or "gen" not in payload:
            raise ValueError(f"{path} is not a conds.pt file (expected a dict with 't3' and 'gen')")
        try:
            return cls(T3Cond.from_dict(payload["t3"]), S3GenRef.from_dict(payload["gen"]))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _plain(value):
    # CPU copies so the file loads on machines without the device it was made on.
    return value.detach().cpu() if torch.is_tensor(value) else value
