"""Turbo text: punc_norm's shorter rewrite list, the GPT-2 tokenizer files with the tags as single tokens."""
from __future__ import annotations

import json

import pytest

from chatterbox.text import punc_norm
from chatterbox.text_turbo import TurboTokenizer, punc_norm_turbo
from chatterbox.text_vocab_turbo import (BPE_VOCAB_SIZE, MODEL_MAX_LENGTH, PARALINGUISTIC_TAGS, VOCAB_SIZE,
                                         byte_symbols, tag_ids, write_turbo_tokenizer_files)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_turbo_tokenizer_files(tmp_path_factory.mktemp("turbo_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return TurboTokenizer(tok_dir)


def test_punc_norm_turbo_differs_from_the_original_only_where_upstream_does():
    for text in ("Wait… what: really — yes – no , ok", "\u201cquoted\u201d", "", "no ending", "  lead"):
        assert punc_norm_turbo(text) == punc_norm(text)
    assert punc_norm_turbo("So... well - ok; fine") == "So... well - ok; fine."
    assert punc_norm("So... well - ok; fine") == "So,  well, ok,  fine."


def test_sizes_and_specials(tok):
    assert tok.vocab_size == VOCAB_SIZE == 50276
    assert tok.tokenizer.token_to_id("<|endoftext|>") == BPE_VOCAB_SIZE - 1 == 50256
    assert tok.tags == PARALINGUISTIC_TAGS and len(tok.tags) == 19
    assert tok.max_length == MODEL_MAX_LENGTH


def test_tags_are_single_tokens(tok):
    ids = tag_ids()
    for tag in PARALINGUISTIC_TAGS:
        assert tok.encode(tag) == [ids[tag]]
    text = "Oh, that's hilarious! [chuckle] Um anyway [clear throat] ok."
    out = tok.encode(text)
    assert ids["[chuckle]"] in out and ids["[clear throat]"] in out
    assert tok.decode(out) == text
    assert ids["[laugh]"] not in tok.encode("[Laugh] [laugh ] laugh")


def test_byte_level_encodes_anything(tok):
    text = "caf\u00e9 \U0001F600 \u4f60\u597d\ttab"
    assert tok.decode(tok.encode(text)) == text
    assert len(set(byte_symbols())) == 256


def test_truncation_to_model_max_length(tok):
    assert len(tok.encode("word " * 2000)) == MODEL_MAX_LENGTH
    with pytest.raises(ValueError, match="no tokens"):
        tok.text_to_tokens("")
    assert tok.text_to_tokens("Hi.").tolist() == [tok.encode("Hi.")]


def test_tokenizer_json_layout_reads_the_same(tok, tmp_path):
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MODEL_MAX_LENGTH}))
    again = TurboTokenizer(tmp_path)
    text = "Hello [laugh] there [sigh]."
    assert again.encode(text) == tok.encode(text) and again.vocab_size == VOCAB_SIZE


def test_added_tokens_decoder_layout(tmp_path, tok):
    other = TurboTokenizer(write_turbo_tokenizer_files(tmp_path, added_tokens_decoder=True))
    text = "ha[laugh]ha [gasp] done"
    assert other.encode(text) == tok.encode(text)


def test_bad_directories(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError):
        TurboTokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        TurboTokenizer(tmp_path)
    bad = tmp_path / "bad"
    write_turbo_tokenizer_files(bad)
    ids = json.loads((bad / "added_tokens.json").read_text())
    ids["[laugh]"] = 50300
    (bad / "added_tokens.json").write_text(json.dumps(ids))
    with pytest.raises(ValueError, match="contiguous"):
        TurboTokenizer(bad)
