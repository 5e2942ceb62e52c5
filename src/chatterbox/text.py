"""Text side of the pipeline: punctuation clean-up, the English tokenizer, sentence splitting,
and the speech-token clean-up between T3 and S3Gen."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMPTY_TEXT_SUBSTITUTE = "You need to add some text for me to talk."
# Replacements applied in this order (order matters: "..." before ",", " - " before "-").
PUNCTUATION_REWRITES = (
    ("...", ", "),
    ("\u2026", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("\u2014", "-"),
    ("\u2013", "-"),
    (" ,", ","),
    ("\u201c", '"'),
    ("\u201d", '"'),
    ("\u2018", "'"),
    ("\u2019", "'"),
)
_SENTENCE_ENDINGS = (".", "!", "?", "-", ",")


def punc_norm(text: str, rewrites: tuple[tuple[str, str], ...] = PUNCTUATION_REWRITES) -> str:
    """Normalise punctuation the way the published model saw it in training (``rewrites``: the model
    family's list of replacements, in order).

    Kept faithful to upstream, quirks included: the first character is capitalised before
    whitespace is collapsed, so text with leading spaces keeps a lower-case first letter.
    """
    if not text:
        return EMPTY_TEXT_SUBSTITUTE
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in rewrites:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(_SENTENCE_ENDINGS):
        text = text + "."
    return text


# Special tokens of the published text vocabulary.
SOT = "[START]"
EOT = "[STOP]"
UNK = "[UNK]"
SPACE = "[SPACE]"
SPECIAL_TOKENS = (SOT, EOT, UNK, SPACE, "[PAD]", "[SEP]", "[CLS]", "[MASK]")


class EnTokenizer:
    """The English text tokenizer (a HuggingFace ``tokenizers`` file, spaces spelled ``[SPACE]``)."""

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer file not found: {path}")
        self.tokenizer = Tokenizer.from_file(str(path))
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (SOT, EOT) if t not in vocab]
        if missing:
            raise ValueError(f"{path}: tokenizer lacks the special tokens {missing}")
        self.vocab_size = self.tokenizer.get_vocab_size()
        unk = self.tokenizer.token_to_id(UNK)
        self._unknown_ids = frozenset(() if unk is None else (unk,))
        self._char_ok: dict[str, bool] = {}

    def encode(self, text: str) -> list[int]:
        """Raw ids, as upstream: a character outside the vocabulary becomes ``[UNK]`` without a word.
        The pipeline goes through ``text_to_tokens``, which checks the text first."""
        return self.tokenizer.encode(text.replace(" ", SPACE)).ids

    def text_to_tokens(self, text: str) -> torch.Tensor:
        """(1, n) int32 ids, without start/stop tokens (as upstream).

        Characters the vocabulary cannot represent are dropped with a warning, and a ``ValueError``
        is raised when nothing speakable is left (see ``check_encodable``); whitespace it lacks
        (a newline in text that skipped ``punc_norm``) is read as a space.
        """
        text = check_encodable(text, self)
        if any(c.isspace() and not self.can_encode(c) for c in set(text)):  # text that skipped punc_norm
            text = "".join(" " if c.isspace() and not self.can_encode(c) else c for c in text)
        return torch.tensor(self.encode(text), dtype=torch.int32).unsqueeze(0)

    def can_encode(self, char: str) -> bool:
        """Whether one character maps to vocabulary symbols (not ``[UNK]``, not dropped)."""
        ok = self._char_ok.get(char)
        if ok is None:
            if char == " ":
                ok = True  # spelled [SPACE]
            else:
                ids = self.tokenizer.encode(char).ids
                ok = bool(ids) and not self._unknown_ids.intersection(ids)
            self._char_ok[char] = ok
        return ok

    def unencodable_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` the vocabulary cannot represent, in order of appearance."""
        return [c for c in dict.fromkeys(text) if not self.can_encode(c)]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        text = text.replace(" ", "").replace(SPACE, " ")
        return text.replace(EOT, "").replace(UNK, "")


ENGLISH_ONLY_NOTE = ("this model speaks English only; other languages need the multilingual Chatterbox "
                     "model family, which chatterbox-fast does not support yet")
_MAX_CHARS_LISTED = 20
_REWRITTEN_CHARS = frozenset(old for old, _ in PUNCTUATION_REWRITES if len(old) == 1)


def describe_chars(chars) -> str:
    """A readable list of characters: ``'你' (U+4F60), '😀' (U+1F600)``, cut after 20."""
    chars = list(chars)
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:_MAX_CHARS_LISTED])
    if len(chars) > _MAX_CHARS_LISTED:
        shown += f" and {len(chars) - _MAX_CHARS_LISTED} more"
    return shown


def check_encodable(text: str, tokenizer: EnTokenizer) -> str:
    """``text`` without the characters ``tokenizer`` cannot represent (Chinese, emoji, other scripts),
    which would otherwise become ``[UNK]`` ids and be "spoken" as noise.

    Characters are judged after ``punc_norm``'s rewrites (curly quotes, dashes and ellipses become
    ASCII there, so they are kept) and whitespace is left alone (``punc_norm`` collapses it), so
    raw text may be checked before it is split. Dropped characters are named in one ``logging``
    warning, with the spaces they leave behind tidied (runs collapsed, none before ``.,!?``).
    Raises ``ValueError`` when no letter or digit is left. Other text is returned unchanged.
    """
    if not text:
        return text
    bad = [c for c in dict.fromkeys(text) if not c.isspace() and c not in _REWRITTEN_CHARS and not tokenizer.can_encode(c)]
    if not bad:
        return text
    drop = set(bad)
    out = "".join(c for c in text if c not in drop)
    out = re.sub(r" +(?=[.,!?])", "", re.sub(r" {2,}", " ", out)).strip(" ")
    if not any(c.isalnum() for c in out):
        raise ValueError(f"nothing left to speak: the text's characters {describe_chars(bad)} are not in "
                         f"the English tokenizer's vocabulary; {ENGLISH_ONLY_NOTE}")
    log.warning("dropped %d character%s the English tokenizer cannot encode: %s (%s)", len(bad),
                "" if len(bad) == 1 else "s", describe_chars(bad), ENGLISH_ONLY_NOTE)
    return out


@dataclass(frozen=True)
class SpeechTokenSpace:
    """Speech-token ids of the published model: codes 0..6560, then start and stop of speech."""

    n_codes: int = 6561
    start: int = 6561
    stop: int = 6562

    @classmethod
    def published(cls) -> "SpeechTokenSpace":
        return cls()


def drop_invalid_tokens(tokens: torch.Tensor, space: SpeechTokenSpace = SpeechTokenSpace()) -> torch.Tensor:
    """Speech codes S3Gen can render: what lies after the first start token and before the first stop
    token, with any other id outside the code book removed.

    Accepts (N,) or (1, N); returns (M,). Upstream slices the same way for 1-D input but raises on a
    repeated start/stop token and keeps out-of-vocabulary ids, which then crash S3Gen.
    """
    if tokens.dim() == 2:
        if tokens.shape[0] != 1:
            raise ValueError(f"drop_invalid_tokens takes one sequence, got a batch of {tokens.shape[0]}")
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"drop_invalid_tokens expects (N,) or (1, N) ids, got shape {tuple(tokens.shape)}")
    n = tokens.shape[0]
    positions = torch.arange(n, device=tokens.device)
    big = torch.full_like(positions, n)
    first_start = torch.where(tokens == space.start, positions, big).min() if n else big.sum()
    first_stop = torch.where(tokens == space.stop, positions, big).min() if n else big.sum()
    begin = torch.where(first_start < n, first_start + 1, torch.zeros_like(first_start))
    keep = (positions >= begin) & (positions < first_stop) & (tokens >= 0) & (tokens < space.n_codes)
    return tokens[keep]


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n{2,}")


@dataclass(frozen=True)
class TextSplitConfig:
    """How long text is cut into segments that are synthesised one after another.

    ``max_text_tokens`` bounds one segment; the published model was trained on sentences of up to
    a few hundred tokens and its speech budget per call (``max_new_tokens``) is finite.
    """

    max_text_tokens: int = 300

    @classmethod
    def published(cls) -> "TextSplitConfig":
        return cls()


def split_sentences(text: str) -> list[str]:
    parts = [p.strip() for p in _SENTENCE_SPLIT.split(text)]
    return [p for p in parts if p]


def split_text(text: str, count_tokens, cfg: TextSplitConfig = TextSplitConfig()) -> list[str]:
    """Greedy packing of whole sentences into segments of at most ``cfg.max_text_tokens`` tokens.

    ``count_tokens(str) -> int`` measures a candidate. A single sentence that is still too long is
    cut at commas, then at word boundaries.
    """
    if not text or not text.strip():
        raise ValueError("text is empty or whitespace only: nothing to synthesise")
    pieces: list[str] = []
    for sentence in split_sentences(text):
        pieces.extend(_cut_long(sentence, count_tokens, cfg.max_text_tokens))
    return _pack(pieces, " ", count_tokens, cfg.max_text_tokens)


def _pack(parts: list[str], separator: str, count_tokens, limit: int) -> list[str]:
    out: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current}{separator}{part}" if current else part
        if current and count_tokens(candidate) > limit:
            out.append(current)
            current = part
        else:
            current = candidate
    if current:
        out.append(current)
    return out


def _cut_long(sentence: str, count_tokens, limit: int) -> list[str]:
    if count_tokens(sentence) <= limit:
        return [sentence]
    for separator in (", ", " "):
        parts = sentence.split(separator)
        if len(parts) > 1:
            packed = _pack(parts, separator, count_tokens, limit)
            return [piece for chunk in packed for piece in _cut_long(chunk, count_tokens, limit)]
    log.warning("a single word exceeds %d text tokens; it is synthesised as is", limit)
    return [sentence]
