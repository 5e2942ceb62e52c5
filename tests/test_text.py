import json

import pytest
import torch

from chatterbox.text import EnTokenizer, TextSplitConfig, drop_invalid_tokens, punc_norm, split_text
from chatterbox.text_vocab import START_ID, STOP_ID, VOCAB_SIZE, write_tokenizer_json
from conftest import FIXTURES


def test_punc_norm_matches_upstream_pairs():
    cases = json.loads((FIXTURES / "text_and_token_utils.json").read_text())["punc_norm"]
    for case in cases:
        assert punc_norm(case["in"]) == case["out"], case["in"]


def test_drop_invalid_tokens_matches_upstream_on_1d_input():
    cases = json.loads((FIXTURES / "text_and_token_utils.json").read_text())["drop_invalid_tokens"]
    checked = 0
    for case in cases:
        expected = case["s3tokenizer.drop_invalid_tokens (used by tts.py)"]
        if case["input_ndim"] == 1 and not isinstance(expected, str):
            assert drop_invalid_tokens(torch.tensor(case["in"])).tolist() == expected
            checked += 1
    assert checked >= 5


def test_drop_invalid_tokens_defines_upstream_error_cases():
    # repeated start/stop: the first of each counts
    assert drop_invalid_tokens(torch.tensor([6561, 6561, 3, 6562, 6562])).tolist() == [3]
    assert drop_invalid_tokens(torch.tensor([4, 5, 6562, 6562])).tolist() == [4, 5]
    # (1, N) input is one sequence, not a batch axis
    assert drop_invalid_tokens(torch.tensor([[6561, 5, 6, 6562]])).tolist() == [5, 6]
    # ids no trained model emits (synthetic weights do) are removed
    assert drop_invalid_tokens(torch.tensor([6561, 7000, 5, 8193, 6, 6562, 9])).tolist() == [5, 6]
    assert drop_invalid_tokens(torch.tensor([], dtype=torch.long)).tolist() == []
    with pytest.raises(ValueError):
        drop_invalid_tokens(torch.tensor([[1, 2], [3, 4]]))


def test_drop_invalid_tokens_under_inference_mode_returns_values():
    with torch.inference_mode():
        out = drop_invalid_tokens(torch.tensor([6561, 1, 2, 6562]))
    assert out.tolist() == [1, 2]


def test_synthetic_tokenizer_layout(tmp_path):
    tok = EnTokenizer(write_tokenizer_json(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.tokenizer.token_to_id("[START]") == START_ID
    assert tok.tokenizer.token_to_id("[STOP]") == STOP_ID
    ids = tok.encode("Hello there, world!")
    assert max(ids) < VOCAB_SIZE and len(ids) > 3
    assert tok.decode(ids) == "Hello there, world!"
    assert tok.text_to_tokens("Hi").shape == (1, len(tok.encode("Hi")))


def test_tokenizer_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        EnTokenizer(tmp_path / "nope.json")


def test_split_text_keeps_sentences_whole_and_bounded():
    count = lambda s: len(s.split())  # noqa: E731  (a word counter stands in for the tokenizer)
    text = " ".join(f"Sentence number {i} has six words." for i in range(10))
    segments = split_text(text, count, TextSplitConfig(max_text_tokens=14))
    assert all(count(s) <= 14 for s in segments)
    assert " ".join(segments) == text
    assert all(s.endswith(".") for s in segments)


def test_split_text_cuts_a_long_sentence_at_commas_then_words():
    count = lambda s: len(s.split())  # noqa: E731
    text = "one two three, four five six, seven eight nine ten eleven twelve thirteen"
    segments = split_text(text, count, TextSplitConfig(max_text_tokens=4))
    assert all(count(s) <= 4 for s in segments)
    assert " ".join(s.replace(",", "") for s in segments).split() == text.replace(",", "").split()


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_split_text_rejects_empty(bad):
    with pytest.raises(ValueError, match="empty"):
        split_text(bad, len)


# ------------------------------------------------------------------ text the vocabulary cannot encode

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return EnTokenizer(write_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _unk(tok):
    return tok.tokenizer.token_to_id("[UNK]")


def test_encodable_text_is_untouched(tokenizer, caplog):
    from chatterbox.text import check_encodable

    for text in ("Hello there, world!", "\u201cQuoted\u201d \u2014 and\u2026 more.", "Line one.\n\nLine two."):
        with caplog.at_level("WARNING"):
            assert check_encodable(text, tokenizer) == text
        ids = tokenizer.text_to_tokens(punc_norm(text))[0].tolist()
        assert ids == tokenizer.encode(punc_norm(text)) and _unk(tokenizer) not in ids
    assert not caplog.records


def test_unencodable_characters_are_dropped_with_one_warning(tokenizer, caplog):
    from chatterbox.text import check_encodable

    text = "Hello \u4e16\u754c, this is \u4e16 a test \U0001F600\U0001F600!"
    with caplog.at_level("WARNING", logger="chatterbox.text"):
        out = check_encodable(text, tokenizer)
    assert out == "Hello, this is a test!"
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    # each dropped character named once, readable, in order of appearance
    assert "'\u4e16' (U+4E16), '\u754c' (U+754C), '\U0001F600' (U+1F600)" in message
    assert message.count("U+4E16") == 1 and "English only" in message and "multilingual" in message


def test_text_to_tokens_never_emits_unknown_ids(tokenizer, caplog):
    with caplog.at_level("WARNING", logger="chatterbox.text"):
        ids = tokenizer.text_to_tokens(punc_norm("Caf\u00e9 \u043c\u0438\u0440 time."))[0].tolist()
    assert _unk(tokenizer) not in ids
    assert ids == tokenizer.encode("Caf time.")
    assert "U+00E9" in caplog.text and "U+043C" in caplog.text
    assert _unk(tokenizer) not in tokenizer.text_to_tokens("a\nb")[0].tolist()  # a newline reads as a space


@pytest.mark.parametrize("text", ["\u4f60\u597d\u3002", "\U0001F600 \U0001F389", "\u0645\u0631\u062d\u0628\u0627!"])
def test_nothing_encodable_raises(tokenizer, text):
    from chatterbox.text import check_encodable

    with pytest.raises(ValueError, match="English only") as info:
        check_encodable(text, tokenizer)
    assert f"U+{ord(text[0]):04X}" in str(info.value)
    with pytest.raises(ValueError, match="nothing left to speak"):
        tokenizer.text_to_tokens(punc_norm(text))


def test_long_lists_of_dropped_characters_are_cut():
    from chatterbox.text import describe_chars

    chars = [chr(0x4E00 + i) for i in range(25)]
    shown = describe_chars(chars)
    assert shown.count("U+") == 20 and shown.endswith("and 5 more")
