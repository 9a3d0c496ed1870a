"""Plain HTTP forwarding: one absolute-form request to its origin and the response back.

The request goes upstream in origin-form (absolute-form to a parent proxy) with hop-by-hop
fields removed, Host rewritten from the target and Via added; both bodies are streamed piece
by piece, re-framed where needed, never held whole. Upstream connections are reused from the
server's pool only after a response whose framing ended cleanly.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import TYPE_CHECKING, Optional

from ..errors import (
    ClientError,
    ClientGone,
    ConnectionTerminated,
    ParentRefused,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
)
from ..models import Headers, Record, Request, Response, Route
from ..net.sockets import IdleWait, peek, send_all
from ..net.upstream import basic_credentials
from ..protocol import http11
from .tunnel import relay

if TYPE_CHECKING:
    from ..serve.connection import Connection

__all__ = ["forward", "client_keeps_alive", "request_has_body", "read_small_body", "via_loop",
           "wants_upgrade"]

RECV_SIZE = 64 * 1024
#: How long to wait for an origin's "100 Continue" before sending the body anyway (as curl).
EXPECT_WAIT = 1.0


def client_keeps_alive(request: Request) -> bool:
    tokens = request.headers.tokens("connection")
    if request.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def request_has_body(request: Request) -> bool:
    headers = request.headers
    return "transfer-encoding" in headers or (headers.get("content-length") or "0").strip() != "0"


def read_small_body(conn: "Connection", request: Request, limit: int) -> bytes:
    """Read a request body meant for the proxy itself, up to ``limit`` bytes. What
    follows the body (a pipelined request) stays in ``conn.buf``."""
    reader = http11.request_body_reader(request)
    if reader.done:
        return b""  # no body: conn.buf is the next request's, untouched
    out: list[bytes] = []
    size = 0
    while not reader.done:
        data = conn.recv()
        if not data:
            raise ClientGone("client closed in the middle of a body")
        for piece in reader.feed(data):
            size += len(piece)
            if size > limit:
                raise ClientError("body too large for a local request")
            out.append(piece)
    conn.buf = reader.rest
    return b"".join(out)


def _end_to_end(headers: Headers, also: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The fields of ``headers`` that may cross the proxy (less those named in ``also``)."""
    named = headers.tokens("connection")
    drop = http11.HOP_BY_HOP.union(named, also) if named or also else http11.HOP_BY_HOP
    return [(k, v) for k, v in headers if k.lower() not in drop]


def wants_upgrade(request: Request) -> bool:
    """Whether ``request`` asks to switch protocols (Upgrade, named in Connection)."""
    return "upgrade" in request.headers and "upgrade" in request.headers.tokens("connection")


#: Fields the proxy writes itself on the way upstream, whatever the client sent.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})


def _upstream_head(conn: "Connection", request: Request, route: Optional[Route],
                   body: http11.BodyReader) -> bytes:
    authority = request.authority
    if request.port == 80:
        authority = authority[: -len(":80")]
    headers = [("Host", authority)]
    headers.extend(_end_to_end(request.headers, _FRAMING))
    if request.method in ("OPTIONS", "TRACE") and "max-forwards" in request.headers:
        headers = [(k, v) for k, v in headers if k.lower() != "max-forwards"]
        headers.append(("Max-Forwards", str(_max_forwards(request) - 1)))
    if wants_upgrade(request):
        headers.append(("Connection", "Upgrade"))
        headers.append(("Upgrade", request.headers.get("upgrade") or ""))
    # The framing is the body reader's, never the client's field list: a client naming
    # Content-Length in Connection must not get its body read upstream as a next request.
    if isinstance(body, http11.ChunkedReader):
        headers.append(("Transfer-Encoding", "chunked"))
    elif isinstance(body, http11.LengthReader):
        headers.append(("Content-Length", str(body.remaining)))
    headers = _forwarded_for(headers, conn.settings["forwarded_for"], conn.ctx.client_ip)
    via = conn.gen.via
    if via:
        headers.append(("Via", f"{request.version[5:]} {via}"))
    target = request.path
    if route is not None:
        target = f"http://{authority}{request.path}"
        if route.username or route.password:
            headers.append(("Proxy-Authorization", basic_credentials(route)))
    return http11.serialize_head(f"{request.method} {target} HTTP/1.1", headers)


def _forwarded_for(headers: list[tuple[str, str]], mode: str,
                   client: str) -> list[tuple[str, str]]:
    """X-Forwarded-For and Forwarded: ``off`` passes the client's own on, ``delete`` removes
    them, ``on`` appends the client's address (RFC 7239 for Forwarded)."""
    if mode == "off":
        return headers
    kept = [(k, v) for k, v in headers if k.lower() not in ("x-forwarded-for", "forwarded")]
    if mode == "delete":
        return kept
    earlier_xff = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    earlier_fwd = [v for k, v in headers if k.lower() == "forwarded"]
    node = f'"[{client}]"' if ":" in client else client
    kept.append(("X-Forwarded-For", ", ".join(earlier_xff + [client])))
    kept.append(("Forwarded", ", ".join(earlier_fwd + [f"for={node}"])))
    return kept


def via_loop(headers: Headers, via: str) -> bool:
    """Whether a Via field already names this proxy (received-by, RFC 9110 7.6.3)."""
    name = via.lower()
    for entry in headers.tokens("via"):
        parts = entry.split()
        if len(parts) >= 2 and parts[1] == name:
            return True
    return False


def _max_forwards(request: Request) -> int:
    value = (request.headers.get("max-forwards") or "").strip()
    if not value.isdigit():
        raise ClientError("bad Max-Forwards")
    return int(value)


def _answer_max_forwards(conn: "Connection", request: Request, record: Record) -> bool:
    """OPTIONS or TRACE with ``Max-Forwards: 0`` is answered by the proxy (RFC 9110 7.6.2)."""
    headers = Headers([("Allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, CONNECT")])
    body = b""
    if request.method == "TRACE":
        fields = [(k, v) for k, v in request.headers if k.lower() != "proxy-authorization"]
        body = http11.serialize_head(f"TRACE {request.target} {request.version}", fields)
        headers.add("Content-Type", "message/http")
    return conn.answer(Response(200, headers, body), record, request)


class _Upstream:
    """One upstream connection while a request is on it."""

    def __init__(self, sock: socket.socket, address: tuple, reused: bool) -> None:
        self.sock = sock
        self.address = address
        self.reused = reused
        self.buf = b""
        #: Whether any byte of a response arrived (a stale pooled connection sends none).
        self.heard = False
        #: The origin answered Expect with a final status: the request body was never sent.
        self.body_skipped = False
        #: The head being read, kept when a wait ends in its middle (the wait for 100).
        self.parser: Optional[http11.ResponseHeadParser] = None

    def recv(self, wait: Optional[IdleWait] = None) -> bytes:
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        try:
            data = wait.recv(self.sock, RECV_SIZE) if wait else self.sock.recv(RECV_SIZE)
        except socket.timeout:
            raise UpstreamTimeout("upstream sent nothing for idle_timeout") from None
        except OSError as exc:
            raise ConnectionTerminated(f"upstream: {exc}") from None
        if data:
            self.heard = True
        return data

    def send(self, data: bytes) -> None:
        try:
            send_all(self.sock, data)
        except socket.timeout:
            raise UpstreamTimeout("upstream took no bytes for idle_timeout") from None
        except OSError as exc:
            raise ConnectionTerminated(f"upstream: {exc}") from None

    def send_body(self, data: bytes) -> bytes:
        """Send a piece of the request body; returns what was not sent (b"" when all was),
        which is left only when the upstream stopped taking it and has something to say
        instead: an answer (a 413, say, or an interim 1xx), or its close. Waits for room no
        longer than the socket's timeout."""
        sock = self.sock
        timeout = sock.gettimeout()
        sock.settimeout(0.0)  # gevent: no wait inside send; the waits are the select below
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(data):
                try:
                    sent += sock.send(view[sent:])
                    continue
                except BlockingIOError:
                    pass
                readable, writable, _ = select.select([sock], [sock], [], timeout)
                if readable:
                    return bytes(view[sent:])
                if not writable:
                    raise UpstreamTimeout("upstream took no bytes for idle_timeout")
        except UpstreamTimeout:
            raise
        except OSError as exc:
            if peek(self.sock):  # it answered, then reset: the answer is still readable
                return bytes(view[sent:])
            raise ConnectionTerminated(f"upstream: {exc}") from None
        finally:
            sock.settimeout(timeout)
        return b""

    def read_head(self, max_size: int, deadline: float,
                  first_wait: Optional[IdleWait] = None) -> Response:
        """The next response head, whole by ``deadline`` (time.monotonic()) or
        UpstreamTimeout: the head is bounded, not each read, so a trickled one ends too.
        What came of a head cut by the deadline is kept for the next call.

        ``first_wait``, when the deadline is its timeout from now: the first read waits
        on its reused timer rather than on a new one (the usual head comes in that read)."""
        if self.parser is None:
            self.parser = http11.ResponseHeadParser(max_size)
        idle = self.sock.gettimeout()
        try:
            if first_wait is not None and not self.buf:
                data = self.recv(first_wait)
                response = self._parse_head(data)
                if response is not None:
                    return response
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.recv()
                response = self._parse_head(data)
                if response is not None:
                    return response
        except UpstreamTimeout:
            raise UpstreamTimeout("no complete response head within idle_timeout") from None
        except ConnectionTerminated as exc:
            if self.heard:  # RFC 9209: part of a response came, so it is incomplete
                raise UpstreamError(f"response head cut: {exc.detail}") from None
            raise
        finally:
            self.sock.settimeout(idle)

    def _parse_head(self, data: bytes) -> Optional[Response]:
        if not data:
            raise ConnectionTerminated("upstream closed before a complete response head")
        assert self.parser is not None
        response = self.parser.feed(data)
        if response is not None:
            self.buf, self.parser = self.parser.rest, None
        return response


class _Stale(Exception):
    """The upstream closed before a byte of an answer to a request that may go again (it
    has no body): a reused connection (retry on a new one), or a new one to a parent (a
    parent that closes is as broken as one that refuses: the next route)."""

    def __init__(self, error: ConnectionTerminated) -> None:
        super().__init__(error.detail)
        self.error = error


def forward(conn: "Connection", request: Request, record: Record) -> bool:
    """Forward one plain request; True if the client connection may serve another."""
    body = http11.request_body_reader(request)
    if request.method in ("OPTIONS", "TRACE") and "max-forwards" in request.headers:
        if _max_forwards(request) == 0:
            return _answer_max_forwards(conn, request, record)
    routes = conn.hooks.route(conn.ctx, request)
    pool = conn.server.pool
    for route in routes:  # a pooled connection by any of the routes, in their order
        key = (route, request.host, request.port)
        pooled = pool.get(key)
        if pooled is not None:
            try:
                return _exchange(conn, request, record, _Upstream(*pooled, reused=True),
                                 body, route, key)
            except _Stale:
                conn.log.debug("pooled upstream connection was stale; opening a new one")
            break
    while True:
        sock, address, _, route = conn.open_upstream(request, record, routes)
        upstream = _Upstream(sock, address, reused=False)
        try:
            return _exchange(conn, request, record, upstream, body, route,
                             (route, request.host, request.port))
        except _Stale as stale:
            assert route is not None  # only a parent's new connection is retried
            conn.log.info("parent %s failed: %s", route.authority, stale)
            conn.hooks.route_failed(conn.ctx, request, route, stale.error)
            routes = routes[routes.index(route) + 1:]
            if not routes:
                raise stale.error from None


def _exchange(conn: "Connection", request: Request, record: Record, upstream: _Upstream,
              body: http11.BodyReader, route: Optional[Route], key: tuple) -> bool:
    settings = conn.settings
    idle = settings["idle_timeout"]
    upstream.sock.settimeout(idle)
    reusable = False
    try:
        chunked = isinstance(body, http11.ChunkedReader)
        head = _upstream_head(conn, request, route, body)
        record.upstream_addr, record.route = upstream.address[:2], route
        try:
            upstream.send(head)
            if body.done:
                response = _read_final(conn, request, record, upstream)
            else:
                response = _send_body(conn, request, record, upstream, body, chunked)
        except ConnectionTerminated as exc:
            if (upstream.reused or route is not None) and not upstream.heard and (
                    not request_has_body(request)):
                raise _Stale(exc) from None
            raise
        if route is not None and response.status == 407:
            # The parent wants credentials we do not have: the client's own 407 would
            # make it send its credentials to us, for the parent. A gateway error instead.
            raise ParentRefused(f"parent {route.host} answered 407", parent_status=407)
        if response.status == 101:
            return _switch(conn, request, record, upstream, response)
        keep, reusable = _relay_response(conn, request, record, upstream, response, body)
        return keep
    finally:
        if reusable and not conn.server.stopping:
            upstream.sock.settimeout(None)
            conn.server.pool.put(key, upstream.sock, upstream.address)
        else:
            upstream.sock.close()


def _send_body(conn: "Connection", request: Request, record: Record, upstream: _Upstream,
               body: http11.BodyReader, chunked: bool) -> Response:
    """Stream the request body upstream; honours ``Expect: 100-continue``.

    Returns the final response head (read after the body, or before it when the origin
    answered the expectation with a final status).
    """
    if "100-continue" in request.headers.tokens("expect"):
        early = _await_continue(conn, request, record, upstream)
        if early is not None:
            return early  # the body was never sent; the upstream cannot be reused
    while not body.done:
        data = conn.recv()
        if not data:
            raise ClientGone("client closed in the middle of the request body")
        pieces = body.feed(data)
        # What follows the body is the next request's: counted there, never here (a count
        # told to on_progress cannot go back).
        record.bytes_in += len(data) - (len(body.rest) if body.done else 0)
        if pieces:
            out = b"".join(http11.encode_chunk(p) for p in pieces if p) if chunked else (
                pieces[0] if len(pieces) == 1 else b"".join(pieces))
            while out:
                out = upstream.send_body(out)
                if out:
                    early = _read_early(conn, request, record, upstream)
                    if early is not None:
                        return early
    conn.buf = body.rest
    if chunked:
        upstream.send(http11.LAST_CHUNK)
    return _read_final(conn, request, record, upstream)


def _await_continue(conn: "Connection", request: Request, record: Record,
                    upstream: _Upstream) -> Optional[Response]:
    """Wait briefly for the origin's answer to Expect: relay a 100, or return a final
    answer; None after the wait (the origin ignores Expect) or after a 100."""
    try:
        response = upstream.read_head(conn.settings["max_header_size"],
                                      time.monotonic() + EXPECT_WAIT)
    except UpstreamTimeout:
        return None
    if response.status == 100:
        if request.version == "HTTP/1.1":
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n", record)
        return None
    if 100 < response.status < 200:
        upstream.buf = _head_bytes_again(response) + upstream.buf
        return None
    upstream.body_skipped = True
    return response


def _head_bytes_again(response: Response) -> bytes:
    reason = response.reason or http11.reason_phrase(response.status)
    return http11.serialize_head(f"{response.version} {response.status} {reason}",
                                 response.headers)


def _read_final(conn: "Connection", request: Request, record: Record,
                upstream: _Upstream) -> Response:
    """Read response heads, relaying interim 1xx answers, until a final one (or a 101);
    all of them within idle_timeout, so that interim answers cannot hold the client."""
    deadline = time.monotonic() + conn.settings["idle_timeout"]
    wait: Optional[IdleWait] = conn.idle_wait  # the first read: the deadline is its timeout
    while True:
        response = upstream.read_head(conn.settings["max_header_size"], deadline, wait)
        if _is_final(request, response):
            return response
        wait = None
        _relay_interim(conn, request, record, response)


def _read_early(conn: "Connection", request: Request, record: Record,
                upstream: _Upstream) -> Optional[Response]:
    """The upstream spoke while the request body was going up. A final answer (413, say) is
    the response: the rest of the body is never read, so the client's connection closes after
    it, and the upstream's is not reused. An interim one is relayed: None, send on."""
    response = upstream.read_head(conn.settings["max_header_size"],
                                  time.monotonic() + conn.settings["idle_timeout"])
    if _is_final(request, response):
        upstream.body_skipped = True
        return response
    _relay_interim(conn, request, record, response)
    return None


def _is_final(request: Request, response: Response) -> bool:
    if response.status >= 200 or response.status == 101:
        if response.status == 101 and not wants_upgrade(request):
            raise UpstreamError("101 without an Upgrade request")
        return True
    return False


def _relay_interim(conn: "Connection", request: Request, record: Record,
                   response: Response) -> None:
    if request.version == "HTTP/1.1":
        fields = _end_to_end(response.headers)
        conn.send(http11.serialize_head(
            f"HTTP/1.1 {response.status} {http11.reason_phrase(response.status)}",
            fields), record)


def _switch(conn: "Connection", request: Request, record: Record, upstream: _Upstream,
            response: Response) -> bool:
    """101 Switching Protocols: pass the head on, then relay bytes both ways."""
    fields = _end_to_end(response.headers)
    fields += [("Connection", "Upgrade"), ("Upgrade", response.headers.get("upgrade") or "")]
    conn.send(http11.serialize_head("HTTP/1.1 101 Switching Protocols", fields), record)
    record.status = 101
    to_client, upstream.buf = upstream.buf, b""
    to_upstream, conn.buf = conn.buf, b""
    record.close_reason = relay(conn.sock, upstream.sock, record, conn.settings["idle_timeout"],
                                to_upstream=to_upstream, to_client=to_client)
    return False


def _abort(sock: socket.socket) -> None:
    """Make the coming close of ``sock`` a reset: an answer that ends at the close (an HTTP/1.0
    client's, with no Content-Length) has no other way to say that it was cut."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _relay_response(conn: "Connection", request: Request, record: Record,
                    upstream: _Upstream, response: Response,
                    body: http11.BodyReader) -> tuple[bool, bool]:
    """Send the response head and stream its body; (client keep-alive, upstream reusable)."""
    skipped = upstream.body_skipped
    reader = http11.response_body_reader(request.method, response)
    connection = response.headers.tokens("connection")
    upstream_keeps = (response.version == "HTTP/1.1" and "close" not in connection) or (
        "keep-alive" in connection)
    length = response.headers.get("content-length")
    headers = Headers(_end_to_end(response.headers))
    via = conn.gen.via
    if via:
        headers.add("Via", f"{response.version[5:]} {via}")
    edited = Response(response.status, headers, b"", response.reason, response.version)
    conn.hooks.on_response(conn.ctx, request, edited)
    # Framing is the core's: whatever a plugin did, it is set here from the reader.
    headers = edited.headers
    for name in ("content-length", "transfer-encoding", "connection"):
        headers.remove(name)
    chunk = False
    client_keep = client_keeps_alive(request) and body.done and not skipped
    if isinstance(reader, http11.LengthReader) or (
            isinstance(reader, http11.NoBody) and length is not None
            and response.status not in (204, 304) and response.status >= 200):
        headers.add("Content-Length", (length or "0").strip())
    elif isinstance(reader, (http11.ChunkedReader, http11.UntilCloseReader)):
        if request.version == "HTTP/1.1":
            headers.add("Transfer-Encoding", "chunked")
            chunk = True
        else:
            client_keep = False
    # An upgrade the origin declined: bytes the client sent behind the head may be the
    # other protocol's, never a next request.
    client_keep = client_keep and not conn.server.stopping and not conn.switch_refused(
        request, response.status)
    if not client_keep:
        headers.add("Connection", "close")
    elif request.version == "HTTP/1.0":
        headers.add("Connection", "keep-alive")
    reason = edited.reason or http11.reason_phrase(edited.status)
    out = http11.serialize_head(f"HTTP/1.1 {edited.status} {reason}", headers)
    record.status, record.content_type = edited.status, headers.get("content-type")
    data = upstream.buf
    upstream.buf = b""
    try:
        while True:
            pieces = reader.feed(data) if data else []
            for piece in pieces:
                if piece:
                    out += http11.encode_chunk(piece) if chunk else piece
            if reader.done:
                break
            if out:
                conn.send(out, record)
                out = b""
            data = upstream.recv()
            if not data:
                reader.eof()  # fine for a close-delimited body; an error for any other
                break
    except ProxyError as exc:
        if conn.answered and not chunk and not isinstance(reader, http11.LengthReader):
            _abort(conn.sock)
        if isinstance(exc, ConnectionTerminated):  # RFC 9209: the head came, so incomplete
            raise UpstreamError(f"response body cut: {exc.detail}") from None
        raise
    if chunk:
        out += http11.LAST_CHUNK
    if out:
        conn.send(out, record)
    reusable = (reader.delimited and reader.done and not reader.rest and upstream_keeps
                and body.done and not skipped)
    return client_keep, reusable
