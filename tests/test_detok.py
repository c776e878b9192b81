"""Incremental detokenization and stop strings, driven by fixed token streams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import EMBEDDED
from kvfast.detok import stream_text
from tokenizers import Tokenizer

TOK = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
EOS = 0  # <|endoftext|>
# Byte-level BPE splits these multi-byte characters over several tokens.
TEXT = "héllo wörld — 世界 🙂 naïve"


def ids_of(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False).ids


class Counting:
    """A token stream that records how many ids were pulled (to check laziness)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.pulled = ids, 0

    def __iter__(self) -> Iterator[int]:
        for i in self.ids:
            self.pulled += 1
            yield i


def test_the_fixture_really_splits_characters() -> None:
    assert TOK.token_to_id("<|endoftext|>") == EOS
    ids = ids_of(TEXT)
    assert any(TOK.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))


def test_pieces_join_to_the_full_decode_and_never_show_partial_characters() -> None:
    ids = ids_of(TEXT)
    pieces = list(stream_text(TOK, ids))
    assert "".join(pieces) == TOK.decode(ids) == TEXT
    assert len(pieces) > 5
    assert all(p and "\ufffd" not in p for p in pieces)


def test_special_tokens_are_skipped() -> None:
    ids = ids_of("<|im_start|>assistant\nhi<|im_end|>")
    assert "".join(stream_text(TOK, ids)) == "assistant\nhi"


def test_eos_ends_the_text_and_is_not_in_it() -> None:
    ids = ids_of("one two") + [EOS] + ids_of(" three")
    stream = Counting(ids)
    assert "".join(stream_text(TOK, stream, eos_ids=[EOS])) == "one two"
    assert stream.pulled == len(ids_of("one two")) + 1


def test_a_stream_that_ends_inside_a_character_drops_the_partial_bytes() -> None:
    ids = ids_of("ok 🙂")
    cut = next(k for k in range(len(ids)) if TOK.decode(ids[:k]).endswith("\ufffd"))
    assert "".join(stream_text(TOK, ids[:cut])) == TOK.decode(ids[:cut]).rstrip("\ufffd")


@pytest.mark.parametrize(
    ("text", "stops", "want"),
    [
        ("abc STOP def", ["STOP"], "abc "),
        ("hello world and more", ["lo wo"], "hel"),  # spans tokens
        ("hello world and more", ["zzz", "and", "o"], "hell"),  # earliest match wins
        ("hello world", ["hello"], ""),
        ("hello world", ["absent"], "hello world"),
        ("héllo wörld — 世界 🙂 naïve", ["界"], "héllo wörld — 世"),
    ],
)
def test_stop_strings(text: str, stops: list[str], want: str) -> None:
    ids = ids_of(text)
    stream = Counting(ids)
    pieces = []
    for piece in stream_text(TOK, stream, stops=stops):
        pieces.append(piece)
        # Nothing past the stop string is ever emitted, not even transiently.
        assert want.startswith("".join(pieces))
    assert "".join(pieces) == want
    if want != text:
        # Lazy: no token is pulled after the one that completed the stop string.
        needed = next(
            k for k in range(1, len(ids) + 1) if any(s in TOK.decode(ids[:k]) for s in stops)
        )
        assert stream.pulled == needed


def test_stop_text_is_held_back_until_it_is_decided() -> None:
    # "STOP" arrives one token at a time; "ST" must not be emitted while it may still be "STOP".
    ids = ids_of("go ST") + ids_of("OP")
    emitted: list[str] = []
    for piece in stream_text(TOK, ids, stops=["STOP"]):
        emitted.append(piece)
    assert "".join(emitted) == "go "
