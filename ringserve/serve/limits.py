"""A lower bound on a text's token count, known before tokenizing it.

No token of a vocabulary stands for more than `max_bytes_per_token` bytes of UTF-8 text, so a
text of B bytes has at least ceil(B / max_bytes_per_token) tokens. When that bound already
passes the KV capacity, the request is refused at once: tokenizing a 20 MB prompt only to learn
that it does not fit took 38 s and 5 GB of the replica's memory, and held the GIL meanwhile
(health probes waited). The bound is measured once per tokenizer, from the tokenizer itself, so
it holds for any vocabulary (byte-level BPE, SentencePiece, added special tokens). A text is
measured after Unicode normalization too (NFC and NFKC: the normalizers LLM tokenizers use), since
composing characters can shrink it (three Hangul jamo, 9 bytes, make one 3-byte syllable).
"""
from __future__ import annotations

import unicodedata
from typing import Iterable

# decoders may drop what a token stands for at the start of a text (SentencePiece's leading
# space): one byte of slack keeps the bound a true lower bound
_SLACK = 1


def max_bytes_per_token(tokenizer) -> int:
    """The most UTF-8 bytes of text any one token of `tokenizer` decodes to, plus slack.
    Needs only `vocab_size` and `decode(ids, skip_special_tokens=False)`."""
    most = 1
    for token_id in range(int(tokenizer.vocab_size)):
        try:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - an id without a piece (a hole in the vocabulary)
            continue
        most = max(most, len(text.encode("utf-8", "surrogatepass")))
    return most + _SLACK


def utf8_size(text: str) -> int:
    """UTF-8 bytes of `text`, or of its NFC / NFKC form when that is smaller."""
    size = len(text.encode("utf-8", "surrogatepass"))
    for form in ("NFC", "NFKC"):
        if not unicodedata.is_normalized(form, text):  # quick check: most texts already are
            size = min(size, len(unicodedata.normalize(form, text).encode("utf-8",
                                                                          "surrogatepass")))
    return size


def min_tokens(texts: Iterable[str], bytes_per_token: int) -> int:
    """At least this many tokens encode the concatenation of `texts` (or any text containing
    them)."""
    size = sum(utf8_size(t) for t in texts)
    return -(-size // max(int(bytes_per_token), 1))


__all__ = ["max_bytes_per_token", "min_tokens", "utf8_size"]
