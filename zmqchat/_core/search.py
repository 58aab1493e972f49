"""Search queries (issue 23): what people type, what SQLite's full-text index runs for it,
and where a found text matches, for highlighting. No I/O.

    deploy              the word, whole, in any case and with or without accents
    deploy*             words that start with it (deploy, deployed, deployment)
    "build failed"      the words one after the other (a phrase; "build fail*" ends in a prefix)

Several terms must all match. Words are what SQLite's `unicode61` tokenizer makes of a text
(runs of letters, digits and combining marks; anything else separates them), folded the way
it folds them (case, and accents with `remove_diacritics 2`), so that the index and the
highlighting agree on what a word is.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Final

from zmqchat.protocol import Code, ProtocolError

MAX_TERMS: Final = 16  # terms in one query: each is a lookup in the index
MIN_PREFIX: Final = 2  # characters before a `*`: `a*` would walk most of the index


@dataclass(frozen=True, slots=True)
class Term:
    """One word or phrase of a query (folded words, in order); `prefix`: the last word may
    be the start of a longer one."""

    words: tuple[str, ...]
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    text: str  # as typed
    terms: tuple[Term, ...]


def _is_word_char(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat[0] in "LNM" or cat == "Co"


def words(text: str) -> list[tuple[int, int, str]]:
    """The words of a text as the index sees them: (start, end, folded word)."""
    out: list[tuple[int, int, str]] = []
    start = -1
    for i, ch in enumerate(text):
        if ch.isalnum() or (not ch.isascii() and _is_word_char(ch)):
            if start < 0:
                start = i
        elif start >= 0:
            out.append((start, i, fold(text[start:i])))
            start = -1
    if start >= 0:
        out.append((start, len(text), fold(text[start:])))
    return [w for w in out if w[2]]


def fold(word: str) -> str:
    """A word without case and accents ("Café" -> "cafe")."""
    if word.isascii():
        return word.lower()
    decomposed = unicodedata.normalize("NFKD", word.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.category(ch).startswith("M"))


def parse(text: str) -> Query:
    """A query as typed -> its terms; BAD_REQUEST when nothing in it can be searched for."""
    terms: list[Term] = []
    rest = text.strip()
    while rest and len(terms) < MAX_TERMS:
        if rest[0] == '"':
            end = rest.find('"', 1)
            chunk, rest = (rest[1:], "") if end < 0 else (rest[1:end], rest[end + 1 :])
            prefix = rest.startswith("*") or chunk.rstrip().endswith("*")
            rest = rest.lstrip("*")
        else:
            chunk, _, rest = rest.partition(" ")
            prefix = chunk.endswith("*")
        rest = rest.lstrip()
        found = tuple(w for _, _, w in words(chunk))
        if not found:
            continue
        if prefix and len(found[-1]) < MIN_PREFIX:
            raise ProtocolError(
                Code.BAD_REQUEST, f"give at least {MIN_PREFIX} characters before a '*'"
            )
        terms.append(Term(found, prefix))
    if not terms:
        raise ProtocolError(Code.BAD_REQUEST, "nothing to search for: give a word or a phrase")
    return Query(text, tuple(terms))


def expression(query: Query) -> str:
    """The query as an FTS5 expression: every term a quoted string (words are letters and
    digits only, so nothing in them is syntax), all of them required."""
    return " AND ".join(
        '"' + " ".join(t.words) + '"' + ("*" if t.prefix else "") for t in query.terms
    )


def marks(text: str, query: Query) -> list[list[int]]:
    """Where the query's terms match in text: [start, end) character offsets, in order,
    overlapping ones merged."""
    found = words(text)
    folded = [w for _, _, w in found]
    spans: list[tuple[int, int]] = []
    for term in query.terms:
        n = len(term.words)
        for i in range(len(folded) - n + 1):
            if all(
                folded[i + j] == word
                or (term.prefix and j == n - 1 and folded[i + j].startswith(word))
                for j, word in enumerate(term.words)
            ):
                spans.append((found[i][0], found[i + n - 1][1]))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
