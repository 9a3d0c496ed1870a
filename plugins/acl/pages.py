"""Error pages for refusals: Squid's ``deny_info`` and ``error_directory``, for ``[acl]``.

``[acl] deny_page`` names one page for every refusal; a rule's trailing ``deny_page NAME``
names ``NAME.html`` in ``[acl] error_dir`` for the refusals of that rule. ``ErrorPages.load``
reads and checks every page when the configuration is loaded, so that a missing file or a
misspelt field stops the start (or the reload) instead of showing at the first refusal;
``ErrorPages.render`` makes one answer's body from the fields of that refusal.

Templates. A page is a UTF-8 file of at most ``MAX_TEMPLATE_SIZE`` (64 KiB: the pages are
held in memory, and an answer is built whole). In it:

- ``${name}`` is the value of a field (``FIELDS``; see ``PageFields``). The braces are
  required, and the name is one of the fields exactly: a name that is not a field is an error
  at load, with a suggestion when one is close (``${hots}``: did you mean ``${host}``?).
- ``$$`` is one ``$``.
- ``$`` followed by a letter or ``_`` (``$host``) is an error at load: it is a field written
  without its braces, or a ``$`` that should have been ``$$``.
- ``${`` that does not close on the same line, or holds ``{`` or ``$``, is an error at load.
- Any other ``$`` is itself (``$5``, ``$(``, a ``$`` at the end of a line).
- Everything else is copied as it is: CSS and JavaScript braces need no escaping.

Every error names the file, and the line and column of the mistake.

HTML and plain text. The answer is HTML (``text/html; charset=utf-8``) when the client
prefers HTML, by the rules of ``prefers_html``: in short, when its Accept field names
``text/html`` and does not rank ``text/plain`` higher. A browser's navigation does; curl's
``Accept: */*``, a request without Accept, and ``text/*`` do not, and get plain text
(``text/plain; charset=utf-8``): when the client states no preference the proxy picks plain
text, which reads well in a terminal and in a log. In the HTML rendering every value is
HTML-escaped (``html.escape`` with ``quote=True``: ``<``, ``>``, ``&``, ``"`` and ``'``),
since the host and even the client's address are chosen by whoever sends the request.

The plain text is ``NAME.txt`` beside ``NAME.html`` when that file exists (for the default
page, the page's path with ``.txt`` for its suffix: ``denied.txt`` beside ``denied.html``),
a template like the HTML one with the same fields, not escaped. Without it, a built-in text
of a few lines: the status and reason, the request id, and the contact when one is set.

In both renderings, control characters (C0, DEL, C1) and Unicode's bidirectional formatting
characters are removed from every value, so that a value can neither break a line of the
text nor make it read in another order than it is written.

Fields (``PageFields``): ``status``, ``reason``, ``error``, ``request_id``, ``client``,
``host``, ``time``, ``contact``, ``rule``. ``time`` is written as an IMF-fixdate (RFC 9110
section 5.6.7, ``Mon, 07 Dec 2026 18:42:04 GMT``), the form of the answer's Date field, in
UTC and in English whatever the locale. ``rule``, the id of the rule that denied, is shown
only by a page that names it: the built-in text never does.

The module imports geproxy's public API and the standard library only.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import html
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from geproxy import Headers, did_you_mean

__all__ = [
    "FIELDS",
    "HTML_TYPE",
    "MAX_TEMPLATE_SIZE",
    "PAGE_NAME",
    "TEXT_TYPE",
    "ErrorPages",
    "Page",
    "PageFields",
    "Template",
    "accept_of",
    "prefers_html",
]

#: The largest template read, in bytes; a larger file is refused at load.
MAX_TEMPLATE_SIZE = 64 * 1024
HTML_TYPE = "text/html; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
#: What a page name (a rule's ``deny_page NAME``) may be: it becomes a file name in
#: ``error_dir``, so it has no ``/`` and does not start with a dot.
PAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: The suffix of the pages in ``error_dir`` and of their plain-text variants.
HTML_SUFFIX = ".html"
TEXT_SUFFIX = ".txt"
#: Accept ranges looked at, at most: the rest of a longer field is ignored.
MAX_ACCEPT_RANGES = 64


# -- fields -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageFields:
    """What a page may show of one refusal. Values are given raw: rendering escapes them."""

    status: int              # 403, 407 ...
    reason: str              # "Forbidden"
    error: str               # Proxy-Status error type, "http_request_denied"
    request_id: str          # ctx.conn_id, e.g. "c12" / "w1c12-3"
    client: str              # client IP
    host: str                # the host asked for ("" for a request to the proxy itself)
    time: datetime.datetime  # aware, when the answer is made
    contact: str             # [acl] contact, an admin contact ("" when unset)
    rule: str                # the deciding rule id; shown only if the template names it

    def __post_init__(self) -> None:
        if self.time.utcoffset() is None:
            raise ValueError("PageFields.time must be an aware datetime (it has no timezone)")

    def values(self) -> dict[str, str]:
        """Every field as the text a page shows, before any escaping: ``time`` as an
        IMF-fixdate in UTC, ``status`` in decimal, control and bidirectional formatting
        characters removed from all."""
        utc = self.time.astimezone(datetime.timezone.utc)
        raw = {field: str(getattr(self, field)) for field in FIELDS}
        raw["time"] = email.utils.format_datetime(utc, usegmt=True)
        return {field: _clean(value) for field, value in raw.items()}


#: The field names a template may use, in the order of ``PageFields``.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PageFields))

# C0 controls, DEL, C1 controls; the bidirectional embeddings, overrides and isolates, and
# the marks (U+200E, U+200F, U+061C).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _clean(value: str) -> str:
    return _UNSAFE.sub("", value)


# -- templates --------------------------------------------------------------------------------

# One match per "$": "$$", "${...}" closed on its line, "$name", "${" unclosed, or a lone "$"
# (the empty alternative), which is text.
_DOLLAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^{}$\n]*)\}|(?P<bare>[A-Za-z_]\w*)"
                     r"|(?P<open>\{)|)")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class Template:
    """A parsed page. ``parts`` alternates text and field names: the items at even indices
    are text to copy, those at odd indices names from ``FIELDS``; it always has an odd
    length (text first and last, either possibly empty)."""

    path: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, path: str) -> "Template":
        """Parse ``text`` (read from ``path``, which errors name); raises ValueError
        ``PATH: line L, column C: PROBLEM`` for a mistake of the syntax or an unknown field."""
        parts: list[str] = []
        literal: list[str] = []
        end = 0
        for match in _DOLLAR.finditer(text):
            literal.append(text[end:match.start()])
            end = match.end()
            braced, bare = match.group("braced"), match.group("bare")
            if match.group("dollar") is not None:
                literal.append("$")
            elif braced is not None:
                parts.append("".join(literal))
                literal = []
                parts.append(_field_name(braced, text, match.start(), path))
            elif bare is not None:
                raise ValueError(_where(text, match.start(), path) + (
                    f"'${bare}': a field is written ${{{bare}}}, a dollar sign $$"))
            elif match.group("open") is not None:
                raise ValueError(_where(text, match.start(), path) + (
                    "'${' is not closed by '}' on its line (a dollar sign is written $$)"))
            else:
                literal.append("$")
        literal.append(text[end:])
        parts.append("".join(literal))
        return cls(path, tuple(parts))

    @property
    def fields(self) -> frozenset[str]:
        """The names of the fields the page shows."""
        return frozenset(self.parts[1::2])

    def render(self, values: Mapping[str, str]) -> str:
        """The page with each field replaced by ``values[name]``, as given (the caller
        escapes)."""
        return "".join(part if index % 2 == 0 else values[part]
                       for index, part in enumerate(self.parts))


def _where(text: str, offset: int, path: str) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"{path}: line {line}, column {column}: "


def _field_name(name: str, text: str, offset: int, path: str) -> str:
    if name in FIELDS:
        return name
    where = _where(text, offset, path)
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(where + f"'${{{name}}}' is not a field name (fields: "
                         f"{', '.join(FIELDS)}; a dollar sign is written $$)")
    hint = did_you_mean(f"${{{name.lower()}}}", [f"${{{field}}}" for field in FIELDS])
    hint = hint.replace("'", "") or f" (fields: {', '.join(FIELDS)})"
    raise ValueError(where + f"unknown field ${{{name}}}{hint}")


def read_template(path: str) -> Template:
    """Read and parse the template at ``path``; raises ValueError naming ``path`` when it
    is missing, not a regular file, unreadable, larger than MAX_TEMPLATE_SIZE, not UTF-8, or
    a template with a mistake. A leading byte-order mark is dropped."""
    try:
        # O_NONBLOCK: a FIFO put where a page should be must not hang the start.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_TEMPLATE_SIZE + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TEMPLATE_SIZE:
        raise ValueError(f"{path}: larger than {MAX_TEMPLATE_SIZE // 1024} KiB, the most a "
                         f"page may be (pages are held in memory)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}: not UTF-8: line {line} has the byte "
                         f"{data[exc.start]:#04x} (offset {exc.start}); save the page as "
                         f"UTF-8") from None
    return Template.parse(text.removeprefix("\ufeff"), path)


@dataclass(frozen=True)
class Page:
    """One page: its HTML template and, when its ``.txt`` variant exists, that one."""

    html: Template
    text: Optional[Template] = None

    @classmethod
    def read(cls, path: str) -> "Page":
        """The page at ``path`` and the variant beside it (its suffix replaced by ``.txt``,
        or ``.txt`` added when it has none), if one exists; raises ValueError as
        ``read_template`` does, for either file."""
        stem, suffix = os.path.splitext(path)
        variant = stem + TEXT_SUFFIX
        text = None
        # A page that is itself a .txt file has no variant: it would be its own.
        if suffix != TEXT_SUFFIX and os.path.lexists(variant):
            text = read_template(variant)
        return cls(read_template(path), text)


# -- content negotiation ----------------------------------------------------------------------

# RFC 9110 section 12.4.2: "0" or "1" with up to three decimals.
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: The parameters of both representations offered (``charset=utf-8``).
_OFFERED_PARAMETERS = {"charset": "utf-8"}


@dataclass(frozen=True)
class _Range:
    type: str
    subtype: str
    parameters: tuple[tuple[str, str], ...]
    q: float

    def precedence(self, subtype: str) -> int:
        """How closely this range names ``text/<subtype>`` (RFC 9110 section 12.5.1: the
        most specific range decides): -1 when it does not match it; 0 for ``*/*``, 1 for
        ``text/*``, 2 for the type itself, 3 for the type with parameters."""
        if self.type == "*":
            return 0 if self.subtype == "*" else -1
        if self.type != "text":
            return -1
        if self.subtype == "*":
            return 1
        if self.subtype != subtype:
            return -1
        if not self.parameters:
            return 2
        # A parameter the offered type has not (text/html;level=1) rules the range out.
        if all(_OFFERED_PARAMETERS.get(key) == value for key, value in self.parameters):
            return 3
        return -1


def _ranges(accept: str) -> list[_Range]:
    """The well-formed media ranges of an Accept value, lower-cased; a malformed one (no
    ``/``, ``*/html``, a bad q-value) is left out, as if the client had not sent it."""
    ranges: list[_Range] = []
    for item in accept.split(",")[:MAX_ACCEPT_RANGES]:
        pieces = [piece.strip() for piece in item.split(";")]
        kind, slash, subtype = pieces[0].lower().partition("/")
        if not (slash and _TOKEN.fullmatch(kind) and _TOKEN.fullmatch(subtype)):
            continue
        if kind == "*" and subtype != "*":
            continue
        parameters: list[tuple[str, str]] = []
        q: Optional[float] = 1.0
        for piece in pieces[1:]:
            key, _, value = piece.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"').lower()
            if key == "q":
                q = float(value) if _QVALUE.fullmatch(value) else None
                break  # what follows the weight is not a parameter of the media type
            if key:
                parameters.append((key, value))
        if q is not None:
            ranges.append(_Range(kind, subtype, tuple(parameters), q))
    return ranges


def _quality(ranges: list[_Range], subtype: str) -> tuple[float, int]:
    """(q, precedence) of ``text/<subtype>``: the q of the most specific range that matches
    it (the first such when several tie), or (0, -1) when none does."""
    best: tuple[float, int] = (0.0, -1)
    for candidate in ranges:
        precedence = candidate.precedence(subtype)
        if precedence > best[1]:
            best = (candidate.q, precedence)
    return best


def accept_of(headers: Headers) -> Optional[str]:
    """What ``render`` takes for a request's Accept: its fields' values joined with ``", "``
    (RFC 9110 section 5.3), or None when it has none."""
    values = headers.get_all("Accept")
    return ", ".join(values) if values else None


def prefers_html(accept: Optional[str]) -> bool:
    """Whether a client whose Accept field is ``accept`` gets HTML rather than plain text.

    ``accept`` is the field's value, several Accept fields joined with ``", "``; None when
    the request had none. Each of ``text/html`` and ``text/plain`` gets the q-value of the
    most specific range that matches it (RFC 9110 section 12.5.1); HTML is chosen when its
    q-value is above 0 and it ranks above plain text: by q-value, then, for equal q-values,
    by how specifically it was named. Ties go to plain text: ``*/*`` and ``text/*``, which
    name neither, a request without Accept (which accepts anything), and an Accept that
    accepts neither (the proxy then answers in plain text rather than 406).
    """
    if accept is None:
        return False
    ranges = _ranges(accept)
    html_rank, text_rank = _quality(ranges, "html"), _quality(ranges, "plain")
    return html_rank[0] > 0 and html_rank > text_rank


# -- the pages --------------------------------------------------------------------------------


class ErrorPages:
    """The pages of one configuration: the default one, and those rules name.

    Immutable once loaded; a reload loads a new one. Rendering does no I/O.
    """

    def __init__(self, default: Optional[Page] = None,
                 named: Optional[Mapping[str, Page]] = None) -> None:
        self.default = default
        self.named: dict[str, Page] = dict(named or {})

    @classmethod
    def load(cls, default_page: str, error_dir: str, names: Iterable[str]) -> "ErrorPages":
        """default_page: a file path ("" for none); error_dir: a directory ("" for none);
        names: the page names rules use (each must exist as NAME.html in error_dir).
        Reads and validates every template now, and the ``.txt`` variant beside each when
        there is one; raises ValueError naming the file and the problem (missing file,
        unreadable, not UTF-8, too large, unknown field name, bad syntax), or the name or
        directory that is wrong."""
        wanted = sorted(set(names))
        for name in wanted:
            if not PAGE_NAME.fullmatch(name):
                raise ValueError(f"deny_page {name!r}: a page name is letters, digits, '_', "
                                 f"'.' and '-', not starting with '.' or '-'")
        if error_dir and not os.path.isdir(error_dir):
            raise ValueError(f"{error_dir}: no such directory (error_dir)")
        if wanted and not error_dir:
            raise ValueError(f"deny_page {', '.join(wanted)}: rules name pages, but no "
                             f"error_dir says where they are")
        default = Page.read(default_page) if default_page else None
        named = {name: Page.read(os.path.join(error_dir, name + HTML_SUFFIX))
                 for name in wanted}
        return cls(default, named)

    def __bool__(self) -> bool:
        """Whether there is any page at all (else every refusal gets the one-line text)."""
        return self.default is not None or bool(self.named)

    def render(self, name: Optional[str], fields: PageFields, accept: Optional[str]
               ) -> Optional[tuple[str, bytes]]:
        """(content type, body) for a refusal: the page ``name`` (a rule's deny_page), else
        the default page, else None (the proxy's usual one-line text answer).

        HTML (``HTML_TYPE``) when ``prefers_html(accept)``, else plain text (``TEXT_TYPE``):
        the page's ``.txt`` variant, or the built-in text. ``accept`` is the request's
        Accept value, ``accept_of(request.headers)``: None when it had none. ``name``
        must be one of the names given to ``load``: another is a KeyError (a bug of the
        caller's, not a configuration mistake)."""
        page = self.named[name] if name is not None else self.default
        if page is None:
            return None
        values = fields.values()
        if prefers_html(accept):
            escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
            return HTML_TYPE, page.html.render(escaped).encode("utf-8")
        if page.text is not None:
            return TEXT_TYPE, page.text.render(values).encode("utf-8")
        return TEXT_TYPE, builtin_text(values).encode("utf-8")


def builtin_text(values: Mapping[str, str]) -> str:
    """The plain text of a page without a ``.txt`` variant: the status and reason, the
    request id, and the contact when there is one; never the rule."""
    lines = [f"{values['status']} {values['reason']}",
             f"Request id: {values['request_id']}"]
    if values["contact"]:
        lines.append(f"Contact: {values['contact']}")
    return "\n".join(lines) + "\n"
