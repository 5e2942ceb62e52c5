"""Inputs of the A/B runs: the text sets and the 10 s reference recording."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_SECONDS = 10.0
REFERENCE_SAMPLE_RATE = 24000


@dataclass(frozen=True)
class TextCase:
    name: str
    text: str
    # Synthetic weights rarely sample the stop token, so every generation is bounded; with real
    # weights the bound only cuts utterances longer than the figure being measured.
    max_new_tokens: int


# "short": the time-to-first-audio sentence. "long": the 250-token (about 10 s) utterance of issue 8.
# Both stay one text segment (well under TextSplitConfig.max_text_tokens), so the T3 call of the
# pipeline is the only one per run and its token count is known exactly.
TEXT_SETS: dict[str, TextCase] = {
    "short": TextCase("short", "Hello, this is a quick test of streaming speech.", 100),
    "long": TextCase(
        "long",
        "Streaming speech synthesis has to start talking almost at once and then keep ahead of the "
        "listener, so every stage of the pipeline is measured on its own: the text model that writes "
        "speech tokens, the flow model that turns them into a spectrogram, and the vocoder that makes "
        "the waveform you finally hear.",
        250,
    ),
}

# --quick: a handful of tokens on the CPU, enough to run every code path once.
QUICK_MAX_NEW_TOKENS = 6
# --quick speaks with a voice made from this much synthetic reference: the flow's cost grows with
# the voice's prompt frames, and the smoke run only has to pass through every stage.
QUICK_VOICE_SECONDS = 2.0


def text_cases(names: list[str], max_new_tokens: int | None = None) -> list[TextCase]:
    """The named sets in order; ``max_new_tokens`` overrides each set's bound."""
    cases = []
    for name in names:
        if name not in TEXT_SETS:
            raise ValueError(f"unknown text set {name!r}; known: {', '.join(TEXT_SETS)}")
        case = TEXT_SETS[name]
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            case = TextCase(case.name, case.text, max_new_tokens)
        cases.append(case)
    if not cases:
        raise ValueError("no text set selected")
    return cases


def reference_audio(path: str | Path | None = None, seconds: float = REFERENCE_SECONDS) -> tuple[np.ndarray, int]:
    """The prepare_conditionals input: a recording cut to ``seconds``, or the synthetic voice-like
    signal of that length when no file is given. Returns (samples float32, sample_rate)."""
    if path is None:
        from chatterbox.voice import synthetic_reference

        wav = synthetic_reference(seconds=seconds, sample_rate=REFERENCE_SAMPLE_RATE)
        return wav, REFERENCE_SAMPLE_RATE
    import librosa

    wav, sr = librosa.load(str(path), sr=REFERENCE_SAMPLE_RATE, duration=seconds)
    return wav.astype(np.float32), int(sr)
