"""Where each section, key and value line of an INI file stands: the line numbers that
configparser does not keep.

``IniLines.scan(text)`` reads the text again with configparser's own rules, as
``geproxy.config.read_ini`` sets it up (``=`` or ``:`` between key and value, ``#`` and ``;``
starting a comment line, ``#`` after white space starting an inline comment, a value going
on over the lines indented deeper than its key, blank lines inside a value kept, section
names and keys as written). It runs only on text that configparser accepted: what it does
with anything else is unspecified.

A value's lines are numbered as ``parse_lines`` (config.py) gives them to plugins: blank
lines and comment lines are not counted, so the 3rd line a plugin reads (index 3) is the
3rd non-blank line of the value, wherever the comments and blank lines between them are.
"""

from __future__ import annotations

import configparser
import io
from typing import Iterable, Optional

from .errors import ConfigError, ConfigErrors

__all__ = ["IniLines", "located"]

# configparser's public patterns, so that headers and keys are recognised as it does.
_SECTION = configparser.ConfigParser.SECTCRE
_OPTION = configparser.ConfigParser.OPTCRE
_NONSPACE = configparser.ConfigParser.NONSPACECRE
_COMMENT_LINE = ("#", ";")


def _without_comment(line: str) -> str:
    """``line`` without its comment, stripped: "" for a blank or comment line."""
    if line.strip().startswith(_COMMENT_LINE):
        return ""
    return strip_comment(line).strip()


def strip_comment(line: str) -> str:
    """One line of a value without its inline comment: from a ``#`` at the line's start or
    after white space, outside a double-quoted word (one that starts with a quote, as the
    acl rules write values holding spaces or ``#``), to the end of the line."""
    if "#" not in line:
        return line
    quoted = False
    previous = " "
    i = 0
    while i < len(line):
        char = line[i]
        if quoted:
            if char == "\\" and i + 1 < len(line):
                i += 2
                previous = "x"
                continue
            if char == '"':
                quoted = False
        elif char == '"' and previous.isspace():
            quoted = True
        elif char == "#" and previous.isspace() and line[i - 1:i] != "\\":
            return line[:i].rstrip()
        previous = char
        i += 1
    return line


class IniLines:
    """The file line (1-based) of each ``[section]`` header, each key, and each line of
    each value, of one INI text."""

    def __init__(self) -> None:
        self._sections: dict[str, int] = {}
        self._keys: dict[tuple[str, str], int] = {}
        #: Per key, the file line of each line of its value that ``parse_lines`` keeps.
        self._values: dict[tuple[str, str], list[int]] = {}

    @classmethod
    def scan(cls, text: str) -> "IniLines":
        found = cls()
        section: Optional[str] = None
        key: Optional[tuple[str, str]] = None
        indent = 0
        # Lines as configparser's read_string iterates them: split at "\n" alone.
        for number, line in enumerate(io.StringIO(text), start=1):
            value = _without_comment(line)
            if not value:
                continue  # blank and comment lines neither end a value nor belong to it
            match = _NONSPACE.search(line)
            level = match.start() if match else 0
            if key is not None and level > indent:
                found._add_value(key, number, value)
                continue
            indent = level
            header = _SECTION.match(value)
            if header:
                section, key = header.group("header"), None
                found._sections.setdefault(section, number)
                continue
            option = _OPTION.match(value)
            if option is None or section is None:
                key = None  # configparser refused the text: nothing to know here
                continue
            key = (section, option.group("option").rstrip())
            found._keys[key] = number
            found._values[key] = []
            found._add_value(key, number, option.group("value").strip())
        return found

    def _add_value(self, key: tuple[str, str], number: int, text: str) -> None:
        # One file line may hold several of parse_lines' lines (str.splitlines breaks at
        # more than "\n"): each of them is at this file line.
        self._values[key].extend(number for piece in text.splitlines() if piece.strip())

    def section_line(self, section: str) -> Optional[int]:
        """The line of the ``[section]`` header; None when the file has none."""
        return self._sections.get(section)

    def key_line(self, section: str, key: str, index: Optional[int] = None) -> Optional[int]:
        """The line of ``key`` in ``section`` (None when the file does not set it), or with
        ``index`` (1-based), the line of that line of its value (None past the last)."""
        if index is None:
            return self._keys.get((section, key))
        lines = self._values.get((section, key), [])
        return lines[index - 1] if 1 <= index <= len(lines) else None

    def locate(self, error: ConfigError) -> None:
        """Set ``error.file_line`` from its section, key and ``line`` (each error of a
        ConfigErrors), where the file says; an error that names no section stays as it
        is, and so does one whose ``line`` is past its value's last line (it is then said
        as "line N" of the value)."""
        for each in error.errors:
            if each.file_line is not None or not each.section:
                continue
            if each.key is None:
                each.file_line = self.section_line(each.section)
                continue
            each.file_line = self.key_line(each.section, each.key, each.line)


def located(errors: Iterable[ConfigError], path: str,
            lines: Optional[IniLines]) -> Optional[ConfigError]:
    """``errors`` (each a ConfigError or ConfigErrors) as the one exception that reports
    them, or None for none: each placed at its line of the file ``path`` (``lines``), its
    path set to ``path`` when it named none but a section, in the order of the file (errors
    with no line last, in the order given). One error is returned as it is, several as a
    ConfigErrors."""
    flat = [error for each in errors for error in each.errors]
    if not flat:
        return None
    for error in flat:
        if error.path is None and error.section:
            error.path = path
        if lines is not None and error.path == path:
            lines.locate(error)
    flat.sort(key=lambda error: (error.file_line is None, error.file_line or 0))
    return flat[0] if len(flat) == 1 else ConfigErrors(flat)
