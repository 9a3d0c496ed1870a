"""Squid's external ACL helper protocol, without I/O: the request line, the answer line.

A request is one line: ``[CHANNEL ]FIELD FIELD ...[ ARG ...]\\n``; the fields are the
helper's FORMAT codes expanded for the request, the arguments the ``external`` condition's
words after the helper's name. Each value is encoded as Squid encodes it for helpers
(``quote=url``, its default): RFC 1738 escaping of what is unsafe in a URL (controls, space,
non-ASCII, ``"#%<>[\\]^`{|}``, ``~`` kept), so that a value never holds a space or a line
break; an empty or missing value is ``-``.

An answer is one line: ``[CHANNEL ]OK|ERR|BH[ KEY=VALUE ...]``. A value is either quoted
(``"a b"``, backslash escaping the next character) or %-encoded (``a%20b``). Keys used here:
``user``, ``group`` (may repeat), ``message``, ``log``, ``tag``; others are kept but unused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence
from urllib.parse import quote, unquote

__all__ = ["Answer", "Format", "encode", "parse_answer", "parse_format", "request_line",
           "CODES"]

#: Characters left as they are: RFC 1738's safe and reserved ones. Everything else
#: (controls, space, non-ASCII, ``"#%<>[\]^`{|}``) is %-escaped, as Squid's rfc1738_escape.
_SAFE = "/:@!$&'()*+,;=?~"


def encode(value: Optional[str]) -> str:
    """One field as a helper reads it: never empty, never a space or a line break."""
    if not value:
        return "-"
    return quote(value, safe=_SAFE)


# -- FORMAT ---------------------------------------------------------------------------------

#: code -> what it means, for the docs and the errors.
CODES = {
    "%LOGIN": "the authenticated user (asked for when the request has none)",
    "%un": "the user name, if any is known (never asks for one)",
    "%SRC": "the client's address",
    "%SRCPORT": "the client's port",
    "%MYPORT": "the listener's port",
    "%DST": "the host asked for",
    "%PORT": "the port asked for",
    "%PROTO": "the scheme: http, or NONE for a CONNECT",
    "%METHOD": "the request's method",
    "%URI": "the absolute URL (host:port for a CONNECT)",
    "%PATH": "the path and query (empty for a CONNECT)",
    "%>ha{Name}": "the request header Name (also %>{Name})",
}

_HEADER = re.compile(r"%(?:>ha|>)\{([!#$%&'*+.^_`|~0-9A-Za-z-]+)\}")


@dataclass(frozen=True)
class Format:
    """A parsed FORMAT: one getter per field, ``(ctx, request, user) -> str``."""

    codes: tuple[str, ...]
    getters: tuple[Callable[[Any, Any, Optional[str]], Optional[str]], ...] = \
        field(compare=False, repr=False)

    @property
    def needs_login(self) -> bool:
        return "%LOGIN" in self.codes

    def fields(self, ctx: Any, request: Any, user: Optional[str]) -> list[str]:
        return [encode(get(ctx, request, user)) for get in self.getters]


def _uri(ctx: Any, request: Any, user: Optional[str]) -> str:
    if request.is_connect:
        return request.authority
    return request.target


_GETTERS: dict[str, Callable[[Any, Any, Optional[str]], Optional[str]]] = {
    "%LOGIN": lambda ctx, request, user: user,
    "%un": lambda ctx, request, user: user,
    "%SRC": lambda ctx, request, user: ctx.client_addr[0],
    "%SRCPORT": lambda ctx, request, user: str(ctx.client_addr[1]),
    "%MYPORT": lambda ctx, request, user: str(ctx.server_addr[1]),
    "%DST": lambda ctx, request, user: request.host,
    "%PORT": lambda ctx, request, user: str(request.port) if request.host else None,
    "%PROTO": lambda ctx, request, user: "NONE" if request.is_connect
    else (request.scheme or "http"),
    "%METHOD": lambda ctx, request, user: request.method,
    "%URI": _uri,
    "%PATH": lambda ctx, request, user: None if request.is_connect else request.path,
}


def _header(name: str) -> Callable[[Any, Any, Optional[str]], Optional[str]]:
    def get(ctx: Any, request: Any, user: Optional[str]) -> Optional[str]:
        value: Optional[str] = request.headers.get(name)
        return value
    return get


def parse_format(text: str) -> Format:
    """``%LOGIN %DST ...`` (whitespace separated); ValueError naming an unknown code."""
    codes: list[str] = []
    getters: list[Callable[[Any, Any, Optional[str]], Optional[str]]] = []
    for code in text.split():
        header = _HEADER.fullmatch(code)
        if header is not None:
            getters.append(_header(header.group(1)))
        elif code in _GETTERS:
            getters.append(_GETTERS[code])
        else:
            from geproxy import did_you_mean
            raise ValueError(f"unknown format code {code!r}"
                             + did_you_mean(code, list(_GETTERS))
                             + f" (codes: {', '.join(CODES)})")
        codes.append(code)
    if not codes:
        raise ValueError("the format names no field (%LOGIN %SRC %DST ...)")
    return Format(tuple(codes), tuple(getters))


def request_line(fields: Sequence[str], arguments: Sequence[str]) -> str:
    """The line without its channel id and newline: the cache key of its answer."""
    return " ".join([*fields, *(encode(argument) for argument in arguments)])


# -- answers --------------------------------------------------------------------------------

RESULTS = ("OK", "ERR", "BH")


@dataclass(frozen=True)
class Answer:
    """One answer line, parsed."""

    result: str
    channel: Optional[int] = None
    user: Optional[str] = None
    groups: frozenset[str] = frozenset()
    message: Optional[str] = None
    log: Optional[str] = None
    tag: Optional[str] = None
    #: Every key=value pair, in order (unknown keys included).
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def match(self) -> bool:
        return self.result == "OK"


def _words(text: str) -> list[str]:
    """Split on whitespace; a double-quoted stretch keeps its spaces, ``\\`` escapes the
    next character inside it. The quotes are kept for ``_value`` to see."""
    words: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    started = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif quoted and char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
            started = True
        elif char.isspace() and not quoted:
            if started:
                words.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
    if quoted:
        raise ValueError("an unterminated quoted value")
    if started:
        words.append("".join(current))
    return words


def _value(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.DOTALL)
    return unquote(raw)


def parse_answer(line: str, channels: bool) -> Answer:
    """One answer line (without its newline); ``channels``: it starts with a channel id
    (``concurrency`` > 0). ValueError when it is not an answer."""
    words = _words(line.strip())
    channel = None
    if channels:
        if not words or not words[0].isdigit():
            raise ValueError(f"no channel id: {line[:80]!r}")
        channel = int(words.pop(0))
    if not words or words[0] not in RESULTS:
        raise ValueError(f"not OK, ERR or BH: {line[:80]!r}")
    result = words.pop(0)
    pairs: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    groups: set[str] = set()
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            continue  # Squid ignores words that are not key=value
        value = _value(raw)
        pairs.append((key, value))
        if key == "group":
            groups.add(value)
        else:
            found.setdefault(key, value)
    return Answer(result, channel, found.get("user") or None, frozenset(groups),
                  found.get("message"), found.get("log"), found.get("tag"), tuple(pairs))
