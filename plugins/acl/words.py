"""The words of an ``[acl]`` line: values split at white space and commas, double quotes
around values that hold them.

A quoted value is taken verbatim between its quotes, with ``\\"`` for a quote and ``\\\\``
for a backslash as the only escapes (any other backslash stays, so regular expressions keep
theirs: ``"\\d+"`` is ``\\d+``). A quote opens a quoted value only at the start of a word; one
inside a word is an ordinary character.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Word", "split_words"]

_SEPARATORS = " \t,"


@dataclass(frozen=True)
class Word:
    text: str
    #: Written in double quotes: never a keyword, a condition name or a ``file:`` list.
    quoted: bool = False

    def __str__(self) -> str:
        if not self.quoted:
            return self.text
        return '"' + self.text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_words(text: str) -> list[Word]:
    """The words of one line; ValueError for a quote left open."""
    words: list[Word] = []
    i, end = 0, len(text)
    while i < end:
        char = text[i]
        if char in _SEPARATORS:
            i += 1
            continue
        if char == '"':
            value, i = _quoted(text, i + 1)
            words.append(Word(value, True))
            continue
        start = i
        while i < end and text[i] not in _SEPARATORS:
            i += 1
        words.append(Word(text[start:i]))
    return words


def _quoted(text: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    end = len(text)
    while i < end:
        char = text[i]
        if char == '"':
            if i + 1 < end and text[i + 1] not in _SEPARATORS:
                raise ValueError(f"a quoted value ends at its quote: {text[i + 1:][:20]!r} "
                                 "follows it")
            return "".join(out), i + 1
        if char == "\\" and i + 1 < end and text[i + 1] in '"\\':
            out.append(text[i + 1])
            i += 2
            continue
        out.append(char)
        i += 1
    raise ValueError("a double quote is not closed")
