"""Plain HTTP forwarding: one absolute-form request to its origin and the answer back.

The request goes upstream in origin-form (absolute-form to a parent proxy) with hop-by-hop
fields removed, Host rewritten from the target and Via added (protocol/semantics.py makes
the head); both bodies are streamed piece by piece, never held whole, between the upstream
socket and the client's ``Exchange``, which frames the answer as the client's protocol
does. Upstream connections are reused from the pool only after a response whose framing
ended cleanly.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Optional

from ..errors import (
    ClientError,
    ConnectionTerminated,
    ParentRefused,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
)
from ..models import Record, Request, Response, Route
from ..net.sockets import IdleWait, peek, send_all
from ..net.upstream import basic_credentials
from ..protocol import http11
from ..protocol.semantics import (
    Framing,
    answer_framing,
    end_to_end,
    is_final,
    max_forwards,
    max_forwards_answer,
    proxy_status_error,
    response_fields,
    upstream_head,
    without_framing,
)
from .connect import open_upstream
from .exchange import Exchange, Scope

__all__ = ["forward", "answer", "read_small_body", "RECV_SIZE"]

RECV_SIZE = 64 * 1024
#: How long to wait for an origin's "100 Continue" before sending the body anyway (as curl).
EXPECT_WAIT = 1.0


def read_small_body(client: Exchange, limit: int) -> bytes:
    """Read a request body meant for the proxy itself, up to ``limit`` bytes."""
    out: list[bytes] = []
    size = 0
    while not client.body_done:
        for piece in client.read_body():
            size += len(piece)
            if size > limit:
                raise ClientError("body too large for a local request")
            out.append(piece)
    return b"".join(out)


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
        #: An interim answer read while waiting for a 100, for the next ``read_head``.
        self.held: Optional[Response] = None

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
        if self.held is not None:
            held, self.held = self.held, None
            return held
        if self.parser is None:
            self.parser = http11.ResponseHeadParser(max_size)
        idle: Optional[float] = None  # the socket's timeout, once set aside for the deadline
        try:
            if first_wait is not None and not self.buf:
                data = self.recv(first_wait)
                response = self._parse_head(data)
                if response is not None:
                    return response
            while True:
                if idle is None:
                    idle = self.sock.gettimeout()
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
            if idle is not None:
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


def forward(scope: Scope, client: Exchange, request: Request, record: Record) -> bool:
    """Forward one plain request; True if the client connection may serve another."""
    framing = client.framing()  # a body framed wrong is refused before anything is asked
    hops = max_forwards(request)
    if hops == 0:
        return answer(client, max_forwards_answer(request), record, request)
    routes = scope.hooks.route(scope.ctx, request)
    pool = scope.pool
    for route in routes:  # a pooled connection by any of the routes, in their order
        key = (route, request.host, request.port)
        pooled = pool.get(key)
        if pooled is not None:
            try:
                return _Forwarding(scope, client, request, record, framing).run(
                    _Upstream(*pooled, reused=True), route, key)
            except _Stale:
                scope.log.debug("pooled upstream connection was stale; opening a new one")
            break
    while True:
        sock, address, _, route = open_upstream(scope, request, record, routes)
        upstream = _Upstream(sock, address, reused=False)
        try:
            return _Forwarding(scope, client, request, record, framing).run(
                upstream, route, (route, request.host, request.port))
        except _Stale as stale:
            assert route is not None  # only a parent's new connection is retried
            scope.log.info("parent %s failed: %s", route.authority, stale)
            scope.hooks.route_failed(scope.ctx, request, route, stale.error)
            routes = routes[routes.index(route) + 1:]
            if not routes:
                raise stale.error from None


def answer(client: Exchange, response: Response, record: Record,
           request: Optional[Request] = None, close: bool = False) -> bool:
    """Send a whole answer the proxy made (or a plugin did) in forwarding's place; True if
    the connection may serve another request (never with ``close``)."""
    headers = without_framing(response.headers.copy())
    if response.status >= 200 and response.status not in (204, 304):
        headers.add("Content-Length", str(len(response.body)))
    if record.error is None:  # a plugin's answer names its cause in Proxy-Status
        record.error = proxy_status_error(headers.get("proxy-status"))
    record.status, record.content_type = response.status, headers.get("content-type")
    keep = client.send_head(response.status,
                            response.reason or http11.reason_phrase(response.status),
                            headers, open_ended=False, keep=not close)
    head_only = request is not None and request.method == "HEAD"
    client.send_body([b""] if head_only else [response.body], end=True)
    return keep


class _Forwarding:
    """One request on one upstream connection: its head and body up, its answer back."""

    def __init__(self, scope: Scope, client: Exchange, request: Request, record: Record,
                 framing: Framing) -> None:
        self.scope = scope
        self.framing = framing
        self.client = client
        self.request = request
        self.record = record
        self.core = scope.core

    def run(self, upstream: _Upstream, route: Optional[Route], key: tuple) -> bool:
        """Forward on ``upstream``; True if the client connection may serve another."""
        scope, client, request, record = self.scope, self.client, self.request, self.record
        idle_timeout = self.core["idle_timeout"]
        if upstream.sock.gettimeout() != idle_timeout:  # a pooled one has it already
            upstream.sock.settimeout(idle_timeout)
        reusable = False
        try:
            framing = self.framing
            head = upstream_head(
                request, framing, forwarded=self.core["forwarded_for"],
                client_ip=scope.ctx.client_ip, via=scope.via, parent=route is not None,
                proxy_authorization=basic_credentials(route) if route is not None and (
                    route.username or route.password) else None)
            record.upstream_addr, record.route = upstream.address[:2], route
            try:
                upstream.send(head)
                if client.body_done:
                    response = self._read_final(upstream)
                else:
                    response = self._send_body(upstream, framing == ("Transfer-Encoding",
                                                                     "chunked"))
            except ConnectionTerminated as exc:
                if (upstream.reused or route is not None) and not upstream.heard and (
                        not client.has_body):
                    raise _Stale(exc) from None
                raise
            if route is not None and response.status == 407:
                # The parent wants credentials we do not have: the client's own 407 would
                # make it send its credentials to us, for the parent. A gateway error.
                raise ParentRefused(f"parent {route.host} answered 407", parent_status=407)
            if response.status == 101:
                return self._switch(upstream, response)
            keep, reusable = self._relay_response(upstream, response)
            return keep
        finally:
            if reusable and not scope.stopping:
                # Pooled with its timeout: nothing waits on it there (the pool peeks), and
                # the next request on it sets it only if idle_timeout changed.
                scope.pool.put(key, upstream.sock, upstream.address)
            else:
                upstream.sock.close()

    def _send_body(self, upstream: _Upstream, chunked: bool) -> Response:
        """Stream the request body upstream; honours ``Expect: 100-continue``.

        Returns the final response head (read after the body, or before it when the origin
        answered the expectation with a final status)."""
        client = self.client
        if "100-continue" in self.request.headers.tokens("expect"):
            early = self._await_continue(upstream)
            if early is not None:
                return early  # the body was never sent; the upstream cannot be reused
        while not client.body_done:
            pieces = client.read_body()
            if not pieces:
                continue
            if chunked:
                out = b"".join(http11.encode_chunk(p) for p in pieces if p)
            else:
                out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            while out:
                out = upstream.send_body(out)
                if out:
                    early = self._read_early(upstream)
                    if early is not None:
                        return early
        if chunked:
            upstream.send(http11.LAST_CHUNK)
        return self._read_final(upstream)

    def _await_continue(self, upstream: _Upstream) -> Optional[Response]:
        """Wait briefly for the origin's answer to Expect: relay a 100, or return a final
        answer; None after the wait (the origin ignores Expect) or after a 100."""
        try:
            response = upstream.read_head(self.core["max_header_size"],
                                          time.monotonic() + EXPECT_WAIT)
        except UpstreamTimeout:
            return None
        if response.status == 100:
            self.client.send_interim(100, [])
            return None
        if 100 < response.status < 200:
            upstream.held = response  # relayed by the wait for the final answer
            return None
        upstream.body_skipped = True
        return response

    def _read_final(self, upstream: _Upstream) -> Response:
        """Read response heads, relaying interim 1xx answers, until a final one (or a 101);
        all of them within idle_timeout, so that interim answers cannot hold the client."""
        deadline = time.monotonic() + self.core["idle_timeout"]
        # The first read: the deadline is the timeout of the scope's reused timer.
        wait: Optional[IdleWait] = self.scope.idle_wait
        while True:
            response = upstream.read_head(self.core["max_header_size"], deadline, wait)
            if is_final(self.request, response):
                return response
            wait = None
            self._relay_interim(response)

    def _read_early(self, upstream: _Upstream) -> Optional[Response]:
        """The upstream spoke while the request body was going up. A final answer (413, say)
        is the response: the rest of the body is never read, so the client's connection
        closes after it, and the upstream's is not reused. An interim one is relayed: None,
        send on."""
        response = upstream.read_head(self.core["max_header_size"],
                                      time.monotonic() + self.core["idle_timeout"])
        if is_final(self.request, response):
            upstream.body_skipped = True
            return response
        self._relay_interim(response)
        return None

    def _relay_interim(self, response: Response) -> None:
        self.client.send_interim(response.status, end_to_end(response.headers))

    def _switch(self, upstream: _Upstream, response: Response) -> bool:
        """101 Switching Protocols: pass the head on, then relay bytes both ways."""
        fields = end_to_end(response.headers)
        fields += [("Connection", "Upgrade"), ("Upgrade", response.headers.get("upgrade") or "")]
        self.record.status = 101
        to_client, upstream.buf = upstream.buf, b""
        self.record.close_reason = self.client.upgrade(
            fields, upstream.sock, to_client, self.record, self.core["idle_timeout"])
        return False

    def _relay_response(self, upstream: _Upstream, response: Response) -> tuple[bool, bool]:
        """Send the answer's head and stream its body; (client keep-alive, upstream
        reusable)."""
        scope, client, request, record = self.scope, self.client, self.request, self.record
        skipped = upstream.body_skipped
        reader = http11.response_body_reader(request.method, response)
        connection = response.headers.tokens("connection")
        upstream_keeps = (response.version == "HTTP/1.1" and "close" not in connection) or (
            "keep-alive" in connection)
        length, open_ended = answer_framing(reader, response)
        edited = Response(response.status, response_fields(response, scope.via), b"",
                          response.reason, response.version)
        scope.hooks.on_response(scope.ctx, request, edited)
        # Framing is the core's: whatever a plugin did, it is set here from the reader.
        headers = without_framing(edited.headers)
        if length is not None:
            headers.add("Content-Length", length)
        record.status, record.content_type = edited.status, headers.get("content-type")
        keep = client.send_head(edited.status,
                                edited.reason or http11.reason_phrase(edited.status),
                                headers, open_ended, keep=not skipped)
        data = upstream.buf
        upstream.buf = b""
        try:
            while True:
                pieces = reader.feed(data) if data else []
                if reader.done:
                    break
                client.send_body(pieces)
                data = upstream.recv()
                if not data:
                    reader.eof()  # fine for a close-delimited body; an error for any other
                    pieces = []
                    break
        except ProxyError as exc:
            if client.answered:
                client.abort()
            if isinstance(exc, ConnectionTerminated):  # RFC 9209: the head came: incomplete
                raise UpstreamError(f"response body cut: {exc.detail}") from None
            raise
        client.send_body(pieces, end=True)
        reusable = (reader.delimited and reader.done and not reader.rest and upstream_keeps
                    and client.body_done and not skipped)
        return keep, reusable
