"""The answers the proxy makes itself (docs/configuration.md, "Answers the proxy makes
itself"): status, Proxy-Status, close.

Each case sends raw bytes, checks the answer and whether the connection was closed, and then
checks that the proxy still serves a good request: nothing else is disturbed.
"""

from __future__ import annotations

import socket

import gevent
import pytest

from geproxy import Denied, Response, hookimpl
from geproxy.testing import (
    curl,
    echo,
    exchange,
    head_field,
    open_tunnel,
    recv_all,
    wait_for_records,
)


def _answer_and_state(address, data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Send ``data``; return the first answer and whether the proxy then closed."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                return answer, True
            answer += piece
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head_field(head, b"content-length") or 0)
        while len(body) < length:
            body += sock.recv(65536)
        # An answer that keeps the connection open is followed by silence, not EOF.
        sock.settimeout(0.3)
        try:
            closed = sock.recv(1) == b""
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        return head + b"\r\n\r\n" + body, closed
    finally:
        sock.close()



HEALTHZ_CLOSE = b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"


def _still_serves(proxy, origin) -> None:
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr


BAD_REQUESTS = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "lowercase method": b"get http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "no version": b"GET http://127.0.0.1:{port}/\r\n\r\n",
    "CL and TE": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "two lengths": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Content-Length: 6\r\n\r\nhello!"),
    "TE not chunked": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: gzip\r\n\r\n"),
    "obs-fold": b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    "space before colon": b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost : x\r\n\r\n",
    "bare LF": b"GET http://127.0.0.1:{port}/ HTTP/1.1\nHost: x\n\n",
    "NUL": b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "bad chunk size": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"),
    "CONNECT without port": b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",
    "CONNECT port 0": b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n",
    "CONNECT port 65536": b"CONNECT 127.0.0.1:65536 HTTP/1.1\r\n\r\n",
    "CONNECT bad host": b"CONNECT exa_mple..com:443 HTTP/1.1\r\n\r\n",
    "userinfo": b"GET http://user:pw@127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "https absolute-form": b"GET https://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_requests_get_400_and_close(proxy, origin, case):
    data = BAD_REQUESTS[case].replace(b"{port}", str(origin.port).encode())
    answer, closed = _answer_and_state(proxy.address, data)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert head_field(answer, b"proxy-status") == b"geproxy; error=http_request_error"
    assert head_field(answer, b"connection") == b"close"
    assert closed
    if case not in ("bad chunk size",):
        assert origin.seen == []  # nothing reached the origin
    _still_serves(proxy, origin)


def test_head_over_max_header_size_is_431(proxy_factory, origin):
    proxy = proxy_factory("max_header_size = 4KiB\n")
    data = (f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n".encode()
            + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(50)) + b"\r\n")
    answer, closed = _answer_and_state(proxy.address, data)
    assert answer.startswith(b"HTTP/1.1 431 ") and closed
    assert head_field(answer, b"proxy-status") == b"geproxy; error=http_request_error"
    _still_serves(proxy, origin)


def test_request_line_over_8kib_is_414(proxy, origin):
    data = (f"GET http://127.0.0.1:{origin.port}/".encode() + b"a" * 9000
            + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    answer, closed = _answer_and_state(proxy.address, data)
    assert answer.startswith(b"HTTP/1.1 414 ") and closed
    _still_serves(proxy, origin)


def test_slow_head_is_cut_at_header_timeout(proxy_factory, origin):
    proxy = proxy_factory("header_timeout = 300ms\n")
    sock = proxy.connect()
    try:
        sock.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\n")
        sock.settimeout(10)
        answer = b""
        for _ in range(10):  # one byte every 100 ms: slowloris
            try:
                sock.sendall(b"X")
            except OSError:
                break
            gevent.sleep(0.1)
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            answer += piece
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert head_field(answer, b"connection") == b"close"
    _still_serves(proxy, origin)


def test_silent_connection_is_closed_quietly_at_header_timeout(proxy_factory):
    proxy = proxy_factory("header_timeout = 200ms\n")
    sock = proxy.connect()
    try:
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed, and nothing was said
    finally:
        sock.close()


def test_connection_refused_is_502(proxy, origin):
    closed_port = _unused_port()
    answer, closed = _answer_and_state(
        proxy.address, f"GET http://127.0.0.1:{closed_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert head_field(answer, b"proxy-status") == b"geproxy; error=connection_refused"
    assert not closed  # the framing is sound: the client may go on
    assert answer.endswith(b"502 Bad Gateway\n")  # no internal detail in the body
    _still_serves(proxy, origin)


def test_connect_refused_is_502_and_no_200_first(proxy):
    answer, _ = _answer_and_state(
        proxy.address, f"CONNECT 127.0.0.1:{_unused_port()} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"200" not in answer.split(b"\r\n")[0]


def test_unknown_name_is_502_dns_error(proxy, origin):
    for data in (b"CONNECT nowhere.test:443 HTTP/1.1\r\n\r\n",
                 b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n"):
        answer, closed = _answer_and_state(proxy.address, data)
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert head_field(answer, b"proxy-status") == b'geproxy; error=dns_error; rcode="NXDOMAIN"'
    assert proxy.resolver.queries["nowhere.test"] == 2
    _still_serves(proxy, origin)


def test_too_many_connections_is_503(proxy_factory, origin):
    proxy = proxy_factory("max_connections = 2\n")
    holders = [proxy.connect() for _ in range(2)]
    try:
        for holder in holders:  # make sure both are accepted and being served
            holder.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
            assert holder.recv(1000).startswith(b"HTTP/1.1 200 ")
        answer = exchange(proxy.address, HEALTHZ_CLOSE)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert head_field(answer, b"proxy-status") == b"geproxy; error=connection_limit_reached"
    finally:
        for holder in holders:
            holder.close()
    # Once the holders left, the proxy serves again.
    for _ in range(100):
        answer = exchange(proxy.address, HEALTHZ_CLOSE)
        if answer.startswith(b"HTTP/1.1 200 "):
            break
        gevent.sleep(0.02)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_open_tunnels_count_toward_max_connections(proxy_factory, raw_origin):
    """A tunnel relays with no greenlet of its own; it is still a connection."""
    proxy = proxy_factory("max_connections = 2\n")
    server = raw_origin(echo)
    tunnels = [open_tunnel(proxy, f"127.0.0.1:{server.port}")[0] for _ in range(2)]
    try:
        for tunnel in tunnels:  # both relaying
            tunnel.sendall(b"ping")
            assert tunnel.recv(4) == b"ping"
        answer = exchange(proxy.address, HEALTHZ_CLOSE)
        assert answer.startswith(b"HTTP/1.1 503 ")
    finally:
        for tunnel in tunnels:
            tunnel.close()
    records = wait_for_records(proxy, 2)  # the refused connection has none
    assert [(r.method, r.close_reason) for r in records] == [("CONNECT", "done")] * 2


def test_bad_upstream_response_is_502(proxy, raw_origin, origin):
    def bad(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")

    server = raw_origin(bad)
    answer, closed = _answer_and_state(
        proxy.address, f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"error=http_response_incomplete" in answer
    _still_serves(proxy, origin)


def test_upstream_reset_mid_body_closes_the_client(proxy, raw_origin):
    def cut(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = raw_origin(cut)
    answer = exchange(proxy.address,
                      f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    # The head went out already: the only honest signal left is the closed connection.
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"partial")


def test_denied_by_a_plugin_is_403(proxy_factory, origin):
    class DenyAll:
        @hookimpl
        def on_request(self, ctx, request):
            raise Denied("test policy", rule="r1")

    proxy = proxy_factory(plugins=[DenyAll()])
    answer, closed = _answer_and_state(
        proxy.address, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert head_field(answer, b"proxy-status") == b"geproxy; error=http_request_denied"
    assert b"test policy" not in answer and b"r1" not in answer
    assert not closed


def test_a_plugin_that_raises_fails_closed_with_500(proxy_factory, origin):
    class Broken:
        @hookimpl
        def on_request(self, ctx, request):
            raise RuntimeError("bug in a policy")

    proxy = proxy_factory(plugins=[Broken()])
    answer, closed = _answer_and_state(
        proxy.address, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert head_field(answer, b"proxy-status") == b"geproxy; error=proxy_internal_error"
    assert b"bug in a policy" not in answer
    assert origin.seen == []


def test_on_request_may_answer_with_a_response(proxy_factory, origin):
    class Page:
        @hookimpl
        def on_request(self, ctx, request):
            if request.path == "/blocked":
                return Response(451, body=b"blocked here\n")
            return None

    proxy = proxy_factory(plugins=[Page()])
    out = curl("-i", "-x", proxy.url, origin.url("/blocked"))
    assert out.stdout.startswith(b"HTTP/1.1 451 ") and out.stdout.endswith(b"blocked here\n")
    _still_serves(proxy, origin)


@pytest.mark.parametrize("silent", [False, True])
def test_an_on_connect_denial_answers_the_first_request_unless_silent(proxy_factory, silent):
    class NoOne:
        @hookimpl
        def on_connect(self, ctx):
            return Denied("nobody", silent=silent)

    proxy = proxy_factory(plugins=[NoOne()])
    answer = exchange(proxy.address, b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
    if silent:
        assert answer == b""
    else:
        assert answer.startswith(b"HTTP/1.1 403 ") and answer.endswith(b"403 Forbidden\n")
        assert head_field(answer, b"proxy-status") == b"geproxy; error=http_request_denied"
        assert head_field(answer, b"connection") == b"close"


def _unused_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_a_refused_request_body_is_never_read_as_a_request(proxy_factory, origin):
    """A denied POST whose body looks like a request: the connection closes after the 403,
    so the smuggled request never reaches the origin."""

    class DenyPosts:
        @hookimpl
        def on_request(self, ctx, request):
            if request.method == "POST":
                raise Denied("no posts")

    proxy = proxy_factory(plugins=[DenyPosts()])
    smuggled = f"GET http://127.0.0.1:{origin.port}/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (f"POST http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(smuggled)}\r\n\r\n{smuggled}").encode()
    answer, closed = _answer_and_state(proxy.address, data)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert head_field(answer, b"connection") == b"close" and closed
    assert origin.seen == []


def test_an_error_for_a_request_without_body_keeps_the_connection(proxy, origin):
    sock = proxy.connect()
    try:
        sock.sendall(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 502 ") and b"Connection: close" not in first
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n".encode())
        assert recv_all(sock).endswith(b"\r\n\r\nhello\n")
    finally:
        sock.close()


def test_a_client_stalling_in_its_body_is_cut_without_a_traceback(proxy_factory, origin,
                                                                   caplog):
    proxy = proxy_factory("idle_timeout = 300ms\n")
    data = (f"POST http://127.0.0.1:{origin.port}/sha256 HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 100\r\n\r\nonly ten b").encode()
    sock = proxy.connect()
    try:
        sock.sendall(data)
        assert recv_all(sock) == b""  # cut: the upstream got a partial body, nothing to say
    finally:
        sock.close()
    record = wait_for_records(proxy, 1)[-1]
    # The client's doing, not the proxy's: no error in the record, "client" as the reason.
    assert record.close_reason == "client" and record.error is None
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
