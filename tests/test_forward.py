"""Plain HTTP forwarding end to end, for each protocol a client may speak to the proxy.

Most tests run three times (the ``client_protocol`` fixture): HTTP/1.1 on a plain listener,
HTTP/1.1 over TLS (a ``tls://`` listener, ALPN http/1.1), and HTTP/2 (``[tls] http2 = on``,
ALPN h2), each through one client (geproxy.testing.protocols) that shows the answer as it
came: status, fields, body, and how it ended. Where the protocols differ, each one's correct
behaviour is asserted: HTTP/2 has no connection-specific fields (RFC 9113 8.2.2) and frames
its bodies itself; an answer cut after its head is a closed connection on HTTP/1.1 and a
RST_STREAM on HTTP/2, whose connection goes on. A test whose HTTP/2 run fails today is
marked so (``H2_WRONG``): that is behaviour to fix, not to keep.

The tests that are HTTP/1.1's alone (HTTP/1.0 clients, pipelining, Upgrade, other client
programs: curl's upload modes, requests, urllib) follow them.
"""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.request
from collections import Counter
from typing import Any, Callable

import gevent
import gevent.event
import gevent.pool
import h2.errors
import pytest
import requests

from geproxy import Denied, Response, hookimpl
from geproxy.testing import (
    HookRecorder,
    ResponseReader,
    StaticResolver,
    curl,
    exchange,
    pattern,
    pattern_sha256,
    wait_for_records,
    wait_until,
)
from geproxy.testing.protocols import PROTOCOLS, Reply, open_client, protocol_ini

#: The bound on every wait of these tests, in seconds.
LIMIT = 10
#: What the proxy writes in the Via it adds upstream: the received-protocol is the client's
#: (RFC 9110 7.6.3).
VIA_UP = {"http1": "1.1 geproxy", "http1-tls": "1.1 geproxy", "h2": "2 geproxy"}
#: Record.version of a request, by the client's protocol.
VERSION = {"http1": "HTTP/1.1", "http1-tls": "HTTP/1.1", "h2": "HTTP/2"}
#: Fields HTTP/2 forbids (RFC 9113 8.2.2): none may reach an HTTP/2 client.
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR


def _json(out: Any) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _echo(reply: Reply) -> dict:
    assert (reply.status, reply.complete) == (200, True), reply
    return json.loads(reply.body)


def _sound(reply: Reply, protocol: str) -> None:
    """The answer's head is one its protocol allows: HTTP/1.1 says so in its status line;
    HTTP/2 carries no connection-specific field."""
    if protocol == "h2":
        assert not reply.names & CONNECTION_SPECIFIC, reply.headers
    else:
        assert reply.head.startswith(b"HTTP/1.1 "), reply.head


def _url(origin: Any, path: str) -> str:
    return origin.url(path, host="origin.test")


def _sha(body: bytes) -> dict:
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def _goes_on(client: Any, origin: Any) -> None:
    """The client connection still serves a request (the error left its framing sound)."""
    reply = client.request("GET", _url(origin, "/"))
    assert (reply.status, reply.body, reply.complete) == (200, b"hello\n", True), reply


def _h2_after_idle_timeout(client: Any, proxy: Any, connect: Callable[..., Any]) -> Any:
    """After an HTTP/2 answer that took idle_timeout, its connection may end at any moment
    (GOAWAY NO_ERROR, never an error: a defect of today's, for the rewrite to fix, in
    test_a_connection_is_kept_for_idle_timeout_after_its_last_answer): a new connection to
    go on with."""
    assert client.h2.goaway is None or client.h2.goaway[0] == NO_ERROR
    return connect(proxy)


def _answering(raw_origin: Any, answer: bytes) -> Any:
    """A raw origin that reads one request head and sends ``answer`` (raw bytes)."""
    def handle(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(answer)

    server = raw_origin(handle)
    return server


def _closed_after_answer(reply: Reply, protocol: str) -> None:
    """An answer after which the client's stream is in doubt: HTTP/1.1 says Connection:
    close and closes; HTTP/2 ends the stream, asks the client to stop sending (RST_STREAM
    NO_ERROR after the whole answer, RFC 9113 8.1), and the connection goes on."""
    if protocol == "h2":
        assert reply.complete and reply.reset == NO_ERROR and not reply.closed, reply
    else:
        assert reply.field("connection") == "close" and reply.closed, reply


# -- methods, bodies, framing ------------------------------------------------------------------


def test_get_is_forwarded_in_origin_form(protocol_pair, origin, client_protocol):
    proxy, client = protocol_pair()
    reply = client.request("GET", _url(origin, "/echo?a=1"))
    echo = _echo(reply)
    assert echo["path"] == "/echo" and echo["query"] == "a=1"
    assert echo["headers"]["host"] == f"origin.test:{origin.port}"
    assert echo["headers"]["via"] == VIA_UP[client_protocol]
    assert reply.fields("via") == ["1.1 geproxy"]
    _sound(reply, client_protocol)
    record = wait_for_records(proxy, 1)[0]
    assert (record.method, record.target, record.status, record.version) == (
        "GET", _url(origin, "/echo?a=1"), 200, VERSION[client_protocol])


def test_head_then_get_on_one_upstream_connection(protocol_pair, origin, client_protocol):
    _, client = protocol_pair()
    reply = client.request("HEAD", _url(origin, "/bytes/12345"))
    assert (reply.status, reply.body, reply.complete) == (200, b"", True), reply
    assert reply.field("content-length") == "12345"  # the length the GET would have
    _sound(reply, client_protocol)
    reply = client.request("GET", _url(origin, "/bytes/100"))
    assert reply.body == b"".join(pattern(100)) and reply.complete
    assert [seen.method for seen in origin.seen] == ["HEAD", "GET"]
    assert origin.seen[0].remote_port == origin.seen[1].remote_port  # pooled, and sound


def test_post_with_content_length(protocol_pair, origin, client_protocol):
    proxy, client = protocol_pair()
    body = b"".join(pattern(300_000))
    reply = client.request("POST", _url(origin, "/sha256"), body=body)
    assert _echo(reply) == _sha(body)
    assert origin.seen[-1].headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in origin.seen[-1].headers
    record = wait_for_records(proxy, 1)[0]
    if client_protocol == "h2":  # the DATA; what else an HTTP/2 stream counts is not settled
        assert record.bytes_in >= len(body)
    else:  # the bytes as they crossed the client's socket
        head = client.head_bytes("POST", _url(origin, "/sha256"), body=body)
        assert record.bytes_in == len(head) + len(body)
    assert record.bytes_out >= len(reply.body)


def test_chunked_upload(protocol_pair, origin):
    """HTTP/1.1 chunks, or HTTP/2 DATA with no content-length: a body of unknown length,
    passed on chunked."""
    _, client = protocol_pair()
    body = b"".join(pattern(200_001))
    reply = client.request("POST", _url(origin, "/sha256"), body=body, chunked=True)
    assert _echo(reply) == _sha(body)
    assert origin.seen[-1].headers["transfer-encoding"] == "chunked"
    assert "content-length" not in origin.seen[-1].headers


def test_methods_and_their_bodies_reach_the_origin(protocol_pair, origin):
    _, client = protocol_pair()
    cases = [("PUT", b"put body"), ("PATCH", b"patch"), ("DELETE", b"x" * 70_000),
             ("DELETE", None), ("GET", None), ("POST", b""), ("OPTIONS", None)]
    for method, body in cases:
        echo = _echo(client.request(method, _url(origin, "/echo"), body=body))
        assert (echo["method"], echo["body_length"]) == (method, len(body or b"")), method
        assert echo["headers"].get("content-length") == (
            None if body is None else str(len(body))), method


def test_large_bodies_stream_both_ways(protocol_pair, origin):
    _, client = protocol_pair()
    size = 4 * 1024 * 1024 + 5  # past every window and socket buffer on the way
    body = b"".join(pattern(size))
    assert _echo(client.request("PUT", _url(origin, "/sha256"), body=body,
                                timeout=60)) == _sha(body)
    for path in (f"/bytes/{size}", f"/chunked/{size}"):
        reply = client.request("GET", _url(origin, path), timeout=60)
        assert reply.complete and hashlib.sha256(reply.body).hexdigest() == (
            pattern_sha256(size)), path


def test_chunked_response_reaches_the_client_whole(protocol_pair, origin, client_protocol):
    _, client = protocol_pair()
    reply = client.request("GET", _url(origin, "/chunked/500000"))
    assert reply.complete and hashlib.sha256(reply.body).hexdigest() == pattern_sha256(500000)
    assert reply.field("content-length") is None
    if client_protocol == "h2":
        _sound(reply, client_protocol)  # framed by DATA and END_STREAM
    else:
        assert reply.field("transfer-encoding") == "chunked"


def test_responses_without_a_body(protocol_pair, origin, client_protocol):
    """204 and 304 have no body and no length; the connection goes on after each."""
    _, client = protocol_pair()
    for status in (204, 304):
        reply = client.request("GET", _url(origin, f"/status/{status}"))
        assert (reply.status, reply.body, reply.complete) == (status, b"", True), reply
        assert reply.field("content-length") is None and reply.field("content-type")
        _sound(reply, client_protocol)
        assert not reply.closed
    _goes_on(client, origin)
    assert len({seen.remote_port for seen in origin.seen}) == 1


def test_close_delimited_response(protocol_pair, raw_origin, client_protocol):
    """An origin's body that ends at its close reaches the client framed (HTTP/1.1: chunked;
    HTTP/2: END_STREAM), and the client connection goes on."""

    def answer(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for piece in pattern(100_000):
            sock.sendall(piece)

    server = raw_origin(answer)
    _, client = protocol_pair()
    reply = client.request("GET", f"http://127.0.0.1:{server.port}/")
    assert reply.complete and hashlib.sha256(reply.body).hexdigest() == pattern_sha256(100_000)
    assert reply.field("content-length") is None
    if client_protocol == "h2":
        _sound(reply, client_protocol)
    else:
        assert reply.field("transfer-encoding") == "chunked"
    assert not reply.closed
    local = client.request("GET", "/healthz")
    assert (local.status, local.body) == (200, b"ok\n")


# -- Expect: 100-continue and interim answers --------------------------------------------------


def test_expect_100_continue(protocol_pair, origin):
    _, client = protocol_pair()
    body = b"".join(pattern(2_000_000))
    reply = client.request("POST", _url(origin, "/sha256"), [("Expect", "100-continue")],
                           body=body)
    assert _echo(reply) == _sha(body)
    assert origin.seen[-1].headers.get("expect") == "100-continue"
    assert [status for status, _ in reply.interim] == [100]


def test_expect_answered_with_a_final_status(protocol_pair, raw_origin, client_protocol):
    """The origin refuses before the body: the client gets that answer, no body is sent, and
    the rest of the client's stream is in doubt (the unsent body)."""
    closed = gevent.event.Event()

    def refuse(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\n\r\nnope")
        with gevent.Timeout(LIMIT, False):  # until the proxy lets go of the connection
            while sock.recv(65536):
                pass
            closed.set()

    server = raw_origin(refuse)
    _, client = protocol_pair()
    reply = client.request("PUT", f"http://127.0.0.1:{server.port}/",
                           [("Expect", "100-continue")], body=b"0123456789", expect_wait=LIMIT)
    assert (reply.status, reply.body) == (417, b"nope"), reply
    assert reply.interim == []
    _closed_after_answer(reply, client_protocol)
    assert closed.wait(LIMIT)  # the upstream connection is not reused either
    if client_protocol == "h2":
        local = client.request("GET", "/healthz")
        assert (local.status, local.body) == (200, b"ok\n")


def test_interim_answers_are_relayed(protocol_pair, raw_origin):
    server = _answering(raw_origin,
                        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                        b"HTTP/1.1 100 Continue\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    _, client = protocol_pair()
    reply = client.request("GET", f"http://127.0.0.1:{server.port}/")
    assert (reply.status, reply.body) == (200, b"ok"), reply
    assert reply.interim == [(103, [("link", "</style.css>; rel=preload")]), (100, [])]


# -- fields --------------------------------------------------------------------------------------


def test_hop_by_hop_fields_are_removed(protocol_pair, origin, client_protocol):
    """HTTP/2 has no connection-specific fields to send (test below); TE and
    Proxy-Authorization are the hop-by-hop fields both may carry."""
    _, client = protocol_pair()
    fields = [("TE", "trailers"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
              ("X-End-To-End", "kept")]
    if client_protocol != "h2":
        fields += [("Connection", "X-Private, keep-alive"), ("X-Private", "1"),
                   ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive")]
    headers = _echo(client.request("GET", _url(origin, "/echo"), fields))["headers"]
    for name in ("x-private", "keep-alive", "proxy-connection", "proxy-authorization", "te"):
        assert name not in headers, name
    assert headers["x-end-to-end"] == "kept"


#: Fields an HTTP/2 request may not carry (RFC 9113 8.2.2, 8.3.1), refused by the h2
#: package: the proxy ends the connection with GOAWAY PROTOCOL_ERROR (a stream error taken
#: as a connection error, as RFC 9113 5.4.1 allows), and the origin never hears of it.
H2_MALFORMED = {
    "connection": ("connection", "close"),
    "keep-alive": ("keep-alive", "timeout=5"),
    "proxy-connection": ("proxy-connection", "keep-alive"),
    "transfer-encoding": ("transfer-encoding", "chunked"),
    "upgrade (no 101 switch over HTTP/2)": ("upgrade", "websocket"),
    "te other than trailers": ("te", "gzip"),
    "host other than :authority": ("host", "elsewhere.test"),
}


def test_connection_specific_fields_from_an_h2_client_are_refused(proxy_factory, tls_files,
                                                                  origin):
    proxy = proxy_factory(protocol_ini("h2", tls_files),
                          resolver=StaticResolver({"origin.test": ["127.0.0.1"]}))
    for case, field in H2_MALFORMED.items():
        client = open_client(proxy, "h2", tls_files.ca_file, validate=False)
        try:
            reply = client.request("GET", _url(origin, "/echo"), [field])
            assert (reply.status, reply.closed) == (0, True), case
            assert client.h2.goaway is not None, case
            assert client.h2.goaway[0] == PROTOCOL_ERROR, case
        finally:
            client.close()
    assert origin.seen == []
    reply = open_client(proxy, "h2", tls_files.ca_file)
    try:
        assert reply.request("GET", _url(origin, "/")).body == b"hello\n"
    finally:
        reply.close()


def test_cookies_reach_the_origin_as_one_field(protocol_pair, origin, client_protocol):
    """HTTP/2 clients split Cookie in crumbs (RFC 9113 8.2.3); they go upstream joined."""
    _, client = protocol_pair()
    if client_protocol == "h2":
        cookies = [("cookie", "a=1"), ("cookie", "b=2")]
    else:
        cookies = [("Cookie", "a=1; b=2")]
    headers = _echo(client.request("GET", _url(origin, "/echo"), cookies))["headers"]
    assert headers["cookie"] == "a=1; b=2"


def test_host_is_rewritten_from_the_target(protocol_pair, origin, client_protocol):
    """HTTP/1.1: whatever Host the client sent; HTTP/2: from :authority (a host field that
    differs is refused, test above)."""
    _, client = protocol_pair()
    fields = [] if client_protocol == "h2" else [("Host", "elsewhere.example")]
    echo = _echo(client.request("GET", _url(origin, "/echo"), fields))
    assert echo["headers"]["host"] == f"origin.test:{origin.port}"


def test_response_hop_by_hop_fields_are_removed(protocol_pair, raw_origin, client_protocol):
    server = _answering(raw_origin, b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
                        b"Keep-Alive: timeout=3\r\nProxy-Connection: keep-alive\r\n"
                        b"Upgrade: h2c\r\nX-Kept: 2\r\nContent-Length: 2\r\n\r\nok")
    _, client = protocol_pair()
    reply = client.request("GET", f"http://127.0.0.1:{server.port}/")
    assert (reply.status, reply.body) == (200, b"ok")
    assert sorted(reply.headers) == [("content-length", "2"), ("via", "1.1 geproxy"),
                                     ("x-kept", "2")]
    _sound(reply, client_protocol)


def test_response_fields_reach_the_client_as_the_origin_sent_them(protocol_pair, raw_origin,
                                                                  client_protocol):
    """Every end-to-end field, repeated ones as separate fields in their order, empty values
    too; then Via, and the core's own framing."""

    server = _answering(raw_origin, b"HTTP/1.1 201 Created\r\nX-A: 1\r\nSet-Cookie: a=1\r\n"
                        b"Content-Type: text/x\r\nSet-Cookie: b=2\r\nX-Empty:\r\n"
                        b"Cache-Control: no-cache\r\nContent-Length: 7\r\n\r\ncreated")
    _, client = protocol_pair()
    reply = client.request("GET", f"http://127.0.0.1:{server.port}/")
    assert (reply.status, reply.body, reply.complete) == (201, b"created", True)
    assert Counter(reply.headers) == Counter([
        ("x-a", "1"), ("set-cookie", "a=1"), ("content-type", "text/x"), ("set-cookie", "b=2"),
        ("x-empty", ""), ("cache-control", "no-cache"), ("via", "1.1 geproxy"),
        ("content-length", "7")])
    assert reply.fields("set-cookie") == ["a=1", "b=2"]
    _sound(reply, client_protocol)


def _watching_requests(protocol_pair: Any) -> tuple[Any, list]:
    """A client of a proxy whose plugin keeps every request on_request sees."""
    seen: list = []

    class Watch:
        @hookimpl
        def on_request(self, ctx, request):
            seen.append(request)

    _, client = protocol_pair(plugins=[Watch()])
    return client, seen


def test_plugins_see_the_request_the_client_sent(protocol_pair, origin, client_protocol):
    """on_request's request: the method, the absolute target, the client's version, and the
    client's fields."""
    client, seen = _watching_requests(protocol_pair)
    client.request("POST", _url(origin, "/sha256"), [("X-A", "1")], body=b"abc")
    request = seen[-1]
    assert (request.method, request.target, request.version) == (
        "POST", _url(origin, "/sha256"), VERSION[client_protocol])
    assert (request.host, request.port, request.path) == ("origin.test", origin.port, "/sha256")
    assert request.headers.get("x-a") == "1" and request.headers.get("content-length") == "3"


def test_plugins_see_no_framing_the_client_did_not_send(protocol_pair, origin,
                                                         client_protocol):
    client, seen = _watching_requests(protocol_pair)
    client.request("POST", _url(origin, "/sha256"), body=b"abc", chunked=True)
    sent = "chunked" if client_protocol != "h2" else None  # HTTP/2: DATA, no length
    assert seen[-1].headers.get("transfer-encoding") == sent


def test_on_response_plugins_edit_headers(protocol_pair, origin, client_protocol):
    """A plugin adds, changes and removes fields; the framing stays the core's, and no
    connection-specific field a plugin adds reaches an HTTP/2 client."""

    class Edit:
        @hookimpl
        def on_response(self, ctx, request, response):
            response.headers.set("X-Checked-By", "policy")
            response.headers.set("Content-Type", "text/edited")
            response.headers.remove("Date")
            response.headers.set("Content-Length", "1")
            response.headers.set("Transfer-Encoding", "gzip")
            response.headers.set("Connection", "close")
            response.headers.set("Keep-Alive", "timeout=1")
            response.headers.set("Upgrade", "h2c")

    _, client = protocol_pair(plugins=[Edit()])
    reply = client.request("GET", _url(origin, "/"))
    assert (reply.status, reply.body, reply.complete) == (200, b"hello\n", True)
    assert reply.field("x-checked-by") == "policy"
    assert reply.field("content-type") == "text/edited" and reply.field("date") is None
    assert reply.field("content-length") == "6" and reply.field("transfer-encoding") is None
    assert reply.field("connection") is None and not reply.closed  # the core's keep-alive
    _sound(reply, client_protocol)
    _goes_on(client, origin)


def test_hook_order_for_a_plain_get(protocol_pair, origin, client_protocol):
    recorder = HookRecorder()
    proxy, client = protocol_pair(plugins=[recorder])
    assert client.request("GET", _url(origin, "/")).status == 200
    wait_for_records(proxy, 1)
    handshake = [] if client_protocol == "http1" else [("on_tls_handshake", "ok")]
    assert recorder.calls == [
        ("on_connect", "127.0.0.1"),
        *handshake,
        ("on_request", f"GET {_url(origin, '/')}"),
        ("route", "origin.test"),
        ("resolve", f"origin.test:{origin.port}"),
        ("on_response", "200"),
        ("on_close", "GET 200"),
    ]


def test_forwarded_for_off_on_delete(protocol_proxy, proxy_client, origin):
    client_headers = [("X-Forwarded-For", "10.9.8.7"), ("Forwarded", "for=10.9.8.7")]
    seen = {}
    for mode in ("off", "on", "delete"):
        client = proxy_client(protocol_proxy(f"forwarded_for = {mode}\n"))
        seen[mode] = _echo(client.request("GET", _url(origin, "/echo"), client_headers))[
            "headers"]
    assert seen["off"]["x-forwarded-for"] == "10.9.8.7"  # passed on, nothing added
    assert seen["off"]["forwarded"] == "for=10.9.8.7"
    assert seen["on"]["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
    assert seen["on"]["forwarded"] == "for=10.9.8.7, for=127.0.0.1"
    assert "x-forwarded-for" not in seen["delete"] and "forwarded" not in seen["delete"]


def test_a_request_that_went_through_this_proxy_is_a_loop(protocol_pair, origin,
                                                          client_protocol):
    proxy, client = protocol_pair()
    reply = client.request("GET", _url(origin, "/"), [("Via", "1.1 upstream-cache, 1.1 GEPROXY")])
    assert reply.status == 502 and reply.field("proxy-status") == (
        "geproxy; error=proxy_loop_detected")
    assert origin.seen == []
    # Another proxy's name, or a comment that merely mentions ours, is no loop.
    echo = _echo(client.request("GET", _url(origin, "/echo"), [("Via", "1.1 other (geproxy)")]))
    vias = [v.strip() for v in echo["headers"]["via"].split(",")]
    assert vias == ["1.1 other (geproxy)", VIA_UP[client_protocol]]


def test_max_forwards_zero_is_answered_by_the_proxy(protocol_pair, origin, client_protocol):
    """OPTIONS and TRACE with Max-Forwards: 0 are the proxy's to answer (RFC 9110 7.6.2),
    TRACE with the request it received (credentials for the proxy left out)."""
    _, client = protocol_pair()
    reply = client.request("OPTIONS", _url(origin, "/"), [("Max-Forwards", "0")])
    assert (reply.status, reply.body) == (200, b""), reply
    assert "TRACE" in (reply.field("allow") or "")
    _sound(reply, client_protocol)
    reply = client.request("TRACE", _url(origin, "/"), [
        ("Max-Forwards", "0"), ("X-Traced", "yes"), ("Proxy-Authorization", "Basic c2VjcmV0")])
    assert reply.status == 200 and reply.field("content-type") == "message/http"
    traced = reply.body.lower()
    assert traced.startswith(f"trace {_url(origin, '/')} ".encode())
    assert b"\r\nx-traced: yes\r\n" in traced and b"max-forwards: 0" in traced
    assert b"proxy-authorization" not in traced and b"c2vjcmv0" not in traced
    assert origin.seen == []
    echo = _echo(client.request("OPTIONS", _url(origin, "/echo"), [("Max-Forwards", "3")]))
    assert echo["headers"]["max-forwards"] == "2"


# -- connections, the pool -------------------------------------------------------------------


def test_client_and_upstream_connections_are_reused(protocol_pair, origin, client_protocol):
    """Three requests on one client connection (HTTP/2: three streams of it) go on one
    upstream connection."""
    proxy, client = protocol_pair()
    for _ in range(3):
        reply = client.request("GET", _url(origin, "/"))
        assert (reply.body, reply.closed) == (b"hello\n", False)
        _sound(reply, client_protocol)
    assert len({seen.remote_port for seen in origin.seen}) == 1
    ids = [record.ctx.conn_id for record in wait_for_records(proxy, 3)]
    if client_protocol == "h2":  # a stream's id is its connection's, and its own number
        assert len({i.rpartition("-")[0] for i in ids}) == 1
        assert [i.rpartition("-")[2] for i in ids] == ["1", "3", "5"]
    else:
        assert len(set(ids)) == 1


def test_concurrent_requests(protocol_proxy, proxy_client, origin, client_protocol):
    """Fifty at once: on fifty connections, or on fifty streams of one HTTP/2 connection."""
    proxy = protocol_proxy()
    shared = proxy_client(proxy) if client_protocol == "h2" else None

    def one(i: int) -> str:
        client = shared or proxy_client(proxy)
        return _echo(client.request("GET", _url(origin, f"/echo?i={i}"), timeout=30))["query"]

    pool = gevent.pool.Pool(50)
    assert pool.map(one, range(50)) == [f"i={i}" for i in range(50)]


def test_idle_pooled_connections_expire(protocol_pair, origin):
    proxy, client = protocol_pair("upstream_idle_timeout = 200ms\n")
    assert client.request("GET", _url(origin, "/")).body == b"hello\n"
    assert wait_until(lambda: len(proxy.server.pool) == 1, LIMIT)
    assert wait_until(lambda: len(proxy.server.pool) == 0, LIMIT)  # at 200 ms
    assert client.request("GET", _url(origin, "/")).body == b"hello\n"
    assert len({seen.remote_port for seen in origin.seen}) == 2  # a new connection


def test_an_upstream_that_closed_while_pooled_is_not_reused(protocol_pair, raw_origin):
    """The origin answers once and closes its side: the next request opens a new one."""

    def answer_once(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")

    server = raw_origin(answer_once)
    _, client = protocol_pair()
    for _ in range(2):
        reply = client.request("GET", f"http://127.0.0.1:{server.port}/")
        assert (reply.status, reply.body) == (200, b"one"), reply
    assert server.accepted == 2


def test_a_kept_connection_idle_past_idle_timeout_is_closed(protocol_pair, protocol_proxy,
                                                            proxy_client, origin):
    """After its answer the client says nothing: the proxy closes at idle_timeout (HTTP/2:
    GOAWAY NO_ERROR, then the close), and serves the next client."""
    proxy, client = protocol_pair("idle_timeout = 300ms\n")
    assert client.request("GET", _url(origin, "/")).body == b"hello\n"
    assert client.closed_by_proxy(LIMIT)  # far past idle_timeout
    if client.protocol == "h2":
        assert client.h2.goaway == (NO_ERROR, 1)
    assert proxy_client(proxy).request("GET", _url(origin, "/")).body == b"hello\n"
    assert wait_until(lambda: proxy.server.active == {}, LIMIT)


@pytest.mark.parametrize("client_protocol", ["http1", "h2"], indirect=True)
def test_a_connection_is_kept_for_idle_timeout_after_its_last_answer(protocol_pair, origin):
    """A slow answer (0.8 s, idle_timeout 1 s), then a pause shorter than idle_timeout (the
    client's own pace): the connection is still there for the next request. (HTTP/1.1 over
    TLS keeps its connections as HTTP/1.1 does, by the same code.)"""
    _, client = protocol_pair("idle_timeout = 1s\n")
    assert client.request("GET", _url(origin, "/sleep/0.8")).body == b"slept\n"
    gevent.sleep(0.5)  # the client's pace, under idle_timeout: what is tested
    reply = client.request("GET", _url(origin, "/"))
    assert (reply.status, reply.body) == (200, b"hello\n"), reply
    assert len({seen.remote_port for seen in origin.seen}) == 1


def test_an_upstream_silent_on_a_later_request_gets_504(protocol_pair, proxy_client,
                                                        raw_origin):
    """The first answer comes; the second never does: 504 at idle_timeout, from the same
    reused timer that bounded the first wait. HTTP/1.1 closes after it (what the upstream
    still sends is in doubt); the HTTP/2 connection goes on."""
    answered = []

    def once_then_silent(sock: socket.socket) -> None:
        while server.read_head(sock):
            if answered:
                with gevent.Timeout(LIMIT, False):
                    sock.recv(1)  # silent until the proxy gives up and closes
                return
            answered.append(True)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")

    server = raw_origin(once_then_silent)
    proxy, client = protocol_pair("idle_timeout = 300ms\n")
    url = f"http://127.0.0.1:{server.port}/"
    assert client.request("GET", url).body == b"hello\n"
    second = client.request("GET", url)
    assert second.status == 504, second
    assert second.field("proxy-status") == "geproxy; error=http_response_timeout"
    if client.protocol == "h2":
        assert second.reset is None
        client = _h2_after_idle_timeout(client, proxy, proxy_client)
        assert client.request("GET", "/healthz").status == 200
    else:
        assert second.field("connection") == "close" and second.closed
    statuses = [record.status for record in wait_for_records(proxy, 2)[:2]]
    assert statuses == [200, 504]


# -- requests for the proxy itself ---------------------------------------------------------


def test_requests_for_the_proxy_itself_are_answered_locally(protocol_pair, client_protocol):
    """In origin-form (HTTP/2: with the proxy's own https authority), or with the proxy's
    own address as the target."""
    _, client = protocol_pair()
    reply = client.request("GET", "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    _sound(reply, client_protocol)
    assert client.request("GET", "/elsewhere").status == 404
    host, port = client.address
    reply = client.request("GET", f"http://{host}:{port}/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.field("via") is None  # answered, not forwarded to itself


# -- errors of the status table --------------------------------------------------------------


def _silent(sock: socket.socket) -> None:
    """A raw_origin handler that reads the request and says nothing until the proxy gives
    up and closes."""
    with gevent.Timeout(LIMIT, False):
        while sock.recv(65536):
            pass


class _DenyPath:
    """Refuses /denied (403), fails on /bug (500), answers /page itself (451)."""

    @hookimpl
    def on_request(self, ctx, request):
        if request.path == "/denied":
            raise Denied("test policy", rule="r1")
        if request.path == "/bug":
            raise RuntimeError("bug in a policy")
        if request.path == "/page":
            return Response(451, body=b"blocked here\n")
        return None


#: case: (the target, from the origin, a port that refuses and a port whose origin is
#: silent; the status, the Proxy-Status error, whether HTTP/1.1 closes after it).
ERRORS: dict[str, tuple[Callable[[Any, int, int], str], int, str, bool]] = {
    "unresolvable host": (lambda origin, refusing, silent: "http://nowhere.test/", 502,
                          "dns_error", False),
    "refused connection": (lambda origin, refusing, silent: f"http://127.0.0.1:{refusing}/",
                           502, "connection_refused", False),
    "upstream timeout": (lambda origin, refusing, silent: f"http://127.0.0.1:{silent}/", 504,
                         "http_response_timeout", True),
    "denied by a plugin": (lambda origin, refusing, silent: _url(origin, "/denied"), 403,
                           "http_request_denied", False),
    "a plugin that raises": (lambda origin, refusing, silent: _url(origin, "/bug"), 500,
                             "proxy_internal_error", True),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_an_error_of_the_status_table(protocol_pair, proxy_client, origin, raw_origin,
                                      refusing, client_protocol, case):
    """The proxy's own answer, with its Proxy-Status and a short body. HTTP/1.1 closes after
    the errors that say so (errors.py: what the upstream did is in doubt); an HTTP/2 stream
    ends cleanly and its connection always goes on."""
    target, status, error, closes = ERRORS[case]
    proxy, client = protocol_pair("idle_timeout = 500ms\n", plugins=[_DenyPath()])
    reply = client.request("GET", target(origin, refusing, raw_origin(_silent).port))
    assert reply.status == status, reply
    assert reply.field("proxy-status").startswith(f"geproxy; error={error}")
    assert reply.body.startswith(f"{status} ".encode()) and reply.complete
    assert b"policy" not in reply.body and b"r1" not in reply.body
    _sound(reply, client_protocol)
    assert wait_for_records(proxy, 1)[0].error == error
    if client_protocol == "h2":
        assert reply.reset is None
        if error == "http_response_timeout":
            client = _h2_after_idle_timeout(client, proxy, proxy_client)
    elif closes:
        assert reply.field("connection") == "close" and reply.closed
        client = proxy_client(proxy)
    else:
        assert reply.field("connection") is None and not reply.closed
    _goes_on(client, origin)


def test_a_plugins_answer(protocol_pair, origin, client_protocol):
    _, client = protocol_pair(plugins=[_DenyPath()])
    reply = client.request("GET", _url(origin, "/page"))
    assert (reply.status, reply.body, reply.complete) == (451, b"blocked here\n", True)
    assert origin.seen == []
    _sound(reply, client_protocol)
    _goes_on(client, origin)


def test_a_connect_timeout_is_504(protocol_pair, blackhole):
    _, client = protocol_pair("connect_timeout = 300ms\n")
    reply = client.request("GET", f"http://127.0.0.1:{blackhole}/")
    assert reply.status == 504, reply
    assert reply.field("proxy-status") == "geproxy; error=connection_timeout"


def test_an_error_after_a_request_body(protocol_pair, refusing, client_protocol):
    """The body was read (or not) when the error came: HTTP/1.1 closes after the answer;
    HTTP/2 ends the stream and its connection goes on."""
    _, client = protocol_pair()
    reply = client.request("POST", f"http://127.0.0.1:{refusing}/", body=b"abc")
    assert reply.status == 502 and reply.field("proxy-status") == (
        "geproxy; error=connection_refused")
    if client_protocol == "h2":
        assert reply.complete and not reply.closed
    else:
        assert reply.field("connection") == "close" and reply.closed


def test_an_answer_cut_mid_body(protocol_pair, raw_origin, client_protocol):
    """Once the head went out, a cut can only be told by its end: HTTP/1.1 closes the
    connection short of the Content-Length; HTTP/2 resets the stream (INTERNAL_ERROR), and
    the connection goes on."""
    sent = gevent.event.Event()

    def cut(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
        assert sent.wait(LIMIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = raw_origin(cut)
    proxy, client = protocol_pair()
    pending = client.begin("GET", f"http://127.0.0.1:{server.port}/")
    pending.wait_for(b"partial")  # the head went out: only the end can tell the client
    sent.set()
    reply = pending.reply()
    assert (reply.status, reply.body, reply.complete) == (200, b"partial", False), reply
    assert reply.field("content-length") == "100000"
    if client_protocol == "h2":
        assert reply.reset == INTERNAL_ERROR and not reply.closed
        local = client.request("GET", "/healthz")
        assert (local.status, local.body) == (200, b"ok\n")
    else:
        assert reply.closed and reply.reset is None
    assert wait_for_records(proxy, 1)[0].error == "http_response_incomplete"


# -- HTTP/1.1 alone ------------------------------------------------------------------------------


def test_expect_answered_by_curl(proxy, origin, tmp_path):
    """curl's own Expect: 100-continue, as its users send it."""
    body = b"".join(pattern(2_000_000))
    (tmp_path / "body").write_bytes(body)
    out = curl("-x", proxy.url, "-H", "Expect: 100-continue", "--data-binary",
               f"@{tmp_path / 'body'}", "-w", "\n%{http_code}", origin.url("/sha256"))
    data, _, code = out.stdout.rpartition(b"\n")
    assert code == b"200"
    assert json.loads(data)["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("client_protocol", PROTOCOLS[:-1], indirect=True)
def test_upgrade_switches_to_a_tunnel(protocol_pair, raw_origin):
    """WebSocket over plain HTTP, on either HTTP/1.1 listener (HTTP/2 has no Upgrade: its
    client may not send one, test_connection_specific_fields_from_an_h2_client_are_refused)."""

    def websocket_like(sock: socket.socket) -> None:
        head = server.read_head(sock)
        assert b"upgrade: websocket" in head.lower()
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        while True:
            piece = sock.recv(100)
            if not piece:
                return
            sock.sendall(piece.upper())

    server = raw_origin(websocket_like)
    _, client = protocol_pair()
    reply = client.request("GET", f"http://127.0.0.1:{server.port}/ws",
                           [("Upgrade", "websocket"), ("Connection", "Upgrade")])
    assert reply.status == 101 and reply.field("upgrade") == "websocket"
    client.send(b"frames")
    client.wait_for(b"FRAMES")


def test_a_connect_that_went_through_this_proxy_is_a_loop(proxy, origin):
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n"
                      "Via: 1.0 geproxy\r\n\r\n".encode(), until_close=False)
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"error=proxy_loop_detected" in answer
    assert origin.seen == []


def test_put_upload_with_T(proxy, origin, tmp_path):
    body = b"".join(pattern(150_000))
    (tmp_path / "file").write_bytes(body)
    answer = _json(curl("-x", proxy.url, "-T", str(tmp_path / "file"), origin.url("/sha256")))
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert origin.seen[-1].method == "PUT"


def test_upload_from_a_pipe_is_chunked(proxy, origin):
    body = b"".join(pattern(100_000))
    answer = _json(curl("-x", proxy.url, "-T", "-", origin.url("/sha256"), input=body))
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()


def test_http10_client(proxy, origin):
    answer = exchange(proxy.address,
                      f"GET http://127.0.0.1:{origin.port}/chunked/1000 HTTP/1.0\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(1000)
    assert origin.seen[-1].headers["via"] == "1.0 geproxy"


def test_http10_keep_alive(proxy, origin):
    sock = proxy.connect()
    answers = ResponseReader(sock)
    try:
        for _ in range(2):
            sock.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.0\r\n"
                         "Connection: keep-alive\r\n\r\n".encode())
            head, body = answers.read()
            assert b"Connection: keep-alive" in head and body == b"hello\n"
    finally:
        sock.close()


def test_requests_reuse_connections_both_sides(proxy, origin):
    proxies = {"http": proxy.url}
    with requests.Session() as session:
        session.trust_env = False
        for _ in range(3):
            answer = session.get(origin.url("/"), proxies=proxies, timeout=10)
            assert answer.text == "hello\n"
    # One upstream connection carried all three requests, and one client connection too.
    assert len({seen.remote_port for seen in origin.seen}) == 1
    records = wait_for_records(proxy, 3)
    assert len({record.ctx.conn_id for record in records}) == 1


def test_urllib_through_the_proxy(proxy, origin):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    with opener.open(origin.url("/echo", host="origin.test"), timeout=10) as answer:
        echo = json.loads(answer.read())
    assert echo["headers"]["host"] == f"origin.test:{origin.port}"


def test_200_concurrent_clients(proxy, origin):
    def one(i: int) -> str:
        with requests.Session() as session:
            session.trust_env = False
            return session.get(origin.url(f"/echo?i={i}"), proxies={"http": proxy.url},
                               timeout=30).json()["query"]

    pool = gevent.pool.Pool(200)
    results = pool.map(one, range(200))
    assert results == [f"i={i}" for i in range(200)]


def test_pipelined_requests_are_answered_in_order(proxy, origin):
    request = "GET http://127.0.0.1:{}/echo?n={} HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = proxy.connect()
    answers = ResponseReader(sock)
    try:
        sock.sendall(b"".join(request.format(origin.port, n).encode() for n in range(5)))
        for n in range(5):
            _, body = answers.read()
            assert json.loads(body)["query"] == f"n={n}"
    finally:
        sock.close()


def test_connect_to_the_proxy_itself_is_a_loop(proxy):
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{proxy.port} HTTP/1.1\r\n\r\n".encode(),
                      until_close=False)
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"error=proxy_loop_detected" in answer


def test_requests_https_through_connect(proxy, tls_origin, ca_file):
    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(tls_origin.url("/echo", host="origin.test"),
                             proxies={"https": proxy.url}, verify=ca_file, timeout=10)
    assert answer.status_code == 200 and answer.json()["path"] == "/echo"


def _ask(answers: ResponseReader, port: int) -> bytes:
    """One GET on a kept connection; its whole answer."""
    answers.sock.sendall(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"
                         "\r\n\r\n".encode())
    head, body = answers.read()
    return head + b"\r\n\r\n" + body


def test_a_kept_connection_lives_past_idle_timeout_while_used(proxy_factory, origin):
    """A request every 0.4 s for 2 s with idle_timeout 1 s: each wait re-arms the one timer,
    so none is cut, though the connection as a whole outlives idle_timeout twice over."""
    proxy = proxy_factory("idle_timeout = 1s\n")
    with socket.create_connection(proxy.address, timeout=10) as sock:
        answers = ResponseReader(sock)
        for _ in range(5):
            answer = _ask(answers, origin.port)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello\n")
            gevent.sleep(0.4)
    records = wait_for_records(proxy, 5)
    assert [record.status for record in records] == [200] * 5
    assert len({seen.remote_port for seen in origin.seen}) == 1  # one upstream connection


def test_a_cut_http2_preface_is_answered_at_once(proxy_factory):
    """"PRI * HTTP/2.0" and nothing more (a prior-knowledge HTTP/2 client on a plain
    listener, its preface cut): a 400 for its version when that line ends, not the 408 that
    header_timeout would give the head it never finishes."""
    proxy = proxy_factory("header_timeout = 1s\n")
    answer = exchange(proxy.address, b"PRI * HTTP/2.0\r\n", timeout=10)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Connection: close" in answer
    record, = wait_for_records(proxy, 1)
    assert (record.status, record.error) == (400, "http_request_error")
    assert record.close_reason != "header timeout"
