"""A caller listening in real time: when its audio chunks arrive against when it needs them.

Playback starts when the first chunk arrives. A chunk is needed when the audio before it has been
played; one that arrives later is an underrun (the caller hears silence), and playback resumes when it
arrives, so a late chunk pushes every later deadline back by its lateness.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Playback:
    started_at: float | None = None  # seconds (any clock): arrival of the first chunk
    requested_at: float = 0.0  # when the request was sent (same clock)
    played_until: float = 0.0  # the clock time at which the audio received so far runs out
    audio_s: float = 0.0
    underruns: int = 0
    underrun_s: float = 0.0
    gaps: list[float] = field(default_factory=list)

    def arrive(self, now: float, seconds: float) -> None:
        """A chunk of ``seconds`` of audio arrived at ``now``."""
        if seconds <= 0:
            return
        if self.started_at is None:
            self.started_at = now
            self.played_until = now
        elif now > self.played_until:
            gap = now - self.played_until
            self.underruns += 1
            self.underrun_s += gap
            self.gaps.append(gap)
            self.played_until = now
        self.played_until += seconds
        self.audio_s += seconds

    @property
    def ttfa_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.requested_at
