"""protocol/semantics.py as tables: each row a message in, a decision out. No I/O: these
are the questions forwarding and both client protocols ask of HTTP."""

from __future__ import annotations

import pytest

from geproxy.config import Config
from geproxy.errors import ClientError, Denied, UpstreamError
from geproxy.models import Headers, Request, Response
from geproxy.protocol import http11
from geproxy.protocol.h2map import answer_fields, request_from_fields
from geproxy.protocol.semantics import (
    CHUNKED,
    answer_framing,
    client_keeps_alive,
    end_to_end,
    error_response,
    forwarded_for,
    is_final,
    max_forwards,
    proxy_status_error,
    request_has_body,
    upstream_head,
    via_loop,
    wants_upgrade,
)


def _request(method: str = "GET", target: str = "http://example.test/p?q",
             version: str = "HTTP/1.1", fields: tuple = ()) -> Request:
    return http11.make_request(method, target, version, Headers(list(fields), frozen=True))


def _response(status: int = 200, fields: tuple = (), version: str = "HTTP/1.1") -> Response:
    return Response(status, Headers(list(fields)), b"", "", version)


@pytest.mark.parametrize("version, connection, keeps", [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "keep-alive, Close", False),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Keep-Alive", True),
])
def test_client_keeps_alive(version: str, connection: str, keeps: bool) -> None:
    fields = (("Connection", connection),) if connection else ()
    assert client_keeps_alive(_request(version=version, fields=fields)) is keeps


@pytest.mark.parametrize("fields, has_body", [
    ((), False),
    ((("Content-Length", "0"),), False),
    ((("Content-Length", " 0 "),), False),
    ((("Content-Length", "12"),), True),
    ((("Transfer-Encoding", "chunked"),), True),
])
def test_request_has_body(fields: tuple, has_body: bool) -> None:
    assert request_has_body(_request("POST", fields=fields)) is has_body


@pytest.mark.parametrize("fields, wants", [
    ((("Upgrade", "websocket"), ("Connection", "Upgrade")), True),
    ((("Upgrade", "websocket"),), False),  # not named in Connection: a hop-by-hop leftover
    ((("Connection", "upgrade"),), False),
    ((), False),
])
def test_wants_upgrade(fields: tuple, wants: bool) -> None:
    assert wants_upgrade(_request(fields=fields)) is wants


@pytest.mark.parametrize("via, name, status_name", [
    ("off", "", "geproxy"), ("OFF ", "", "geproxy"), ("egress", "egress", "egress"),
    (" egress-1 ", "egress-1", "egress-1"), ("egress proxy", "egress proxy", '"egress proxy"')])
def test_via_and_proxy_status_names(via: str, name: str, status_name: str) -> None:
    config = Config("geproxy.ini", {"geproxy": {"via": via}})
    assert (config.via, config.proxy_name) == (name, status_name)


@pytest.mark.parametrize("field, loops", [
    ("1.1 egress", True),
    ("1.1 other, 1.1 Egress", True),
    ("1.1 egress.example", False),
    ("egress", False),  # no received-by: the protocol alone
])
def test_via_loop(field: str, loops: bool) -> None:
    assert via_loop(Headers([("Via", field)]), "egress") is loops


@pytest.mark.parametrize("method, value, hops", [
    ("OPTIONS", "0", 0), ("TRACE", "5", 5), ("GET", "0", None), ("OPTIONS", None, None)])
def test_max_forwards(method: str, value: str, hops: int) -> None:
    fields = (("Max-Forwards", value),) if value is not None else ()
    assert max_forwards(_request(method, fields=fields)) == hops


def test_max_forwards_must_be_a_number() -> None:
    with pytest.raises(ClientError):
        max_forwards(_request("TRACE", fields=(("Max-Forwards", "x"),)))


@pytest.mark.parametrize("mode, client, expected", [
    ("off", "10.0.0.2", [("X-Forwarded-For", "1.1.1.1"), ("Forwarded", "for=1.1.1.1")]),
    ("delete", "10.0.0.2", []),
    ("on", "10.0.0.2", [("X-Forwarded-For", "1.1.1.1, 10.0.0.2"),
                        ("Forwarded", "for=1.1.1.1, for=10.0.0.2")]),
    ("on", "::1", [("X-Forwarded-For", "1.1.1.1, ::1"),
                   ("Forwarded", 'for=1.1.1.1, for="[::1]"')]),
])
def test_forwarded_for(mode: str, client: str, expected: list) -> None:
    given = [("X-Forwarded-For", "1.1.1.1"), ("Forwarded", "for=1.1.1.1")]
    assert forwarded_for(given, mode, client) == expected


def test_end_to_end_drops_hop_by_hop_and_what_connection_names() -> None:
    headers = Headers([("Connection", "X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
                       ("TE", "trailers"), ("Accept", "*/*")])
    assert end_to_end(headers) == [("Accept", "*/*")]


@pytest.mark.parametrize("framing, parent, expected_line, expected_fields", [
    (None, False, "GET /p?q HTTP/1.1", ["Host: example.test"]),
    (("Content-Length", "5"), False, "GET /p?q HTTP/1.1", ["Content-Length: 5"]),
    (CHUNKED, False, "GET /p?q HTTP/1.1", ["Transfer-Encoding: chunked"]),
    (None, True, "GET http://example.test/p?q HTTP/1.1", ["Proxy-Authorization: Basic x"]),
])
def test_upstream_head(framing: tuple, parent: bool, expected_line: str,
                       expected_fields: list) -> None:
    request = _request(fields=(("Content-Length", "99"), ("Connection", "close"),
                               ("Accept", "*/*")))
    head = upstream_head(request, framing, forwarded="off", client_ip="10.0.0.2",
                         via="egress", parent=parent,
                         proxy_authorization="Basic x" if parent else None).decode()
    lines = head.split("\r\n")
    assert lines[0] == expected_line
    for field in expected_fields:
        assert field in lines
    assert "Via: 1.1 egress" in lines and "Accept: */*" in lines
    # The client's framing and hop-by-hop fields never go up; the framing given does.
    assert "Content-Length: 99" not in lines and "Connection: close" not in lines


def test_upstream_head_counts_max_forwards_down() -> None:
    head = upstream_head(_request("OPTIONS", fields=(("Max-Forwards", "3"),)), None,
                         forwarded="off", client_ip="10.0.0.2", via="")
    assert b"Max-Forwards: 2\r\n" in head and b"Via" not in head


@pytest.mark.parametrize("method, status, fields, length, open_ended", [
    ("GET", 200, (("Content-Length", "5"),), "5", False),
    ("GET", 200, (("Transfer-Encoding", "chunked"),), None, True),
    ("GET", 200, (), None, True),  # ended by the upstream's close
    ("HEAD", 200, (("Content-Length", "5"),), "5", False),  # the length of a GET's body
    ("GET", 204, (), None, False),
    ("GET", 304, (("Content-Length", "5"),), None, False),
    ("HEAD", 200, (), None, False),
])
def test_answer_framing(method: str, status: int, fields: tuple, length: str,
                        open_ended: bool) -> None:
    response = _response(status, fields)
    reader = http11.response_body_reader(method, response)
    assert answer_framing(reader, response) == (length, open_ended)


@pytest.mark.parametrize("status, upgrade, final", [
    (200, False, True), (404, False, True), (100, False, False), (103, False, False),
    (101, True, True)])
def test_is_final(status: int, upgrade: bool, final: bool) -> None:
    fields = (("Upgrade", "websocket"), ("Connection", "Upgrade")) if upgrade else ()
    assert is_final(_request(fields=fields), _response(status)) is final


def test_a_101_nobody_asked_for_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        is_final(_request(), _response(101))


@pytest.mark.parametrize("value, error", [
    ("egress; error=http_request_denied", "http_request_denied"),
    ('egress; details="a; b"; error=dns_error', "dns_error"),
    ('egress; error="destination_ip_prohibited"', "destination_ip_prohibited"),
    ("egress; received-status=503", None),
    (None, None),
])
def test_proxy_status_error(value: str, error: str) -> None:
    assert proxy_status_error(value) == error


def test_error_response_names_the_proxy_and_the_error() -> None:
    response = error_response(Denied("no", details="policy"), "egress")
    assert response.status == 403 and response.body == b"403 Forbidden\n"
    assert response.headers.get("proxy-status") == (
        'egress; error=http_request_denied; details="policy"')
    assert proxy_status_error(response.headers.get("proxy-status")) == "http_request_denied"


# -- HTTP/2 fields (protocol/h2map.py) ---------------------------------------------------------


@pytest.mark.parametrize("fields, method, target, for_us", [
    ([(":method", "CONNECT"), (":authority", "api.test:443")], "CONNECT", "api.test:443", None),
    ([(":method", "GET"), (":scheme", "http"), (":authority", "a.test"), (":path", "/x?y")],
     "GET", "http://a.test/x?y", None),
    ([(":method", "GET"), (":scheme", "https"), (":authority", "proxy.test"),
      (":path", "/healthz")], "GET", "/healthz", ("proxy.test", 443)),
    ([(":method", "GET"), (":scheme", "http"), (":authority", "[::1]:3128"),
      (":path", "/proxy.pac")], "GET", "http://[::1]:3128/proxy.pac", None),
    ([(":method", "GET"), (":scheme", "https"), (":authority", "[::1]:3128"),
      (":path", "/proxy.pac")], "GET", "/proxy.pac", ("::1", 3128)),
])
def test_request_from_fields(fields: list, method: str, target: str, for_us: tuple) -> None:
    request, names = request_from_fields(fields)
    assert (request.method, request.target, request.version, names) == (
        method, target, "HTTP/2", for_us)


def test_split_cookies_are_joined_and_fields_kept_in_order() -> None:
    request, _ = request_from_fields([
        (":method", "GET"), (":scheme", "http"), (":authority", "a.test"), (":path", "/"),
        ("cookie", "a=1"), ("x-b", "2"), ("cookie", "c=3")])
    assert list(request.headers) == [("x-b", "2"), ("cookie", "a=1; c=3")]


def test_extended_connect_is_refused() -> None:
    with pytest.raises(ClientError):
        request_from_fields([(":method", "CONNECT"), (":protocol", "websocket"),
                             (":scheme", "https"), (":authority", "a.test"), (":path", "/")])


def test_answer_fields_leave_out_what_http2_forbids() -> None:
    headers = Headers([("Content-Type", "text/plain"), ("Connection", "close"),
                       ("Keep-Alive", "5"), ("Transfer-Encoding", "chunked"),
                       ("Upgrade", "h2c"), ("Proxy-Connection", "x"), ("Via", "1.1 egress")])
    assert answer_fields(200, headers) == [(":status", "200"), ("content-type", "text/plain"),
                                          ("via", "1.1 egress")]


@pytest.mark.parametrize("status, phrase", [
    (200, "OK"), (201, "Created"), (413, "Content Too Large"), (414, "URI Too Long"),
    (103, "Early Hints"),
    (407, "Proxy Authentication Required"), (599, "Unknown")])
def test_status_lines_carry_the_registered_reason(status: int, phrase: str) -> None:
    """An upstream's 201 goes to an HTTP/1.1 client as "201 Created", not "201 Unknown"."""
    assert http11.reason_phrase(status) == phrase


def test_headers_keep_their_index_in_step_with_each_change() -> None:
    """Headers edited after a look-up (as on_response plugins and the core's framing do)
    answer as if built afresh from their fields: the index follows every add and removal."""
    headers = Headers([("Content-Length", "5"), ("X-A", "1"), ("connection", "keep-alive"),
                       ("x-a", "2"), ("Via", "1.1 a")])
    assert headers.get_all("x-a") == ["1", "2"]  # the index is built here
    headers.add("X-B", "3")
    headers.add("X-A", "4")
    assert headers.get_all("X-A") == ["1", "2", "4"] and headers.get("x-b") == "3"
    headers.remove("CONTENT-LENGTH", "Connection", "absent")  # several names in one pass
    assert list(headers) == [("X-A", "1"), ("x-a", "2"), ("Via", "1.1 a"), ("X-B", "3"),
                             ("X-A", "4")]
    assert "content-length" not in headers and "connection" not in headers
    assert headers.tokens("connection") == []
    headers.set("x-a", "5")
    assert headers.get_all("X-A") == ["5"] and list(headers)[-1] == ("x-a", "5")
    fresh = Headers(list(headers))
    for name in ("x-a", "via", "x-b", "content-length", "connection"):
        assert headers.get_all(name) == fresh.get_all(name)
        assert (name in headers) == (name in fresh)


def test_frozen_headers_refuse_every_change() -> None:
    headers = Headers([("Host", "a")], frozen=True)
    for change in (lambda: headers.add("X", "1"), lambda: headers.remove("Host"),
                   lambda: headers.remove("absent"), lambda: headers.set("Host", "b")):
        with pytest.raises(TypeError):
            change()
    assert list(headers) == [("Host", "a")]


def test_tokens_are_lowered_and_stripped_whatever_the_field_spelling() -> None:
    headers = Headers([("Connection", " Keep-Alive ,Upgrade"), ("CONNECTION", "TE, ,close")])
    assert headers.tokens("connection") == ["keep-alive", "upgrade", "te", "close"]
