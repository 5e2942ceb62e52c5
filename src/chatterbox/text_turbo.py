"""Text side of Chatterbox-Turbo/Nano: its punctuation clean-up and its GPT-2 byte-level BPE tokenizer.

The published tokenizer is GPT-2's (``vocab.json`` + ``merges.txt``, 50257 ids, ``<|endoftext|>`` =
50256) plus paralinguistic tags (``[laugh]``, ``[chuckle]``, ``[clear throat]``, ...) added as single
tokens at ids 50257 and up (``added_tokens.json``), 50276 ids in all. No start/stop text tokens are
added, and byte-level BPE encodes any text (no unknown characters).

The files are read with the ``tokenizers`` package: ``tokenizer.json`` when the directory has one,
else the GPT-2 files, assembled as HF's fast GPT-2 tokenizer does (byte-level pre-tokenizer without
a prefix space, byte-level decoder, added tokens matched before BPE, plain ones normalised and
neither stripped nor restricted to single words). ``tokenizer_config.json``'s ``model_max_length``,
when present, truncates longer texts (upstream tokenizes with ``truncation=True``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .text import PUNCTUATION_REWRITES, punc_norm

# Turbo's clean-up is the original's without its "...", " - " and ";" rules (same order otherwise).
_TURBO_DROPPED_REWRITES = ("...", " - ", ";")
_TURBO_PUNCTUATION_REWRITES = tuple(r for r in PUNCTUATION_REWRITES if r[0] not in _TURBO_DROPPED_REWRITES)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_JSON_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"


def punc_norm_turbo(text: str) -> str:
    """``tts_turbo.punc_norm``: as the original's (capitalise, collapse whitespace, end with
    punctuation) with Turbo's shorter list of rewrites."""
    return punc_norm(text, _TURBO_PUNCTUATION_REWRITES)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc


def _token_content(entry) -> str:
    return entry["content"] if isinstance(entry, dict) else str(entry)


class TurboTokenizer:
    """The Turbo text tokenizer, read from a checkpoint directory."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        config_path = directory / TOKENIZER_CONFIG_FILE
        self.config = _read_json(config_path) if config_path.is_file() else {}
        if (directory / TOKENIZER_JSON_FILE).is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_JSON_FILE))
        else:
            self.tokenizer = self._from_gpt2_files(directory)
        max_length = self.config.get("model_max_length")
        self.max_length = int(max_length) if isinstance(max_length, (int, float)) else None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.tags = tuple(t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                          if not t.special)

    def _from_gpt2_files(self, directory: Path):
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        for name in (VOCAB_FILE, MERGES_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: neither {TOKENIZER_JSON_FILE} nor {name} found")
        tok = Tokenizer(BPE.from_file(str(directory / VOCAB_FILE), str(directory / MERGES_FILE)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        base = tok.get_vocab_size(with_added_tokens=False)
        added = self._added_tokens(directory)
        for token_id, (content, special) in sorted(added.items()):
            token = AddedToken(content, special=special, normalized=not special, lstrip=False, rstrip=False,
                               single_word=False)
            if token_id < base and tok.token_to_id(content) != token_id:
                raise ValueError(f"{directory}: added token {content!r} claims id {token_id}, which the "
                                 f"vocabulary gives to another token")
            if token_id >= base and token_id != tok.get_vocab_size(with_added_tokens=True):
                raise ValueError(f"{directory}: added token ids are not contiguous from {base} "
                                 f"({content!r} has id {token_id})")
            if special:
                tok.add_special_tokens([token])
            else:
                tok.add_tokens([token])
            if tok.token_to_id(content) != token_id:
                raise ValueError(f"{directory}: added token {content!r} did not get id {token_id}")
        return tok

    def _added_tokens(self, directory: Path) -> dict[int, tuple[str, bool]]:
        """id -> (content, special) from ``tokenizer_config.json``'s ``added_tokens_decoder`` and
        ``added_tokens.json``; tokens named in the special-token map are special."""
        specials = {END_OF_TEXT}
        special_map = directory / SPECIAL_TOKENS_MAP_FILE
        if special_map.is_file():
            for value in _read_json(special_map).values():
                for entry in value if isinstance(value, list) else [value]:
                    specials.add(_token_content(entry))
        added: dict[int, tuple[str, bool]] = {}
        for token_id, entry in self.config.get("added_tokens_decoder", {}).items():
            content = _token_content(entry)
            special = content in specials
            if isinstance(entry, dict):
                special = bool(entry.get("special", special))
            added[int(token_id)] = (content, special)
        added_path = directory / ADDED_TOKENS_FILE
        if added_path.is_file():
            for content, token_id in _read_json(added_path).items():
                added.setdefault(int(token_id), (content, content in specials))
        return added

    def can_encode(self, char: str) -> bool:
        """Always: byte-level BPE encodes every character (``text.check_encodable`` keeps all text)."""
        return True

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids if self.max_length is None else ids[:self.max_length]

    def text_to_tokens(self, text: str) -> torch.Tensor:
        """(1, n) int64 ids of already normalised text (``punc_norm_turbo``)."""
        ids = self.encode(text)
        if not ids:
            raise ValueError("the text encodes to no tokens")
        return torch.tensor(ids, dtype=torch.long).unsqueeze(0)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)
