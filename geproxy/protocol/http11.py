"""HTTP/1.1 parsing and serialising with no I/O: bytes in, heads and body pieces out.

This module imports neither socket nor gevent. Heads are tokenised and validated by llhttp
(through httptools) in its strict mode, which already refuses the classic smuggling vectors
(Content-Length with Transfer-Encoding, duplicate lengths, obs-fold, bare CR or LF, NUL and
control bytes, whitespace before a colon, invalid chunk sizes). On top of it this module
applies the proxy's own rules (docs/hardening.md, "Requests it refuses"), the size limits,
and decides each body's framing.
Bodies are decoded by the small incremental readers below, which hand back exactly the bytes
that follow a message so that nothing after a CONNECT head, a pipelined request or a reused
upstream response is lost or misread.

Errors: nothing here raises anything but these, whatever the bytes and however they are cut
(tests/test_http11.py and the fuzz target in fuzz/ hold it to that):

- ``RequestHeadParser.feed``, ``request_body_reader``, ``parse_authority`` and the
  ``ChunkedReader`` of a request: ``ClientError`` (400), or its subclasses
  ``RequestLineTooLong`` (414) and ``HeadTooLarge`` (431);
- ``ResponseHeadParser.feed``, ``response_body_reader`` and the ``ChunkedReader`` of a
  response: ``UpstreamError`` (502);
- ``BodyReader.eof``: ``ConnectionTerminated`` (502) when the body was cut short;
- ``serialize_head``: ``ValueError`` for a field that would break the head.

``LengthReader``, ``UntilCloseReader`` and ``NoBody`` raise nothing. A parser or reader that
raised is spent: the stream's framing is lost, so the connection is closed, never read on.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from http import HTTPStatus
from typing import Optional, Union

import httptools

from ..errors import ClientError, HeadTooLarge, RequestLineTooLong, UpstreamError
from ..models import Headers, Request, Response

__all__ = [
    "RequestHeadParser",
    "ResponseHeadParser",
    "BodyReader",
    "LengthReader",
    "ChunkedReader",
    "UntilCloseReader",
    "request_body_reader",
    "response_body_reader",
    "parse_authority",
    "make_request",
    "serialize_head",
    "encode_chunk",
    "LAST_CHUNK",
    "HOP_BY_HOP",
]

MAX_REQUEST_LINE = 8 * 1024
MAX_CHUNK_LINE = 4 * 1024
LAST_CHUNK = b"0\r\n\r\n"

#: Fields that describe one connection, never forwarded (RFC 9110 7.6.1), plus the proxy's own.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_AUTHORITY_PATH = re.compile(r"([^/?#]*)([^#]*)")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ); only visible chars and blanks.
_CHUNK_EXT = re.compile(rb"(?:[ \t]*;[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                        rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+|\"[^\"\r\n\x00]*\"))?)*")


#: llhttp's version numbers that are taken, and how a start line spells them.
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_AFTER_SPACE = {v: b" " + v.encode() for v in _VERSIONS.values()}
_BEFORE_SPACE = {v: v.encode() + b" " for v in _VERSIONS.values()}
_CRLF_BYTES = b"\r\n"


def _leading_crlf(buf: Union[bytes, bytearray]) -> int:
    """How many CR and LF bytes come before the start line (llhttp skips them)."""
    start = 0
    while start < len(buf) and buf[start] in _CRLF_BYTES:
        start += 1
    return start


class _HeadDone(Exception):
    """Raised from the llhttp callback to stop at the end of the head: bodies are ours."""


class _Callbacks:
    """What llhttp's callbacks collect of one head: its target, and whether it is whole.
    There is no ``on_header``: llhttp then validates the fields without a call into Python
    for each, and they are split out of the head once it is whole (``_fields``)."""

    __slots__ = ("url", "done", "max_line", "too_long")

    def __init__(self, max_line: int) -> None:
        self.url = b""
        self.done = False
        self.max_line = max_line
        self.too_long = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_line:
            self.too_long = True
            raise _HeadDone()

    def on_headers_complete(self) -> None:
        self.done = True
        # Stop here: llhttp's own checks after the head (of Transfer-Encoding, say) are
        # not the proxy's, which are made on the fields (docs/hardening.md).
        raise _HeadDone()


def _fields(block: Union[bytes, bytearray]) -> list[tuple[str, str]]:
    """The fields of a head llhttp has validated (no obs-fold, no bare CR or LF, no
    whitespace before a colon, token names), from the bytes between the start line's CRLF
    and the empty line, each line ending in CRLF. A field value has no leading or trailing
    whitespace (RFC 9110 5.5)."""
    fields = []
    for line in block.decode("latin-1").split("\r\n")[:-1]:
        name, _, value = line.partition(":")
        fields.append((name, value.strip(" \t")))
    return fields


class _HeadParser:
    """Shared incremental head parsing: feed bytes until a head is complete."""

    _parser_class: type = httptools.HttpRequestParser

    def __init__(self, max_size: int, max_line: int = MAX_REQUEST_LINE) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self._buf = bytearray()
        self._cb = _Callbacks(max_line)
        self._parser = self._parser_class(self._cb)
        self._start_line = b""
        self._http_version = ""
        #: Bytes that followed the head, once it is complete.
        self.rest = b""
        #: The size of the head on the wire, once it is complete.
        self.size = 0
        #: The head's fields, once it is complete.
        self.fields: list[tuple[str, str]] = []

    @property
    def started(self) -> bool:
        return bool(self._buf)

    def _feed(self, data: bytes) -> bool:
        """Feed bytes; True once the head is complete (then ``rest`` holds what followed)."""
        # A head that comes in one piece, the usual case, is never copied into _buf.
        if self._buf:
            start = len(self._buf)
            self._buf += data
            buf: Union[bytes, bytearray] = self._buf
        else:
            start, buf = 0, data
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserCallbackError, httptools.HttpParserUpgrade):
            pass
        except httptools.HttpParserError as exc:
            if self._cb.too_long:
                raise self._line_error() from None
            raise self._error(f"malformed: {exc}") from None
        if self._cb.too_long:
            raise self._line_error()
        version = self._parser.get_http_version()  # "0.0" until llhttp has read it
        if version not in _VERSIONS and (self._cb.done or version != "0.0" and (
                2 <= buf.find(b"\r\n", _leading_crlf(buf)) + 2 <= self.max_size)):
            # Checked before looking for the end (llhttp ends an HTTP/0.9 request line at a
            # bare LF), and before the head is whole once its start line is: a cut HTTP/2
            # preface ("PRI * HTTP/2.0") has no end to wait for. A start line that ended past
            # max_size is the size's error, as it is when it comes in pieces.
            raise self._error(f"unsupported HTTP version {version!r}")
        if not self._cb.done:
            if len(buf) > self.max_size:
                raise self._size_error()
            if buf is data:
                self._buf = bytearray(data)
            return False
        self._http_version = _VERSIONS[version]
        # llhttp skips empty lines before the start line and insists on CRLF line endings
        # after it, so the head ends at the first empty line after the start line.
        head_start = _leading_crlf(buf)
        end = buf.find(b"\r\n\r\n", max(head_start, start - 3)) + 4
        if end < 4 or end > self.max_size:
            raise self._size_error()
        line_end = buf.find(b"\r\n", head_start)
        self._start_line = bytes(buf[head_start:line_end])
        self.fields = _fields(buf[line_end + 2 : end - 2]) if end - line_end > 4 else []
        self.rest = bytes(buf[end:])
        self.size = end
        self._buf = bytearray()
        return True

    def _error(self, detail: str) -> Exception:
        return ClientError(detail)

    def _size_error(self) -> Exception:
        return HeadTooLarge("request head over max_header_size")

    def _line_error(self) -> Exception:
        return RequestLineTooLong("request line too long")

    def _version(self) -> str:
        version = self._http_version  # HTTP/1.1 or HTTP/1.0, checked by _feed
        # llhttp also takes RTSP/1.0 and ICE/1.0 and reports their version alike.
        if not self._names_http(version):
            raise self._error(f"not HTTP: {self._start_line[:64]!r}")
        return version

    def _names_http(self, version: str) -> bool:
        """Whether the start line carries ``version``: last in a request line."""
        return self._start_line.endswith(_AFTER_SPACE[version])


class RequestHeadParser(_HeadParser):
    """Incremental request-head parser. ``feed`` returns the Request once the head is whole."""

    def feed(self, data: bytes) -> Optional[Request]:
        if not self._feed(data):
            return None
        cb = self._cb
        method = self._parser.get_method().decode("ascii")
        return make_request(method, cb.url.decode("latin-1"), self._version(),
                            Headers(self.fields, frozen=True))


def make_request(method: str, target: str, version: str, headers: Headers) -> Request:
    """The Request for a request line's parts, its target checked as the wire rules say:
    authority-form for CONNECT, absolute-form (http:// only) to forward, origin-form for the
    proxy itself. ClientError for anything else."""
    if len(headers.get_all("host")) > 1:
        raise ClientError("more than one Host field")
    if method == "CONNECT":
        host, port = parse_authority(target)
        if "content-length" in headers and headers.get("content-length") != "0" or (
            "transfer-encoding" in headers
        ):
            raise ClientError("CONNECT with a body")
        return Request(method, target, version, headers, "", host, port, "")
    if target.startswith("/") or target == "*":
        if version == "HTTP/1.1" and "host" not in headers:
            raise ClientError("HTTP/1.1 request without Host")
        return Request(method, target, version, headers, "", "", 0, target)
    scheme, host, port, path = _parse_absolute(target)
    return Request(method, target, version, headers, scheme, host, port, path)


class ResponseHeadParser(_HeadParser):
    """Incremental response-head parser; errors are the upstream's fault (502)."""

    _parser_class = httptools.HttpResponseParser

    def feed(self, data: bytes) -> Optional[Response]:
        if not self._feed(data):
            return None
        version = self._version()
        status = self._parser.get_status_code()
        if not 100 <= status <= 999:
            raise self._error(f"bad status {status}")
        return Response(status, Headers(self.fields), b"", "", version)

    def _error(self, detail: str) -> Exception:
        return UpstreamError(f"upstream response {detail}")

    def _names_http(self, version: str) -> bool:
        return self._start_line.startswith(_BEFORE_SPACE[version])

    def _size_error(self) -> Exception:
        return UpstreamError("upstream response head over max_header_size")

    _line_error = _size_error


# -- targets --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _check_host(host: str) -> str:
    """Validate a host from a target: a DNS name, an IPv4 literal or a bracketed IPv6.

    Memoized (a pure function of the text; only valid hosts are kept, a refused one raises):
    an egress proxy sees the same few hundred hosts again and again."""
    if host.startswith("["):
        if not host.endswith("]"):
            raise ClientError("bad IPv6 literal")
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ClientError("bad IPv6 literal") from None
    if not _HOSTNAME.fullmatch(host):
        raise ClientError("bad host name")
    name = host.rstrip(".").lower()
    if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
        # A last label of digits (or 0x hex) makes an IPv4 address for inet_aton and most
        # resolvers ("127.1", "2130706433", "0x7f.1"): only the dotted-quad form is taken,
        # so policies see one spelling of every address.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ClientError("IPv4 address not in dotted-quad form") from None
    return name


def _check_port(port: str) -> int:
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ClientError("bad port")
    return int(port)


def parse_authority(target: str) -> tuple[str, int]:
    """Parse a CONNECT target ``host:port`` (authority-form, port required) strictly."""
    host, sep, port = target.rpartition(":")
    if not sep or not host:
        raise ClientError("CONNECT target needs host:port")
    return _check_host(host), _check_port(port)


def _parse_absolute(target: str) -> tuple[str, str, int, str]:
    if target[:7].lower() != "http://":
        raise ClientError("only http:// targets are forwarded; use CONNECT for https")
    # The authority ends at the first of "/?#"; the fragment is never sent.
    authority, path = _AUTHORITY_PATH.match(target, 7).groups()  # type: ignore[union-attr]
    if "@" in authority:
        raise ClientError("userinfo in the target")
    if not path.startswith("/"):
        path = "/" + path
    if authority.endswith("]") or ":" not in authority:
        host, port = authority, 80
    else:
        host_part, _, port_part = authority.rpartition(":")
        host, port = host_part, (_check_port(port_part) if port_part else 80)
    if not host:
        raise ClientError("empty host in the target")
    return "http", _check_host(host), port, path


# -- bodies ---------------------------------------------------------------------------------


class BodyReader:
    """Incremental body decoder. ``feed`` returns the payload pieces in the bytes given;
    once ``done``, ``rest`` holds the bytes after the body (the next message)."""

    done = False
    rest = b""
    #: Whether the end of this body is known from its framing (not from a closed connection).
    delimited = True

    def feed(self, data: bytes) -> list[bytes]:
        raise NotImplementedError

    def eof(self) -> None:
        """The peer closed: fine for a close-delimited body, an error for any other."""
        if not self.done:
            raise _incomplete()


def _incomplete() -> Exception:
    from ..errors import ConnectionTerminated

    return ConnectionTerminated("connection closed in the middle of a body")


class NoBody(BodyReader):
    """A message without a body: every byte fed is the next message's (``rest``)."""

    done = True

    def __init__(self, rest: bytes = b"") -> None:
        self.rest = rest

    def feed(self, data: bytes) -> list[bytes]:
        self.rest += data
        return []


class LengthReader(BodyReader):
    """A body of Content-Length bytes."""

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.rest += data
            return []
        if len(data) < self.remaining:
            self.remaining -= len(data)
            return [data]
        piece, self.rest = data[: self.remaining], data[self.remaining :]
        self.remaining = 0
        self.done = True
        return [piece]


class UntilCloseReader(BodyReader):
    """A response body delimited by the upstream closing the connection."""

    delimited = False

    def feed(self, data: bytes) -> list[bytes]:
        return [data]

    def eof(self) -> None:
        self.done = True


class ChunkedReader(BodyReader):
    """Decodes ``Transfer-Encoding: chunked`` strictly; trailers are read and dropped."""

    def __init__(self, error: type = ClientError, max_trailers: int = 64 * 1024) -> None:
        self._error = error
        self._max_trailers = max_trailers
        self._buf = b""
        self._remaining = 0  # bytes of chunk data still due
        self._state = "size"  # size, data, crlf, trailer
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.rest += data
            return []
        buf = self._buf + data if self._buf else data
        self._buf = b""
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == "data":
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "crlf"
            elif state == "crlf":
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise self._error("chunk data not followed by CRLF")
                pos += 2
                self._state = "size"
            else:
                nl = buf.find(b"\r\n", pos)
                limit = MAX_CHUNK_LINE if state == "size" else self._max_trailers
                if nl == -1:
                    if end - pos > limit or b"\n" in buf[pos:end] or (
                        b"\r" in buf[pos : end - 1]
                    ):
                        raise self._error("bad chunk line")
                    break
                if nl - pos >= limit:  # the same verdict as when the line comes in pieces
                    raise self._error("bad chunk line")
                line = buf[pos:nl]
                pos = nl + 2
                if b"\r" in line or b"\n" in line or b"\x00" in line:
                    raise self._error("bare CR or LF in chunked framing")
                if state == "size":
                    self._size_line(line)
                else:
                    self._trailer_line(line)
                    if self.done:
                        self.rest = buf[pos:end]
                        return out
        self._buf = buf[pos:end]
        return out

    def _size_line(self, line: bytes) -> None:
        match = _HEX.match(line)
        if not match or not _CHUNK_EXT.fullmatch(line, match.end()):
            raise self._error("invalid chunk size")
        size = int(match.group(), 16)
        if size:
            self._remaining = size
            self._state = "data"
        else:
            self._state = "trailer"

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self.done = True
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > self._max_trailers:
            raise self._error("trailers too large")
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise self._error("malformed trailer")


def _framing_error(error: type, what: str) -> Exception:
    return error(f"unsupported framing: {what}")


def _body_reader(headers: Headers, version: str, error: type) -> Optional[BodyReader]:
    """The reader for a message with a body framed by its own headers, None if unframed."""
    te = headers.tokens("transfer-encoding")
    if te:
        # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
        if te != ["chunked"] or version == "HTTP/1.0":
            raise _framing_error(error, "Transfer-Encoding " + ", ".join(te))
        return ChunkedReader(error)
    cls = headers.get_all("content-length")
    if cls:
        value = cls[0].strip()
        if len(cls) > 1 or not value.isdigit() or not value.isascii() or len(value) > 18:
            raise _framing_error(error, "Content-Length")
        return LengthReader(int(value))
    return None


def request_body_reader(request: Request) -> BodyReader:
    """The body reader for a request: chunked, a Content-Length, or none."""
    return _body_reader(request.headers, request.version, ClientError) or NoBody()


def response_body_reader(method: str, response: Response) -> BodyReader:
    """The body reader for a response to ``method`` (RFC 9112 section 6.3)."""
    status = response.status
    if method == "HEAD" or status < 200 or status in (204, 304):
        return NoBody()
    return _body_reader(response.headers, response.version, UpstreamError) or (
        UntilCloseReader())


# -- serialising ----------------------------------------------------------------------------

#: The reason phrase of every status IANA registered (RFC 9110 section 15), as the proxy
#: writes status lines: an upstream's own phrase is not kept (the parser does not read it).
_REASONS = {status.value: status.phrase for status in HTTPStatus} | {
    # Python's older names, as RFC 9110 renamed them.
    413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
    422: "Unprocessable Content"}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def serialize_head(start_line: str, headers: Union[Headers, list[tuple[str, str]]]) -> bytes:
    """A head as bytes. Refuses CR or LF inside a field, so no plugin can inject a header."""
    lines = [start_line]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"invalid header field {name!r}")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data gives nothing (an empty chunk would end it)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
