"""A stand-in text vocabulary in the published ``tokenizer.json`` layout (for synthetic checkpoints).

The published tokenizer is a byte-pair model over 704 symbols with ``[STOP]`` = 0 and
``[START]`` = 255. This one keeps those ids, the special tokens and the size; its other symbols are
printable ASCII characters and lowercase letter pairs, so any English text encodes.
"""
from __future__ import annotations

import itertools
import string
from pathlib import Path

from .text import EOT, SOT, SPECIAL_TOKENS

VOCAB_SIZE = 704
START_ID = 255
STOP_ID = 0
_COMMON_PAIRS = ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed")


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    ordered_specials = [EOT] + [t for t in SPECIAL_TOKENS if t not in (EOT, SOT)]
    symbols = list(ordered_specials)
    symbols += [c for c in string.printable if c.isprintable() and c != " "]
    pairs = list(_COMMON_PAIRS) + [
        a + b for a, b in itertools.product(string.ascii_lowercase, repeat=2) if a + b not in _COMMON_PAIRS
    ]
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    pair_iter = iter(pairs)
    next_id = 0
    for symbol in symbols:
        if next_id == START_ID:
            vocab[SOT] = next_id
            next_id += 1
        vocab[symbol] = next_id
        next_id += 1
    while next_id < VOCAB_SIZE:
        if next_id == START_ID:
            vocab[SOT] = next_id
        else:
            pair = next(pair_iter)
            vocab[pair] = next_id
            merges.append((pair[0], pair[1]))
        next_id += 1
    return vocab, merges


def write_tokenizer_json(path: str | Path) -> Path:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    vocab, merges = build_vocab()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    path = Path(path)
    tok.save(str(path))
    return path
