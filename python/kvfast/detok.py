"""Incremental detokenization with stop strings, independent of the native engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol


class Decoder(Protocol):
    """What `stream_text` needs from a tokenizer (`tokenizers.Tokenizer` fits)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def stream_text(
    decoder: Decoder,
    tokens: Iterable[int],
    *,
    eos_ids: Iterable[int] = (),
    stops: Sequence[str] = (),
) -> Iterator[str]:
    """Turn a stream of token ids into text pieces whose concatenation is the final text.

    A piece is emitted only once it is final: never a partial UTF-8 character (decoded as a
    trailing U+FFFD) and never text that could still turn out to start a stop string. The
    first EOS id ends the text (it is not part of it); the first occurrence of a stop string
    cuts the text before it. Tokens are pulled lazily, so a stop ends generation too.
    """
    eos = set(eos_ids)
    stops = [s for s in stops if s]
    hold = max((len(s) for s in stops), default=1) - 1
    ids: list[int] = []
    # Decode only a sliding window (as TGI does): ids[prefix:read] is the context whose text
    # was already taken, so each step costs O(window) instead of O(generated so far), and
    # decoders that treat the first token specially (leading-space stripping) still give
    # the right delta.
    prefix = read = 0
    text = ""
    emitted = 0

    def step(new: str) -> tuple[str | None, bool]:
        """Append `new`; return (piece to emit, whether a stop string ended the text)."""
        nonlocal text, emitted
        start = max(0, len(text) - hold)  # a stop string may straddle old and new text
        text += new
        hits = [i for s in stops if (i := text.find(s, start)) >= 0]
        if hits:
            cut = min(hits)
            piece = text[emitted:cut] if cut > emitted else None
            emitted = max(emitted, cut)
            return piece, True
        safe = len(text) - hold
        if safe > emitted:
            piece, emitted = text[emitted:safe], safe
            return piece, False
        return None, False

    for tok in tokens:
        if tok in eos:
            break
        ids.append(int(tok))
        before = decoder.decode(ids[prefix:read], skip_special_tokens=True)
        after = decoder.decode(ids[prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            continue  # nothing printable yet (a partial character or a skipped special token)
        prefix, read = read, len(ids)
        piece, stopped = step(after[len(before) :])
        if piece:
            yield piece
        if stopped:
            return
    # Flush: bytes of a character the stream ended inside are dropped, not shown as U+FFFD.
    if read < len(ids):
        before = decoder.decode(ids[prefix:read], skip_special_tokens=True)
        after = decoder.decode(ids[prefix:], skip_special_tokens=True).rstrip("\ufffd")
        if len(after) > len(before):
            piece, stopped = step(after[len(before) :])
            if piece:
                yield piece
            if stopped:
                return
    if len(text) > emitted:
        yield text[emitted:]
