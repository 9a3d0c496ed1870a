"""geproxy.protocol.http11 driven as the proxy drives it, without I/O, and the properties it
must keep.

``request_events`` and ``response_events`` feed a stream of messages through the head parsers
and body readers the way connection.py and forward.py do, and turn it into events. ``check``
holds one stream to the properties the fuzz target (http11_fuzz.py) and the property tests
(tests/test_http11.py) both assert; a failed assertion, or any exception other than the errors
http11's module docstring documents, is a bug:

- the same events, or an error of the same class, whether the stream is fed whole or in
  pieces (a head refused as too large in pieces may have been refused as malformed whole);
- events that keep the framing: in order, a Content-Length body of exactly that length, no
  body where there can be none, every byte of the input accounted for, and every head
  unchanged by serialize_head and a second parse.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence, Union

from geproxy.errors import (
    ClientError,
    ConnectionTerminated,
    HeadTooLarge,
    RequestLineTooLong,
    UpstreamError,
)
from geproxy.models import Request, Response
from geproxy.protocol.http11 import (
    MAX_REQUEST_LINE,
    BodyReader,
    RequestHeadParser,
    ResponseHeadParser,
    request_body_reader,
    response_body_reader,
    serialize_head,
)

Head = Union[Request, Response]
#: ("head", Request or Response, its size on the wire, the method of the request it is or
#: answers: "" for an interim response), ("data", payload), ("end",) for the end of a body,
#: ("tunnel", bytes) for all that follows a CONNECT or 101 head, and ("partial",) when the
#: input ends inside a head. Consecutive data (or tunnel) events are merged.
Event = tuple

MAX_SIZE = 64 * 1024
#: What each side may raise: http11's module docstring. Classes, not their subclasses.
DOCUMENTED = {
    "request": (ClientError, RequestLineTooLong, HeadTooLarge, ConnectionTerminated),
    "response": (UpstreamError, ConnectionTerminated),
}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# llhttp strips the whitespace before a field value, not the whitespace after it.
_FIELD_VALUE = re.compile(r"(?:[^\x00-\x08\x0a-\x1f\x7f \t][^\x00-\x08\x0a-\x1f\x7f]*)?")


class _Events(list):  # type: ignore[type-arg]
    def add(self, kind: str, data: bytes) -> None:
        if not data:
            return
        if self and self[-1][0] == kind:
            self[-1] = (kind, self[-1][1] + data)
        else:
            self.append((kind, data))


def _drive(pieces: Iterable[bytes],
           new_parser: Callable[[], Union[RequestHeadParser, ResponseHeadParser]],
           after_head: Callable[[Head], tuple[str, Optional[BodyReader]]]) -> list[Event]:
    """Heads, bodies and what follows them, from ``pieces``. ``after_head`` gives a head's
    method and its body reader, None when the bytes after the head belong to a tunnel."""
    events = _Events()
    parser = new_parser()
    reader: Optional[BodyReader] = None
    tunnel = False
    for data in pieces:
        while data:
            if tunnel:
                events.add("tunnel", data)
                break
            if reader is None:
                head = parser.feed(data)
                if head is None:
                    break
                method, reader = after_head(head)
                events.append(("head", head, parser.size, method))
                data = parser.rest
                if reader is None:
                    tunnel = True
                    continue
            for piece in reader.feed(data) if data else ():
                events.add("data", piece)
            if reader.done:
                events.append(("end",))
                data, reader, parser = reader.rest, None, new_parser()
            else:
                break
    if reader is not None:
        reader.eof()  # ConnectionTerminated, unless the body ends with the connection
        events.append(("end",))
    elif parser.started:
        events.append(("partial",))
    return events


def request_events(pieces: Iterable[bytes], max_size: int = MAX_SIZE,
                   max_line: int = MAX_REQUEST_LINE) -> list[Event]:
    """A client's stream: pipelined requests, their bodies, until a CONNECT makes the rest
    tunnel bytes."""

    def after_head(request: Head) -> tuple[str, Optional[BodyReader]]:
        assert isinstance(request, Request)
        tunnel = request.method == "CONNECT"
        return request.method, None if tunnel else request_body_reader(request)

    return _drive(pieces, lambda: RequestHeadParser(max_size, max_line), after_head)


def response_events(pieces: Iterable[bytes], methods: Sequence[str] = (),
                    max_size: int = MAX_SIZE) -> list[Event]:
    """An upstream's stream of responses to ``methods`` (GET after them): interim 1xx heads
    answer no request; 101, or 2xx to CONNECT, makes the rest tunnel bytes."""
    answered = 0

    def after_head(response: Head) -> tuple[str, Optional[BodyReader]]:
        nonlocal answered
        assert isinstance(response, Response)
        if response.status < 200 and response.status != 101:
            return "", response_body_reader("GET", response)
        method = methods[answered] if answered < len(methods) else "GET"
        answered += 1
        if response.status == 101 or method == "CONNECT" and response.status < 300:
            return method, None
        return method, response_body_reader(method, response)

    return _drive(pieces, lambda: ResponseHeadParser(max_size), after_head)


def outcome(side: str, pieces: Sequence[bytes], methods: Sequence[str] = (),
            max_size: int = MAX_SIZE, max_line: int = MAX_REQUEST_LINE,
            ) -> tuple[list[Event], Optional[BaseException]]:
    """The events, or the documented error that ended them (anything else propagates).
    ``methods`` is for responses, ``max_line`` for requests."""
    try:
        if side == "request":
            return request_events(pieces, max_size, max_line), None
        return response_events(pieces, methods, max_size), None
    except DOCUMENTED[side] as exc:
        if type(exc) not in DOCUMENTED[side]:
            raise
        return [], exc


# -- checks ---------------------------------------------------------------------------------


def _check_head(head: Head, size: int, max_size: int) -> None:
    assert 0 < size <= max_size, size
    assert head.version in ("HTTP/1.0", "HTTP/1.1"), head.version
    for name, value in head.headers:
        assert _TOKEN.fullmatch(name), name
        assert _FIELD_VALUE.fullmatch(value), value
    if isinstance(head, Request):
        assert _TOKEN.fullmatch(head.method), head.method
        if head.method == "CONNECT":
            assert head.host and 1 <= head.port <= 65535 and not head.scheme, head
        elif head.target.startswith("/") or head.target == "*":
            assert (head.scheme, head.host, head.port, head.path) == ("", "", 0, head.target)
        else:
            assert head.scheme == "http" and head.host and 1 <= head.port <= 65535, head
            assert head.path.startswith("/"), head
        line = f"{head.method} {head.target} {head.version}"
        again = RequestHeadParser(max(max_size, 64 * 1024)).feed(
            serialize_head(line, list(head.headers)))
    else:
        assert 100 <= head.status <= 999, head.status
        line = f"{head.version} {head.status} Reason"
        again = ResponseHeadParser(max(max_size, 64 * 1024)).feed(
            serialize_head(line, list(head.headers)))
    assert again == head, (again, head)


def _declared_length(head: Head, method: str) -> Optional[int]:
    """The payload length the head declares, read apart from http11 (RFC 9112 section 6.3):
    None for a chunked or a close-delimited body."""
    if isinstance(head, Response) and (
            method == "HEAD" or head.status < 200 or head.status in (204, 304)):
        return 0
    if "transfer-encoding" in head.headers:
        return None
    value = head.headers.get("content-length")
    if value is not None:
        return int(value)
    return None if isinstance(head, Response) else 0


def check_events(events: list[Event], size: int, max_size: int = MAX_SIZE) -> None:
    """The framing of a stream that raised nothing: order, lengths, and every byte of the
    ``size`` input accounted for."""
    accounted = 0
    exact = True  # false once a chunked body or a partial head hides some wire bytes
    declared: Optional[int] = None
    body = -1  # payload bytes of the open message, -1 between messages
    for i, event in enumerate(events):
        kind = event[0]
        last = i == len(events) - 1
        if kind == "head":
            assert body == -1, events
            head, head_size, method = event[1:]
            _check_head(head, head_size, max_size)
            accounted += head_size
            declared = _declared_length(head, method)
            if declared is None and "transfer-encoding" in head.headers:
                exact = False  # the chunk framing is not in the events
            body = 0
        elif kind == "data":
            assert body >= 0, events
            body += len(event[1])
            accounted += len(event[1])
        elif kind == "end":
            assert body >= 0 and (declared is None or body == declared), (body, declared)
            body = -1
        elif kind == "tunnel":
            assert body == 0 and last, events
            accounted += len(event[1])
        else:
            assert kind == "partial" and body == -1 and last, events
            exact = False
    assert accounted == size if exact else accounted <= size, (accounted, size)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, so any integers do)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def check(side: str, data: bytes, cuts: Sequence[int], methods: Sequence[str] = (),
          max_size: int = MAX_SIZE, max_line: int = MAX_REQUEST_LINE,
          ) -> tuple[list[Event], Optional[BaseException]]:
    """Every property above for one stream: fed whole, then cut at ``cuts``. The whole
    stream's events, or its error."""
    events, error = outcome(side, [data], methods, max_size, max_line)
    if error is None:
        check_events(events, len(data), max_size)
    pieces = split(data, cuts)
    events_split, error_split = outcome(side, pieces, methods, max_size, max_line)
    # In pieces, a head is refused as too large the moment the bytes held pass the limit,
    # before the bytes that would have shown it malformed (or its line too long) come in.
    assert type(error_split) is type(error) or (
        type(error_split) in (HeadTooLarge, RequestLineTooLong)
        and isinstance(error, ClientError)), (error, error_split)
    assert events_split == events, (events, events_split)
    return events, error
