"""Streaming text from tokens (serving/detokenizer.py) with SmolLM2's real tokenizer: the pieces
join to exactly what decoding the whole answer gives, never hold half a character (emoji and CJK
characters span several tokens) nor the start of a stop string, and cost a few tokens each."""
from __future__ import annotations

import random

import pytest

from core.models import load_tokenizer
from serving.detokenizer import AnswerText, IncrementalDetokenizer, held_back

TEXT = "Hello 🌍, 世界! Naïve café: 👩‍👩‍👧 ok. Ünïcödé → 東京タワー, done."


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def pieces_of(tokenizer, token_ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.add(token) for token in token_ids] + [detokenizer.flush()]


def test_pieces_join_to_the_whole_text_and_never_split_a_character(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    split = [t for t in token_ids if "\ufffd" in tokenizer.decode([t])]
    assert len(split) >= 10, "the text must hold characters that span several tokens"
    pieces = pieces_of(tokenizer, token_ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") >= len(split) // 2  # tokens that only start a character send nothing


def test_random_token_streams_decode_as_a_whole(tokenizer):
    """Any token sequence (incomplete characters, special tokens, invalid bytes included)."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(30):
        token_ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        whole = tokenizer.decode(token_ids, skip_special_tokens=True)
        assert "".join(pieces_of(tokenizer, token_ids)) == whole


class CountingTokenizer:
    """Counts the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, token_ids, **kwargs):
        self.decoded += len(token_ids)
        return self.tokenizer.decode(token_ids, **kwargs)


def test_each_token_decodes_a_few_tokens_not_the_whole_answer(tokenizer):
    token_ids = (tokenizer.encode(TEXT, add_special_tokens=False) * 40)[:1024]
    counting = CountingTokenizer(tokenizer)
    answer = AnswerText(counting, ["never appears"])
    for token in token_ids:
        answer.add(token)
    answer.finish()
    assert answer.text == tokenizer.decode(token_ids)
    # re-decoding the answer so far would be 1024 * 1025 / 2 = 524,800 tokens
    assert counting.decoded < 20 * len(token_ids), counting.decoded


def stream(tokenizer, parts: list[str], stops: list[str]) -> tuple[list[str], str, bool]:
    """(pieces sent, final text, stopped) for an answer whose tokens are those of `parts`,
    each part tokenised alone (so a stop string can span tokens)."""
    answer = AnswerText(tokenizer, stops)
    sent, stopped = [], False
    for part in parts:
        for token in tokenizer.encode(part, add_special_tokens=False):
            piece, stopped = answer.add(token)
            sent.append(piece)
            if stopped:
                return sent, answer.text, True
    sent.append(answer.finish())
    return sent, answer.text, False


def test_stop_string_spanning_tokens_cuts_the_answer_and_is_never_sent(tokenizer):
    sent, text, stopped = stream(tokenizer, ["Hello wor", "ld ST", "O", "P and more"], ["STOP"])
    assert stopped and text == "Hello world " and "".join(sent) == text
    assert not any("ST" in piece for piece in sent)


def test_start_of_a_stop_string_that_does_not_complete_is_sent(tokenizer):
    sent, text, stopped = stream(tokenizer, ["one\n", "two\n", "\n", "three"], ["\n\n\n"])
    assert not stopped and text == "one\ntwo\n\nthree" and "".join(sent) == text


def test_multibyte_stop_string_and_first_of_several_stops(tokenizer):
    sent, text, stopped = stream(tokenizer, ["東京", "タワー", "に行く"], ["タワ", "行く"])
    assert stopped and text == "東京" and "".join(sent) == "東京"
    sent, text, stopped = stream(tokenizer, ["a 🌍 b 🌍 c"], ["🌍 c", "b"])
    assert stopped and text == "a 🌍 " and "".join(sent) == text


@pytest.mark.parametrize("text, stops, expected", [
    ("Hello wor", [], 0),
    ("The answer is 4", ["\n\n"], 0),
    ("The answer\n", ["\n\n"], 1),        # may become the stop string: held back
    ("one, two, th", ["three"], 2),
    ("one, two, tx", ["three"], 0),
    ("zxa", ["ab", "zxa?"], 3),           # the longest start of any stop string
])
def test_held_back_is_the_longest_tail_that_starts_a_stop_string(text, stops, expected):
    assert held_back(text, stops) == expected
