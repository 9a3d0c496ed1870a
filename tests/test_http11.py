"""The no-I/O HTTP/1.1 layer: bytes in, heads, body pieces and exceptions out.

No sockets here. Every rejection docs/hardening.md lists is checked for its exception
class and status (section 6); every parser is fed whole, byte by byte and at random split
points, and must hand back exactly the bytes that follow what it consumed. Whole streams
(pipelined requests, CONNECT and its tunnel bytes, responses with every framing) are generated
by hypothesis and driven through fuzz/http11_streams.py, the fuzz target's drivers and checks.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import pytest
from http11_streams import check, split  # fuzz/, on pytest's pythonpath
from hypothesis import given, settings
from hypothesis import strategies as st

from geproxy.errors import (
    ClientError,
    ConnectionTerminated,
    HeadTooLarge,
    RequestLineTooLong,
    UpstreamError,
)
from geproxy.models import Headers, Request, Response
from geproxy.protocol.http11 import (
    LAST_CHUNK,
    MAX_REQUEST_LINE,
    BodyReader,
    ChunkedReader,
    LengthReader,
    NoBody,
    RequestHeadParser,
    ResponseHeadParser,
    UntilCloseReader,
    encode_chunk,
    request_body_reader,
    response_body_reader,
    serialize_head,
)

pytestmark = [pytest.mark.timeout(10), pytest.mark.pure]

MAX = 64 * 1024
Head = Union[Request, Response]
HeadParser = Union[RequestHeadParser, ResponseHeadParser]

# A fake TLS ClientHello: binary, and holding an empty line a careless parser would stop at.
CLIENT_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + (
    b"\r\n\r\n\x00")


def head(start_line: str, *fields: str) -> bytes:
    """A head on the wire: the start line, ``Name: value`` fields, the empty line."""
    return "".join(f"{line}\r\n" for line in (start_line, *fields)).encode("latin-1") + b"\r\n"


def feed_pieces(parser: HeadParser, pieces: Iterable[bytes]) -> tuple[Optional[Head], bytes]:
    """Feed ``pieces`` until a head is complete: the head and every byte that followed it."""
    pieces = list(pieces)
    for i, piece in enumerate(pieces):
        result = parser.feed(piece)
        if result is not None:
            return result, parser.rest + b"".join(pieces[i + 1 :])
    return None, b""


def parse_request(data: bytes, max_size: int = MAX) -> tuple[Request, bytes]:
    request, rest = feed_pieces(RequestHeadParser(max_size), [data])
    assert isinstance(request, Request), f"head not complete in {data!r}"
    return request, rest


def parse_response(data: bytes, max_size: int = MAX) -> tuple[Response, bytes]:
    response, rest = feed_pieces(ResponseHeadParser(max_size), [data])
    assert isinstance(response, Response), f"head not complete in {data!r}"
    return response, rest


def admit(pieces: Iterable[bytes]) -> tuple[Request, BodyReader]:
    """What the proxy checks before it forwards anything: the head, then the body framing
    (which sees the bytes after the head)."""
    request, rest = feed_pieces(RequestHeadParser(MAX), pieces)
    assert isinstance(request, Request), "head never completed"
    reader = request_body_reader(request)
    reader.feed(rest)
    return request, reader


def receive(pieces: Iterable[bytes], method: str = "GET") -> tuple[Response, BodyReader]:
    """What the proxy checks of an upstream's answer to ``method``: the head, the framing."""
    response, rest = feed_pieces(ResponseHeadParser(MAX), pieces)
    assert isinstance(response, Response), "head never completed"
    reader = response_body_reader(method, response)
    reader.feed(rest)
    return response, reader


def one_byte_pieces(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def decode(reader: BodyReader, pieces: Iterable[bytes]) -> bytes:
    """The payload a body reader yields for ``pieces``."""
    return b"".join(out for piece in pieces for out in reader.feed(piece))


cut_lists = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=24)


# -- request heads: what is accepted ---------------------------------------------------------


def test_absolute_form_get() -> None:
    data = head("GET http://example.com/a/b?q=1&r=%20 HTTP/1.1", "Host: example.com",
                "User-Agent: curl/8.5.0", "Accept: */*")
    request, rest = parse_request(data)
    assert (request.method, request.target, request.version) == (
        "GET", "http://example.com/a/b?q=1&r=%20", "HTTP/1.1")
    assert (request.scheme, request.host, request.port, request.path) == (
        "http", "example.com", 80, "/a/b?q=1&r=%20")
    assert list(request.headers) == [
        ("Host", "example.com"), ("User-Agent", "curl/8.5.0"), ("Accept", "*/*")]
    assert not request.is_connect
    assert rest == b""


@pytest.mark.parametrize(
    "target, host, port, path",
    [
        ("http://example.com", "example.com", 80, "/"),
        ("http://example.com?x=1", "example.com", 80, "/?x=1"),
        ("http://example.com:8080/p", "example.com", 8080, "/p"),
        ("http://example.com:/p", "example.com", 80, "/p"),
        ("http://example.com/p#fragment", "example.com", 80, "/p"),
        ("HTTP://WWW.Example.COM./p", "www.example.com", 80, "/p"),
        ("http://10.0.0.1:81/", "10.0.0.1", 81, "/"),
        ("http://[::1]/x", "::1", 80, "/x"),
        ("http://[2001:DB8::1]:8080/x", "2001:db8::1", 8080, "/x"),
        ("http://under_score.example/", "under_score.example", 80, "/"),
    ],
)
def test_absolute_form_destination(target: str, host: str, port: int, path: str) -> None:
    request, _ = parse_request(head(f"GET {target} HTTP/1.1", "Host: ignored.example"))
    assert (request.scheme, request.host, request.port, request.path) == (
        "http", host, port, path)
    assert request.target == target


@pytest.mark.parametrize(
    "start_line, fields",
    [
        ("GET /healthz HTTP/1.1", ["Host: proxy.example"]),
        ("GET /healthz HTTP/1.0", []),  # HTTP/1.0 needs no Host
        ("OPTIONS * HTTP/1.1", ["Host: proxy.example"]),
    ],
)
def test_origin_form_is_addressed_to_the_proxy(start_line: str, fields: list[str]) -> None:
    request, _ = parse_request(head(start_line, *fields))
    target = start_line.split()[1]
    assert (request.target, request.path) == (target, target)
    assert (request.scheme, request.host, request.port) == ("", "", 0)
    assert request.version == start_line.split()[2]


@pytest.mark.parametrize(
    "target, host, port, authority",
    [
        ("example.com:443", "example.com", 443, "example.com:443"),
        ("[::1]:443", "::1", 443, "[::1]:443"),
        ("1.2.3.4:8443", "1.2.3.4", 8443, "1.2.3.4:8443"),
        ("Example.COM.:65535", "example.com", 65535, "example.com:65535"),
        ("a:1", "a", 1, "a:1"),
    ],
)
def test_connect_keeps_the_bytes_after_the_head(
        target: str, host: str, port: int, authority: str) -> None:
    data = head(f"CONNECT {target} HTTP/1.1", f"Host: {target}") + CLIENT_HELLO
    request, rest = parse_request(data)
    assert request.is_connect
    assert (request.method, request.target, request.host, request.port) == (
        "CONNECT", target, host, port)
    assert (request.scheme, request.path) == ("", "")
    assert request.authority == authority
    assert rest == CLIENT_HELLO


def test_connect_with_an_empty_content_length_is_no_body() -> None:
    request, reader = admit([head("CONNECT a.example:443 HTTP/1.1", "Content-Length: 0")])
    assert request.is_connect and reader.done


@pytest.mark.parametrize(
    "first, second",
    [
        (head("GET http://a.example/1 HTTP/1.1"), head("GET http://a.example/2 HTTP/1.1")),
        (head("HEAD http://a.example/ HTTP/1.1", "Host: a.example"),
         head("CONNECT b.example:443 HTTP/1.1")),
        (head("GET /one HTTP/1.1", "Host: p"), head("GET /two HTTP/1.1", "Host: p")),
    ],
)
def test_pipelined_requests_come_out_one_by_one(first: bytes, second: bytes) -> None:
    request, rest = parse_request(first + second)
    assert rest == second
    assert request.target == first.split(b" ")[1].decode()
    following, rest = parse_request(rest)
    assert following.target == second.split(b" ")[1].decode()
    assert rest == b""


def test_request_body_is_left_for_the_body_reader() -> None:
    body = b"a=1&b=2"
    following = head("GET http://a.example/next HTTP/1.1")
    data = head("POST http://a.example/ HTTP/1.1", f"Content-Length: {len(body)}")
    request, rest = parse_request(data + body + following)
    reader = request_body_reader(request)
    assert decode(reader, [rest]) == body
    assert reader.done and reader.rest == following


@pytest.mark.parametrize("empty_lines", [b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n"])
def test_empty_lines_before_the_request_line_are_skipped(empty_lines: bytes) -> None:
    # RFC 9112 section 2.2: a server SHOULD ignore empty lines before the request line
    # (some clients send CRLF after a POST body). They must not end the head early.
    body = b"hello"
    data = head("POST http://a.example/ HTTP/1.1", "Content-Length: 5") + body
    request, rest = parse_request(empty_lines + data)
    assert request.method == "POST"
    assert rest == body


def test_fields_keep_order_case_repeats_and_latin1_bytes() -> None:
    data = (b"GET http://a.example/ HTTP/1.1\r\nX-Multi: 1\r\nx-multi: 2\r\nX-Empty:\r\n"
            b"X-Tab: a\tb\r\nX-Bytes: caf\xc3\xa9\xff\r\n\r\n")
    request, _ = parse_request(data)
    assert list(request.headers) == [
        ("X-Multi", "1"), ("x-multi", "2"), ("X-Empty", ""), ("X-Tab", "a\tb"),
        ("X-Bytes", "caf\xc3\xa9\xff")]
    assert request.headers.get_all("X-MULTI") == ["1", "2"]
    # latin-1 keeps every byte: the value goes back on the wire unchanged.
    assert request.headers.get("x-bytes").encode("latin-1") == b"caf\xc3\xa9\xff"


def test_request_headers_are_read_only() -> None:
    request, _ = parse_request(head("GET http://a.example/ HTTP/1.1", "X: 1"))
    with pytest.raises(TypeError):
        request.headers.add("X", "2")


def test_started_says_whether_a_head_has_begun() -> None:
    parser = RequestHeadParser(MAX)
    assert not parser.started
    assert parser.feed(b"GET http://a") is None
    assert parser.started


# -- request heads: split anywhere, same result ----------------------------------------------

REQUEST_STREAMS = [
    head("GET http://example.com/a?b=1 HTTP/1.1", "Host: example.com", "Accept: */*"),
    head("CONNECT example.com:443 HTTP/1.1", "Host: example.com:443") + CLIENT_HELLO,
    head("CONNECT [::1]:8443 HTTP/1.0") + b"\x16\x03",
    head("POST http://a.example/ HTTP/1.1", "Content-Length: 3") + b"abc"
    + head("GET http://a.example/2 HTTP/1.1"),
    head("PUT http://a.example/ HTTP/1.1", "Transfer-Encoding: chunked") + b"3\r\nabc\r\n0\r\n\r\n",
    head("GET /healthz HTTP/1.1", "Host: proxy"),
    b"\r\n\r\n" + head("GET http://a.example/ HTTP/1.1"),
]


@pytest.mark.parametrize("data", REQUEST_STREAMS)
def test_requests_fed_one_byte_at_a_time(data: bytes) -> None:
    # Heads, bodies and tunnel bytes alike; generated streams cut at random are further down.
    events, error = check("request", data, range(len(data)))
    assert error is None and events[0][1] == parse_request(data)[0]


# -- request heads: limits -------------------------------------------------------------------


def test_head_of_exactly_max_header_size_is_accepted_one_more_byte_is_not() -> None:
    data = head("GET http://a.example/ HTTP/1.1", "X-Pad: " + "p" * 200)
    assert parse_request(data, max_size=len(data))[0].method == "GET"
    with pytest.raises(HeadTooLarge) as info:
        RequestHeadParser(len(data) - 1).feed(data)
    assert info.value.status == 431


@pytest.mark.parametrize("piece_size", [1, 100, 4096, 1 << 20])
def test_head_over_max_header_size_is_431(piece_size: int) -> None:
    fields = [f"X-Field-{i}: {'v' * 100}" for i in range(100)]
    data = head("GET http://a.example/ HTTP/1.1", *fields)
    with pytest.raises(HeadTooLarge) as info:
        feed_pieces(RequestHeadParser(8 * 1024), split(data, range(0, len(data), piece_size)))
    assert (info.value.status, info.value.error) == (431, "http_request_error")


def test_endless_head_is_refused_before_it_ends() -> None:
    parser = RequestHeadParser(4096)
    parser.feed(b"GET http://a.example/ HTTP/1.1\r\n")
    with pytest.raises(HeadTooLarge):
        for _ in range(100):
            parser.feed(b"X: " + b"v" * 61 + b"\r\n")


def test_body_after_the_head_does_not_count_towards_the_limit() -> None:
    data = head("POST http://a.example/ HTTP/1.1", "Content-Length: 10000")
    request, rest = parse_request(data + b"b" * 10_000, max_size=len(data))
    assert request.method == "POST" and len(rest) == 10_000


@pytest.mark.parametrize("pieces", [1, 7])
def test_request_line_over_8_kib_is_414(pieces: int) -> None:
    prefix = "http://a.example/"
    assert parse_request(head(f"GET {prefix}{'x' * (8192 - len(prefix))} HTTP/1.1"))
    data = head(f"GET {prefix}{'x' * (8193 - len(prefix))} HTTP/1.1")
    with pytest.raises(RequestLineTooLong) as info:
        feed_pieces(RequestHeadParser(MAX), split(data, range(0, len(data), len(data) // pieces)))
    assert info.value.status == 414
    assert isinstance(info.value, ClientError)


# -- request heads and framing: every rejection of docs/hardening.md is a 400 --------------

GET = "GET http://a.example/ HTTP/1.1"
POST = "POST http://a.example/ HTTP/1.1"
CONNECT = "CONNECT a.example:443 HTTP/1.1"


REJECTED_REQUESTS = {
    # framing
    "cl-and-te": head(POST, "Content-Length: 5", "Transfer-Encoding: chunked"),
    "te-and-cl": head(POST, "Transfer-Encoding: chunked", "Content-Length: 5"),
    "cl-differing": head(POST, "Content-Length: 5", "Content-Length: 6"),
    "cl-duplicate": head(POST, "Content-Length: 5", "Content-Length: 5"),
    "cl-list": head(POST, "Content-Length: 5, 5"),
    "cl-letters": head(POST, "Content-Length: abc"),
    "cl-hex": head(POST, "Content-Length: 0x10"),
    "cl-exponent": head(POST, "Content-Length: 1e3"),
    "cl-negative": head(POST, "Content-Length: -1"),
    "cl-plus": head(POST, "Content-Length: +1"),
    "cl-empty": head(POST, "Content-Length: "),
    "cl-inner-space": head(POST, "Content-Length: 1 0"),
    "cl-superscript": head(POST, "Content-Length: \xb2"),
    "cl-huge": head(POST, "Content-Length: 99999999999999999999999"),
    "cl-19-digits": head(POST, "Content-Length: 9999999999999999999"),
    "te-gzip": head(POST, "Transfer-Encoding: gzip"),
    "te-identity": head(POST, "Transfer-Encoding: identity"),
    "te-chunked-identity": head(POST, "Transfer-Encoding: chunked, identity"),
    "te-xchunked": head(POST, "Transfer-Encoding: xchunked"),
    "te-chunked-chunked": head(POST, "Transfer-Encoding: chunked, chunked"),
    "te-duplicated": head(POST, "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
    "te-empty": head(POST, "Transfer-Encoding: "),
    "te-http10": head("POST http://a.example/ HTTP/1.0", "Transfer-Encoding: chunked"),
    # field syntax
    "obs-fold": head(GET, "X-A: one", " two"),
    "obs-fold-tab": head(GET, "X-A: one", "\ttwo"),
    "space-before-colon": head(GET, "Host : a.example"),
    "tab-before-colon": head(GET, "Host\t: a.example"),
    "empty-name": head(GET, ": value"),
    "name-not-token": head(GET, "X(A): value"),
    "name-8bit": head(GET, "X-\xff: value"),
    "bare-cr-in-value": head(GET, "X-A: one\rtwo"),
    "bare-cr-line-end": b"GET http://a.example/ HTTP/1.1\r\nX-A: one\r\r\n\r\n",
    "bare-lf-everywhere": b"GET http://a.example/ HTTP/1.1\nX-A: one\n\n",
    "bare-lf-after-field": b"GET http://a.example/ HTTP/1.1\r\nX-A: one\n\r\n",
    "bare-lf-empty-line": b"GET http://a.example/ HTTP/1.1\r\nX-A: one\r\n\n",
    "nul-in-value": head(GET, "X-A: one\x00two"),
    "nul-in-name": head(GET, "X-\x00A: one"),
    "soh-in-value": head(GET, "X-A: \x01"),
    "esc-in-value": head(GET, "X-A: \x1b[31m"),
    "del-in-value": head(GET, "X-A: \x7f"),
    # request line
    "lowercase-method": head("get http://a.example/ HTTP/1.1"),
    "unknown-method": head("FOO http://a.example/ HTTP/1.1"),
    "http09": head("GET /"),
    "http09-explicit": head("GET / HTTP/0.9", "Host: a.example"),
    "http2": head("GET / HTTP/2.0", "Host: a.example"),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http12": head("GET http://a.example/ HTTP/1.2"),
    "lowercase-http": head("GET http://a.example/ http/1.1"),
    "rtsp": head("GET /x RTSP/1.0", "Host: a.example"),
    "ice": head("SOURCE /x ICE/1.0", "Host: a.example"),
    "space-after-version": head("GET http://a.example/ HTTP/1.1 "),
    "space-in-target": head("GET http://a.example/a b HTTP/1.1"),
    # absolute-form
    "userinfo": head("GET http://user:pass@a.example/ HTTP/1.1"),
    "userinfo-user-only": head("GET http://user@a.example/ HTTP/1.1"),
    "https": head("GET https://a.example/ HTTP/1.1"),
    "ftp": head("GET ftp://a.example/ HTTP/1.1"),
    "empty-host": head("GET http:///x HTTP/1.1"),
    "port-0": head("GET http://a.example:0/ HTTP/1.1"),
    "port-65536": head("GET http://a.example:65536/ HTTP/1.1"),
    "port-letters": head("GET http://a.example:80x/ HTTP/1.1"),
    "bad-ipv6": head("GET http://[::1/ HTTP/1.1"),
    "bad-host": head("GET http://-a.example/ HTTP/1.1"),
    # CONNECT
    "connect-no-port": head("CONNECT a.example HTTP/1.1"),
    "connect-empty-port": head("CONNECT a.example: HTTP/1.1"),
    "connect-port-0": head("CONNECT a.example:0 HTTP/1.1"),
    "connect-port-65536": head("CONNECT a.example:65536 HTTP/1.1"),
    "connect-port-sign": head("CONNECT a.example:+443 HTTP/1.1"),
    "connect-port-long": head("CONNECT a.example:004430 HTTP/1.1"),
    "connect-no-host": head("CONNECT :443 HTTP/1.1"),
    "connect-origin-form": head("CONNECT /a.example:443 HTTP/1.1"),
    "connect-absolute-form": head("CONNECT http://a.example:443 HTTP/1.1"),
    "connect-two-colons": head("CONNECT a.example:443:1 HTTP/1.1"),
    "connect-bare-ipv6": head("CONNECT ::1:443 HTTP/1.1"),
    "connect-bracketed-ipv4": head("CONNECT [1.2.3.4]:443 HTTP/1.1"),
    "connect-double-dot": head("CONNECT a..example:443 HTTP/1.1"),
    "connect-body-length": head(CONNECT, "Content-Length: 5") + b"hello",
    "connect-body-chunked": head(CONNECT, "Transfer-Encoding: chunked"),
    # Host
    "two-hosts": head(GET, "Host: a.example", "Host: b.example"),
    "two-hosts-cased": head("GET /x HTTP/1.1", "Host: a.example", "host: a.example"),
    "origin-form-without-host": head("GET /healthz HTTP/1.1"),
}


@pytest.mark.parametrize("data", REJECTED_REQUESTS.values(), ids=REJECTED_REQUESTS.keys())
def test_rejected_request_is_400(data: bytes) -> None:
    for pieces in ([data], one_byte_pieces(data)):
        with pytest.raises(ClientError) as info:
            admit(pieces)
        assert (info.value.status, info.value.error) == (400, "http_request_error")
        assert info.value.close and info.value.client_fault


@pytest.mark.parametrize("max_size", [MAX, 64])
def test_http09_request_is_400_in_any_pieces(max_size: int) -> None:
    # Found by the fuzzer. llhttp ends an HTTP/0.9 head (a request line with no version) at
    # a bare LF and the empty line after it, so the head holds no CRLF CRLF. The parser looked
    # for one before it checked the version: finding none, or one in the next request past
    # the limit, it answered 431 where whole streams under the limit got 400.
    data = b"GET http://a.example/\n\r\n" + head("GET /x HTTP/1.1", "X-Pad: " + "p" * 64)
    for pieces in ([data], [data[:24], data[24:]], one_byte_pieces(data)):
        with pytest.raises(ClientError) as info:
            feed_pieces(RequestHeadParser(max_size), pieces)
        assert info.value.status == 400, pieces


@pytest.mark.parametrize("line", [b"PRI * HTTP/2.0\r\n", b"GET http://a.example/ HTTP/2.0\r\nHo",
                                  b"\r\nPRI * HTTP/2.0\r\n"])
def test_an_unknown_version_is_refused_at_its_start_line(line: bytes) -> None:
    """No end of head is waited for once the start line names a version other than 1.0 or
    1.1: a cut HTTP/2 preface is answered at once, not at header_timeout."""
    with pytest.raises(ClientError) as info:
        RequestHeadParser(MAX).feed(line)
    assert info.value.status == 400
    assert "unsupported HTTP version" in info.value.detail


def test_a_start_line_not_yet_whole_is_waited_for() -> None:
    parser = RequestHeadParser(MAX)
    assert parser.feed(b"GET http://a.example/ HTT") is None
    assert parser.feed(b"P/1.1\r\nHost: a.exa") is None
    request = parser.feed(b"mple\r\n\r\n")
    assert request is not None and request.version == "HTTP/1.1"


# -- response heads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, status, version, headers",
    [
        (head("HTTP/1.1 200 OK", "Content-Type: text/plain", "Content-Length: 2") + b"hi",
         200, "HTTP/1.1", [("Content-Type", "text/plain"), ("Content-Length", "2")]),
        (head("HTTP/1.1 204"), 204, "HTTP/1.1", []),
        (head("HTTP/1.0 404 Not Found", "Server: x", "server: y"), 404, "HTTP/1.0",
         [("Server", "x"), ("server", "y")]),
        (head("HTTP/1.1 599 Odd Status"), 599, "HTTP/1.1", []),
    ],
)
def test_response_status_and_headers(
        data: bytes, status: int, version: str, headers: list[tuple[str, str]]) -> None:
    response, rest = parse_response(data)
    assert (response.status, response.version, list(response.headers)) == (
        status, version, headers)
    assert rest == data[data.index(b"\r\n\r\n") + 4 :]
    response.headers.add("Via", "1.1 geproxy")  # on_response plugins may edit these
    assert response.headers.get("via") == "1.1 geproxy"


@pytest.mark.parametrize("interim", [
    head("HTTP/1.1 100 Continue"),
    head("HTTP/1.1 103 Early Hints", "Link: </s.css>; rel=preload"),
    head("HTTP/1.1 100 Continue") + head("HTTP/1.1 102 Processing"),
])
def test_interim_responses_then_the_final_one_from_one_buffer(interim: bytes) -> None:
    final = head("HTTP/1.1 200 OK", "Content-Length: 4") + b"body"
    statuses, rest = [], interim + final
    while not statuses or statuses[-1] < 200:
        response, rest = parse_response(rest)
        statuses.append(response.status)
        if response.status < 200:
            assert isinstance(response_body_reader("GET", response), NoBody)
    assert statuses[-1] == 200 and len(statuses) == interim.count(b"HTTP/1.1") + 1
    reader = response_body_reader("GET", response)
    assert decode(reader, [rest]) == b"body" and reader.done and reader.rest == b""


def test_switching_protocols_keeps_the_bytes_after_the_head() -> None:
    frame = b"\x81\x05hello"
    response, rest = parse_response(
        head("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade")
        + frame)
    assert response.status == 101 and rest == frame


RESPONSE_STREAMS = [
    head("HTTP/1.1 200 OK", "Content-Length: 5") + b"hello",
    head("HTTP/1.1 100 Continue") + head("HTTP/1.1 200 OK"),
    b"\r\n" + head("HTTP/1.1 304 Not Modified", "ETag: \"x\""),
]


@pytest.mark.parametrize("data", RESPONSE_STREAMS)
def test_responses_fed_one_byte_at_a_time(data: bytes) -> None:
    events, error = check("response", data, range(len(data)))
    assert error is None and events[0][1] == parse_response(data)[0]


REJECTED_RESPONSES = {
    "http2": head("HTTP/2.0 200 OK"),
    "http09": head("HTTP/0.9 200 OK"),
    "http12": head("HTTP/1.2 200 OK"),
    "lowercase-http": head("http/1.1 200 OK"),
    "rtsp": head("RTSP/1.0 200 OK"),
    "ice": head("ICE/1.0 200 OK"),
    "request-line": head("GET / HTTP/1.1"),
    "status-2-digits": head("HTTP/1.1 20 OK"),
    "status-99": head("HTTP/1.1 099 OK"),
    "status-4-digits": head("HTTP/1.1 1000 OK"),
    "status-letters": head("HTTP/1.1 abc OK"),
    "cl-and-te": head("HTTP/1.1 200 OK", "Content-Length: 1", "Transfer-Encoding: chunked"),
    "cl-differing": head("HTTP/1.1 200 OK", "Content-Length: 1", "Content-Length: 2"),
    "cl-letters": head("HTTP/1.1 200 OK", "Content-Length: x"),
    "te-gzip": head("HTTP/1.1 200 OK", "Transfer-Encoding: gzip"),
    "te-xchunked": head("HTTP/1.1 200 OK", "Transfer-Encoding: xchunked"),
    "te-http10": head("HTTP/1.0 200 OK", "Transfer-Encoding: chunked"),
    "obs-fold": head("HTTP/1.1 200 OK", "X-A: one", " two"),
    "space-before-colon": head("HTTP/1.1 200 OK", "X-A : one"),
    "bare-lf": b"HTTP/1.1 200 OK\nX-A: one\n\n",
    "bare-cr": head("HTTP/1.1 200 OK", "X-A: one\rtwo"),
    "nul": head("HTTP/1.1 200 OK", "X-A: one\x00"),
}


@pytest.mark.parametrize("data", REJECTED_RESPONSES.values(), ids=REJECTED_RESPONSES.keys())
def test_rejected_response_is_502(data: bytes) -> None:
    for pieces in ([data], one_byte_pieces(data)):
        with pytest.raises(UpstreamError) as info:
            receive(pieces)
        assert (info.value.status, info.value.error) == (502, "http_response_incomplete")


@pytest.mark.parametrize("piece_size", [1, 1 << 20])
def test_response_head_over_the_limit_is_502(piece_size: int) -> None:
    data = head("HTTP/1.1 200 OK", "X-Big: " + "v" * 5000)
    with pytest.raises(UpstreamError) as info:
        feed_pieces(ResponseHeadParser(4096), split(data, range(0, len(data), piece_size)))
    assert info.value.status == 502


# -- choosing a body reader ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, kind, length",
    [
        ([], NoBody, None),
        (["Content-Length: 0"], LengthReader, 0),
        (["Content-Length: 42"], LengthReader, 42),
        (["Content-Length:  7 "], LengthReader, 7),
        (["Transfer-Encoding: chunked"], ChunkedReader, None),
        (["Transfer-Encoding: Chunked"], ChunkedReader, None),
    ],
)
def test_request_framing(fields: list[str], kind: type, length: Optional[int]) -> None:
    _, reader = admit([head(POST, *fields)])
    assert type(reader) is kind and reader.delimited
    if length is not None:
        assert reader.remaining == length and reader.done == (length == 0)


@pytest.mark.parametrize(
    "method, status, fields, kind",
    [
        ("GET", 200, ["Content-Length: 10"], LengthReader),
        ("GET", 200, ["Transfer-Encoding: chunked"], ChunkedReader),
        ("GET", 200, [], UntilCloseReader),
        ("POST", 404, [], UntilCloseReader),
        ("HEAD", 200, ["Content-Length: 10"], NoBody),
        ("HEAD", 200, ["Transfer-Encoding: chunked"], NoBody),
        ("HEAD", 200, [], NoBody),
        ("GET", 204, ["Content-Length: 10"], NoBody),
        ("GET", 304, ["Content-Length: 10"], NoBody),
        ("GET", 304, ["Transfer-Encoding: chunked"], NoBody),
        ("GET", 100, [], NoBody),
        ("GET", 101, [], NoBody),
        ("GET", 103, ["Content-Length: 10"], NoBody),
    ],
)
def test_response_framing(method: str, status: int, fields: list[str], kind: type) -> None:
    _, reader = receive([head(f"HTTP/1.1 {status} Whatever", *fields)], method)
    assert type(reader) is kind
    assert reader.delimited == (kind is not UntilCloseReader)


def test_no_body_passes_everything_on() -> None:
    reader = NoBody(b"next")
    assert reader.done
    assert reader.feed(b" request") == [] and reader.rest == b"next request"
    reader.eof()  # a body that is complete may see the connection close


def test_until_close_reader_ends_only_at_eof() -> None:
    reader = UntilCloseReader()
    assert decode(reader, [b"a", b"bc"]) == b"abc" and not reader.done
    reader.eof()
    assert reader.done and reader.rest == b""


def test_bad_chunks_are_the_upstreams_fault_in_a_response() -> None:
    with pytest.raises(UpstreamError):
        receive([head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"zz\r\n"])


# -- LengthReader ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, pieces, body, rest",
    [
        (5, [b"hello"], b"hello", b""),
        (5, [b"hel", b"lo"], b"hello", b""),
        (5, [b"helloGET /"], b"hello", b"GET /"),
        (5, [b"he", b"lloGE", b"T /"], b"hello", b"GET /"),
        (0, [b"GET /"], b"", b"GET /"),
        (3, [b"", b"abc", b"", b"d"], b"abc", b"d"),
    ],
)
def test_length_reader(length: int, pieces: list[bytes], body: bytes, rest: bytes) -> None:
    reader = LengthReader(length)
    assert decode(reader, pieces) == body
    assert reader.done and reader.rest == rest and reader.remaining == 0


def test_length_reader_short_body_is_an_error_at_eof() -> None:
    reader = LengthReader(10)
    assert decode(reader, [b"12345"]) == b"12345"
    assert not reader.done and reader.remaining == 5
    with pytest.raises(ConnectionTerminated) as info:
        reader.eof()
    assert info.value.status == 502


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=64), after=st.binary(max_size=16), cuts=cut_lists)
def test_length_reader_split_anywhere(body: bytes, after: bytes, cuts: list[int]) -> None:
    reader = LengthReader(len(body))
    assert decode(reader, split(body + after, cuts)) == body
    assert reader.done and reader.rest == after


# -- ChunkedReader ---------------------------------------------------------------------------

CHUNKED_BODIES = {
    # name: (wire, payload, rest)
    "one-chunk": (b"3\r\nabc\r\n0\r\n\r\n", b"abc", b""),
    "upper-hex": (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", b""),
    "two-chunks": (b"a\r\n0123456789\r\n1\r\n!\r\n0\r\n\r\n", b"0123456789!", b""),
    "extensions": (b"3;name=value\r\nabc\r\n0;last\r\n\r\n", b"abc", b""),
    "quoted-extension": (b"3 ; a = \"quoted ; value\" ;b\r\nabc\r\n0\r\n\r\n", b"abc", b""),
    "trailers-dropped": (b"3\r\nabc\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n", b"abc", b""),
    "crlf-as-data": (b"2\r\n\r\n\r\n0000\r\n\r\n", b"\r\n", b""),
    "empty": (b"0\r\n\r\n", b"", b""),
    "16-hex-digits": (b"0000000000000001\r\nx\r\n0\r\n\r\n", b"x", b""),
    "next-request": (b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n", b"abc",
                     b"GET / HTTP/1.1\r\n\r\n"),
    "next-body": (b"1\r\nx\r\n0\r\nT: v\r\n\r\n0\r\n\r\n", b"x", b"0\r\n\r\n"),
}


@pytest.mark.parametrize("wire, payload, rest", CHUNKED_BODIES.values(),
                         ids=CHUNKED_BODIES.keys())
def test_chunked_decoding_split_at_every_byte_boundary(
        wire: bytes, payload: bytes, rest: bytes) -> None:
    splits = [[wire[:cut], wire[cut:]] for cut in range(1, len(wire))]
    for pieces in [[wire], one_byte_pieces(wire), *splits]:
        reader = ChunkedReader()
        assert decode(reader, pieces) == payload, pieces
        assert reader.done and reader.rest == rest, pieces


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
       after=st.binary(max_size=16), cuts=cut_lists)
def test_chunked_round_trip_split_anywhere(
        chunks: list[bytes], after: bytes, cuts: list[int]) -> None:
    wire = b"".join(encode_chunk(c) for c in chunks) + LAST_CHUNK + after
    reader = ChunkedReader()
    assert decode(reader, split(wire, cuts)) == b"".join(chunks)
    assert reader.done and reader.rest == after


def test_chunked_keeps_bytes_fed_after_the_end() -> None:
    reader = ChunkedReader()
    decode(reader, [b"0\r\n\r\nGET"])
    assert reader.feed(b" /") == [] and reader.rest == b"GET /"


def test_chunked_cut_short_is_an_error_at_eof() -> None:
    reader = ChunkedReader()
    assert decode(reader, [b"5\r\nab"]) == b"ab" and not reader.done
    with pytest.raises(ConnectionTerminated):
        reader.eof()


BAD_CHUNKED = {
    "empty-size": b"\r\n",
    "not-hex": b"g\r\nx\r\n",
    "hex-garbage-after": b"1x\r\nx\r\n",
    "0x-prefix": b"0x1\r\nx\r\n",
    "negative": b"-1\r\nx\r\n",
    "plus": b"+1\r\nx\r\n",
    "space-before-size": b" 1\r\nx\r\n",
    "space-after-size": b"1 \r\nx\r\n",
    "overflow-17-digits": b"10000000000000000\r\n",
    "overflow-17-zeros": b"00000000000000001\r\nx\r\n",
    "overflow-huge": b"f" * 40 + b"\r\n",
    "empty-extension": b"1;\r\nx\r\n",
    "extension-no-value": b"1;a=\r\nx\r\n",
    "extension-open-quote": b"1;a=\"b\r\nx\r\n",
    "nul-in-size-line": b"1\x00\r\nx\r\n",
    "data-too-long": b"1\r\nxy\r\n0\r\n\r\n",
    "data-too-short": b"3\r\nab\r\n0\r\n\r\n",
    "no-crlf-after-data": b"1\r\nx0\r\n\r\n",
    "junk-instead-of-crlf": b"1\r\nxAB0\r\n\r\n",
    "lf-after-data": b"1\r\nx\n0\r\n\r\n",
    "bare-lf-size-line": b"1\nx\r\n0\r\n\r\n",
    "bare-lf-last-chunk": b"1\r\nx\r\n0\n\r\n",
    "bare-lf-end": b"1\r\nx\r\n0\r\n\n",
    "bare-cr-size-line": b"1\rx\r\n",
    "bare-cr-trailer": b"0\r\nT: a\rb\r\n\r\n",
    "bare-lf-trailer": b"0\r\nT: a\nb\r\n\r\n",
    "trailer-no-colon": b"0\r\nbad trailer\r\n\r\n",
    "trailer-obs-fold": b"0\r\n T: v\r\n\r\n",
    "trailer-space-before-colon": b"0\r\nT : v\r\n\r\n",
    "trailer-empty-name": b"0\r\n: v\r\n\r\n",
    "size-line-endless": b"1" * 5000,
    "extension-endless": b"1;" + b"a" * 5000,
}


@pytest.mark.parametrize("wire", BAD_CHUNKED.values(), ids=BAD_CHUNKED.keys())
def test_bad_chunked_framing_is_refused(wire: bytes) -> None:
    for pieces in ([wire], one_byte_pieces(wire)):
        with pytest.raises(ClientError) as info:
            decode(ChunkedReader(), pieces)
        assert info.value.status == 400


@pytest.mark.parametrize("length, accepted", [(4095, True), (4096, False), (100_000, False)])
def test_chunk_size_line_limit_whole_or_in_pieces(length: int, accepted: bool) -> None:
    wire = b"1;" + b"e" * (length - 2) + b"\r\nx\r\n" + LAST_CHUNK
    for pieces in ([wire], one_byte_pieces(wire)):
        reader = ChunkedReader()
        if accepted:
            assert decode(reader, pieces) == b"x" and reader.done
        else:
            with pytest.raises(ClientError):
                decode(reader, pieces)


def test_trailers_over_their_limit_are_refused() -> None:
    reader = ChunkedReader(max_trailers=100)
    with pytest.raises(ClientError):
        decode(reader, [b"0\r\n" + b"".join(b"T%d: %s\r\n" % (i, b"v" * 20) for i in range(10))])


# -- serialising -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    [("Host", "a.example"), ("X-Empty", ""), ("X-Bytes", "caf\xe9")],
    Headers([("Host", "a.example"), ("X-Empty", ""), ("X-Bytes", "caf\xe9")]),
])
def test_serialize_head(fields: Union[Headers, list[tuple[str, str]]]) -> None:
    data = serialize_head("GET /p HTTP/1.1", fields)
    assert data == b"GET /p HTTP/1.1\r\nHost: a.example\r\nX-Empty: \r\nX-Bytes: caf\xe9\r\n\r\n"
    request, rest = parse_request(data)
    assert list(request.headers) == list(fields) and rest == b""


def test_serialize_head_without_fields() -> None:
    assert serialize_head("HTTP/1.1 200 Connection Established", []) == (
        b"HTTP/1.1 200 Connection Established\r\n\r\n")


@pytest.mark.parametrize("name, value", [
    ("X-A", "one\r\nX-Injected: yes"),
    ("X-A", "one\nX-Injected: yes"),
    ("X-A", "one\rtwo"),
    ("X-A", "\r\n\r\nGET /smuggled HTTP/1.1"),
    ("X-A\r\nX-Injected", "yes"),
    ("X-A\n", "yes"),
    ("X-A: b", "c"),
])
def test_serialize_head_refuses_injection(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        serialize_head("GET / HTTP/1.1", [("Host", "a.example"), (name, value)])


@pytest.mark.parametrize("data, wire", [
    (b"abc", b"3\r\nabc\r\n"),
    (b"\r\n", b"2\r\n\r\n\r\n"),
    (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
    (b"y" * 4096, b"1000\r\n" + b"y" * 4096 + b"\r\n"),
])
def test_encode_chunk(data: bytes, wire: bytes) -> None:
    assert encode_chunk(data) == wire
    reader = ChunkedReader()
    assert decode(reader, [wire + LAST_CHUNK]) == data and reader.done


# -- whole streams: generated messages, cut anywhere -----------------------------------------
#
# The strategies below build valid streams from their parts (methods, targets, fields drawn
# from the token and field-value alphabets, bodies of any size and framing) together with the
# events they must give. http11_streams.check feeds each whole and cut at random points,
# asserts the same events (or error) both ways and the framing invariants; here the events
# must also be the ones the stream was built from.

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# VCHAR and obs-text; SP and HTAB only inside a value (llhttp keeps trailing whitespace).
VALUE_CHARS = "".join(map(chr, [*range(0x21, 0x7F), *range(0x80, 0x100)]))
# Fields that change a message's framing, or that a valid request has at most once.
FRAMING_FIELDS = {"content-length", "transfer-encoding", "host", "connection",
                  "proxy-connection", "upgrade", "te", "trailer"}
# Methods llhttp knows (it refuses others), CONNECT apart.
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "PROPFIND",
           "MKCOL", "COPY", "MOVE", "LOCK", "SEARCH", "REPORT", "PURGE", "M-SEARCH"]


def text(alphabet: str, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings over ``alphabet``, drawn as bytes: much cheaper than st.text, which draws (and
    shrinks) one character at a time."""
    return st.binary(min_size=min_size, max_size=max_size).map(
        lambda b: "".join(alphabet[byte % len(alphabet)] for byte in b))


tokens = text(TCHAR, min_size=1)
field_values = text(VALUE_CHARS + " \t", max_size=20).map(lambda v: v.strip(" \t"))
ows = st.sampled_from(["", " ", "\t", "  "])
fields = st.lists(st.tuples(tokens.filter(lambda n: n.lower() not in FRAMING_FIELDS),
                            field_values), max_size=3)
labels = text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=6).map(
    lambda label: label.strip("-") or "x")
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=2).map(".".join).map(lambda h: h + ".example"),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"))
ports = st.integers(1, 65535)
path_chars = "".join(sorted(set(TCHAR) | set("/:@;=,()!$&'*+~") - {"^", "`", "|"}))
paths = text(path_chars, max_size=20).map(lambda p: "/" + p)
queries = st.one_of(st.just(""), text(path_chars + "?").map(lambda q: "?" + q))
quoted = text(" !#$%&'()*+,-./:;<=>?@[]^_`{|}~" + TCHAR, max_size=8).map(
    lambda s: f'"{s}"')
chunk_extensions = st.lists(st.tuples(
    ows, tokens, st.one_of(st.just(""), st.tuples(ows, st.one_of(tokens, quoted)).map(
        lambda eq: f"{eq[0]}={eq[0]}{eq[1]}"))).map(lambda e: f"{e[0]};{e[0]}{e[1]}{e[2]}"),
    max_size=1).map("".join)


def wire_head(start_line: str, fields: list[tuple[str, str]], spaces: list[str]) -> bytes:
    """A head with the given whitespace after each colon (none before it)."""
    lines = [start_line] + [f"{n}:{s}{v}" for (n, v), s in zip(fields, spaces, strict=False)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A chunked body (with extensions and trailers) on the wire, and its payload."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=3))
    wire = b""
    for chunk in [*chunks, b""]:  # sizes in either case, some with leading zeros
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(chunk)
        wire += (size + draw(chunk_extensions)).encode("latin-1") + b"\r\n"
        wire += chunk + b"\r\n" if chunk else b""
    trailers = draw(st.lists(st.tuples(tokens, field_values), max_size=2))
    wire += b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in trailers)
    return wire + b"\r\n", b"".join(chunks)


@st.composite
def bodies(draw: st.DrawFn, kinds: list[str], version: str,
           ) -> tuple[list[tuple[str, str]], bytes, bytes]:
    """Framing fields, the body on the wire and its payload, of one of ``kinds``: none, a
    Content-Length, chunked (not in HTTP/1.0), or delimited by the end of the stream."""
    kind = draw(st.sampled_from([k for k in kinds if k != "chunked" or version != "HTTP/1.0"]))
    if kind == "length":
        payload = draw(st.binary(max_size=64))
        length = draw(st.sampled_from(["%d", "%03d"])) % len(payload)
        return [("Content-Length", length)], payload, payload
    if kind == "chunked":
        wire, payload = draw(chunked_bodies())
        return [("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked"])))], (
            wire), payload
    if kind == "close":
        payload = draw(st.binary(max_size=64))
        return [], payload, payload
    return [], b"", b""


def mixed(draw: st.DrawFn, own: list[tuple[str, str]], framing: list[tuple[str, str]],
          ) -> list[tuple[str, str]]:
    """``own`` fields and the framing ones, the framing ones at random places."""
    out = list(own)
    for field in framing:
        out.insert(draw(st.integers(0, len(out))), field)
    return out


@st.composite
def request_messages(draw: st.DrawFn, last: bool) -> tuple[bytes, list]:
    """One request (a CONNECT only as the ``last``) on the wire and the events it gives."""
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    form = draw(st.sampled_from(["absolute", "origin", "asterisk"] + ["connect"] * last))
    method = "CONNECT" if form == "connect" else (
        "OPTIONS" if form == "asterisk" else draw(st.sampled_from(METHODS)))
    own = draw(fields)
    if form == "connect":
        target = f"{draw(hosts)}:{draw(ports)}"
        framing, body, payload = [], b"", b""
    else:
        if form == "absolute":
            port = draw(st.one_of(st.just(""), ports.map(lambda p: f":{p}")))
            target = f"{draw(st.sampled_from(['http', 'HTTP']))}://{draw(hosts)}{port}"
            target += draw(paths) + draw(queries)
        else:
            target = draw(paths) + draw(queries) if form == "origin" else "*"
            own = mixed(draw, own, [("Host", draw(hosts))])
        framing, body, payload = draw(bodies(["none", "length", "chunked"], version))
        if body and draw(st.booleans()):
            framing.append(("Expect", "100-continue"))
    headers = mixed(draw, own, framing)
    leading = b"\r\n" * draw(st.integers(0, 2))
    wire = leading + wire_head(f"{method} {target} {version}", headers,
                               draw(st.lists(ows, min_size=len(headers),
                                             max_size=len(headers))))
    events = [("head", (method, target, version, headers), len(wire), method)]
    if form == "connect":
        tunnel = draw(st.binary(max_size=64))
        return wire + tunnel, events + [("tunnel", tunnel)] * bool(tunnel)
    return wire + body, events + [("data", payload)] * bool(payload) + [("end",)]


@st.composite
def response_messages(draw: st.DrawFn, last: bool) -> tuple[bytes, str, list]:
    """One response on the wire, the method of the request it answers ("" for an interim
    one) and the events it gives. A 101, a CONNECT's 2xx or a close-delimited body comes
    only ``last``."""
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    kinds = ["interim", "final", "head", "no-content"] + ["switch", "connect"] * last
    kind = draw(st.sampled_from(kinds))
    method = {"interim": "", "head": "HEAD", "connect": "CONNECT"}.get(kind)
    if method is None:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    status = {"interim": st.sampled_from([100, 102, 103]), "switch": st.just(101),
              "no-content": st.sampled_from([204, 304]), "connect": st.integers(200, 299),
              }.get(kind, st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    status_code = draw(status)
    framing: list[tuple[str, str]]
    if kind == "final":
        # Without a Content-Length or chunked framing a response's body ends with the stream.
        framing, body, payload = draw(bodies(["length", "chunked"] + ["close"] * last, version))
    else:
        # A HEAD, 204 or 304 response may describe the body it does not have.
        framing = draw(st.sampled_from([[], [("Content-Length", "42")],
                                        [("Transfer-Encoding", "chunked")]]))
        body = payload = b""
    headers = mixed(draw, draw(fields), framing)
    reason = draw(text(VALUE_CHARS + " \t").map(lambda r: " " + r if r else ""))
    leading = b"\r\n" * draw(st.integers(0, 1))
    wire = leading + wire_head(f"{version} {status_code}{reason}", headers,
                               draw(st.lists(ows, min_size=len(headers),
                                             max_size=len(headers))))
    events = [("head", (status_code, version, headers), len(wire), method)]
    if kind in ("switch", "connect"):
        tunnel = draw(st.binary(max_size=64))
        return wire + tunnel, method, events + [("tunnel", tunnel)] * bool(tunnel)
    return wire + body, method, events + [("data", payload)] * bool(payload) + [("end",)]


@st.composite
def request_streams(draw: st.DrawFn) -> tuple[bytes, list]:
    """Pipelined requests, perhaps ending in a CONNECT and the tunnel's first bytes."""
    count = draw(st.integers(1, 3))
    messages = [draw(request_messages(last=i == count - 1)) for i in range(count)]
    return b"".join(m[0] for m in messages), [e for m in messages for e in m[1]]


@st.composite
def response_streams(draw: st.DrawFn) -> tuple[bytes, list[str], list]:
    """Responses to pipelined requests, 1xx among them, perhaps ending in a tunnel or a
    close-delimited body."""
    count = draw(st.integers(1, 4))
    messages = [draw(response_messages(last=i == count - 1)) for i in range(count)]
    return (b"".join(m[0] for m in messages), [m[1] for m in messages if m[1]],
            [e for m in messages for e in m[2]])


def summary(events: list) -> list:
    """Events with each head reduced to what the stream was built from."""
    out = []
    for event in events:
        if event[0] == "head":
            head = event[1]
            key = (head.method, head.target, head.version, list(head.headers)) if isinstance(
                head, Request) else (head.status, head.version, list(head.headers))
            event = ("head", key, *event[2:])
        out.append(event)
    return out


pieces_cuts = st.one_of(cut_lists, st.just(range(1 << 12)))  # random cuts, or every byte


@settings(max_examples=200, deadline=None)
@given(stream=request_streams(), cuts=pieces_cuts)
def test_generated_requests_give_their_events_however_cut(
        stream: tuple[bytes, list], cuts: Iterable[int]) -> None:
    wire, expected = stream
    events, error = check("request", wire, list(cuts))
    assert error is None and summary(events) == expected


@settings(max_examples=200, deadline=None)
@given(stream=response_streams(), cuts=pieces_cuts)
def test_generated_responses_give_their_events_however_cut(
        stream: tuple[bytes, list[str], list], cuts: Iterable[int]) -> None:
    wire, methods, expected = stream
    events, error = check("response", wire, list(cuts), methods)
    assert error is None and summary(events) == expected


# -- anything at all -------------------------------------------------------------------------

@st.composite
def mangled(draw: st.DrawFn, streams: st.SearchStrategy[tuple]) -> bytes:
    """A valid stream with a few bytes replaced, inserted or cut: near misses find more bugs
    than noise does."""
    data = bytearray(draw(streams)[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        data[at : at + draw(st.integers(0, 2))] = draw(st.binary(max_size=3))
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), cuts=cut_lists, max_size=st.sampled_from([64, 1024, MAX]),
       max_line=st.sampled_from([32, MAX_REQUEST_LINE]),
       methods=st.lists(st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]), max_size=3))
@pytest.mark.parametrize("side, streams", [
    ("request", request_streams()),
    ("response", response_streams()),
])
def test_any_bytes_raise_only_documented_errors(
        side: str, streams: st.SearchStrategy[tuple], data: st.DataObject, cuts: list[int],
        max_size: int, max_line: int, methods: list[str]) -> None:
    # check() lets through only the errors http11's docstring documents for the side, and
    # asserts that the stream cut at ``cuts`` ends the same way as whole, with sound events.
    wire = data.draw(st.one_of(st.binary(max_size=300), mangled(streams)))
    check(side, wire, cuts, methods, max_size, max_line)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cuts=cut_lists)
def test_any_bytes_in_a_chunked_body_raise_only_client_errors(data: bytes, cuts: list[int]) -> None:
    try:
        decode(ChunkedReader(), split(data, cuts))
    except ClientError as exc:
        assert exc.status == 400, repr(exc)
