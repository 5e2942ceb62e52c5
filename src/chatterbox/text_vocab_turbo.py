"""A stand-in Turbo text tokenizer in the published GPT-2 file layout (for synthetic checkpoints).

The published one is GPT-2's byte-level BPE (``vocab.json``, ``merges.txt``: 50257 ids, the last
``<|endoftext|>``) with 19 paralinguistic tags added at ids 50257-50275. This one keeps the layout,
the sizes, the special token and the tags; its BPE knows the 256 byte symbols plus a few hundred
merges of common English letter sequences, and filler entries (never produced) pad the vocabulary
to GPT-2's size. Any text encodes (byte-level), so it serves tests and synthetic checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

from .text_turbo import (ADDED_TOKENS_FILE, END_OF_TEXT, MERGES_FILE, SPECIAL_TOKENS_MAP_FILE,
                         TOKENIZER_CONFIG_FILE, VOCAB_FILE)

BPE_VOCAB_SIZE = 50257  # GPT-2's, <|endoftext|> last
VOCAB_SIZE = 50276  # with the tags
MODEL_MAX_LENGTH = 1024
PARALINGUISTIC_TAGS = (
    "[clear throat]", "[sigh]", "[shush]", "[cough]", "[groan]", "[sniff]", "[gasp]", "[chuckle]", "[laugh]",
    "[angry]", "[crying]", "[dramatic]", "[fear]", "[happy]", "[narration]", "[sarcastic]", "[surprised]",
    "[whispering]", "[advertisement]",
)
# Word starts (after a space, spelled with GPT-2's space symbol) and word pieces given merges.
_WORDS = ("the", "and", "to", "of", "in", "is", "it", "that", "you", "for", "on", "with", "as", "was", "he", "we",
          "this", "have", "are", "not", "but", "what", "all", "so", "can", "my", "one", "there", "hello", "well")
_PIECES = ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "ed", "is", "it",
           "al", "ar", "st", "ng", "ing", "ion", "tion", "ent", "ly", "ou", "ll", "ve", "le")
_FILLER = "<|synthetic_filler_{}|>"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (index = byte): printable Latin-1
    characters stand for themselves, the others are mapped in order to code points from 256 up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols = {}
    extra = 0
    for b in range(256):
        if b in kept:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _chain_merges(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Merges building ``text`` left to right from its characters, each added once."""
    current = text[0]
    for char in text[1:]:
        joined = current + char
        if joined not in vocab:
            merges.append((current, char))
            vocab[joined] = len(vocab)
        current = joined


def build_turbo_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id for ids 0..50256, merges in rank order)."""
    symbols = byte_symbols()
    space = symbols[ord(" ")]
    # GPT-2 orders the byte symbols by the printable-first mapping, then the merges by rank.
    order = sorted(range(256), key=lambda b: ord(symbols[b]))
    vocab = {symbols[b]: i for i, b in enumerate(order)}
    merges: list[tuple[str, str]] = []
    for letter in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _chain_merges(space + letter, vocab, merges)
    for piece in _PIECES:
        _chain_merges(piece, vocab, merges)
    for word in _WORDS:
        _chain_merges(space + word, vocab, merges)
    filler = 0
    while len(vocab) < BPE_VOCAB_SIZE - 1:
        vocab[_FILLER.format(filler)] = len(vocab)
        filler += 1
    vocab[END_OF_TEXT] = BPE_VOCAB_SIZE - 1
    return vocab, merges


def tag_ids() -> dict[str, int]:
    return {tag: BPE_VOCAB_SIZE + i for i, tag in enumerate(PARALINGUISTIC_TAGS)}


def write_turbo_tokenizer_files(directory: str | Path, added_tokens_decoder: bool = False) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``added_tokens.json``, ``special_tokens_map.json`` and
    ``tokenizer_config.json`` into ``directory``. With ``added_tokens_decoder`` the config also lists
    every added token with its flags (the layout newer ``transformers`` versions save)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_turbo_vocab()
    (directory / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    tags = tag_ids()
    (directory / ADDED_TOKENS_FILE).write_text(json.dumps(tags, indent=2), encoding="utf-8")
    specials = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    (directory / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": MODEL_MAX_LENGTH,
              **specials}
    if added_tokens_decoder:
        def entry(content: str, special: bool) -> dict:
            return {"content": content, "lstrip": False, "rstrip": False, "normalized": not special,
                    "single_word": False, "special": special}

        decoder = {str(BPE_VOCAB_SIZE - 1): entry(END_OF_TEXT, True)}
        decoder.update({str(i): entry(tag, False) for tag, i in tags.items()})
        config["added_tokens_decoder"] = decoder
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
