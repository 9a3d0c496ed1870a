"""HTTP/1.1 from clients: one request after another on a connection, each a Transaction.

The head is read here (header_timeout for the first, idle_timeout then header_timeout for
the next); the answer is serialized here (``HTTP1Exchange``); a tunnel relays the client's
socket itself. Whether the connection may go on after an answer is decided here too: it
closes whenever what follows cannot be framed with certainty.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Callable, Optional, Sequence

import gevent

from ..errors import ClientError, ClientGone, HeaderTimeout, ProxyError, TooManyConnections
from ..models import Headers, Record, Request
from ..protocol import http11
from ..protocol.semantics import (
    CHUNKED,
    Framing,
    client_keeps_alive,
    error_response,
    request_has_body,
    wants_upgrade,
)
from ..relay.forward import answer
from ..relay.tunnel import SocketRelay, open_relay, relay
from .client import RECV_SIZE, ClientConnection
from .transaction import Transaction

__all__ = ["serve_http1", "answer_unasked"]


def serve_http1(conn: ClientConnection) -> None:
    """Serve ``conn``'s requests until one ends it (or its client closes, or a stop)."""
    side = HTTP1Side(conn)
    while Transaction(conn.server, side, conn.ctx, conn.gen, conn.idle_wait, conn.log,
                      conn.refusal).serve():
        pass
    if conn.refusal is not None and side.unasked is not None:
        conn.refused_unasked(side.unasked)


def answer_unasked(conn: ClientConnection, exc: ProxyError) -> None:
    """Answer ``exc`` in HTTP/1.1 to a client that sent no request the proxy read (plain
    HTTP to a TLS listener, one over max_connections), then close: said briefly, never
    waiting long on a client that may not read."""
    conn.sock.settimeout(1.0)
    record = Record(conn.ctx)  # not written: no request was read
    try:
        answer(HTTP1Exchange(conn, None, record), error_response(exc, conn.gen.proxy_name),
               record, close=True)
    except ClientGone:
        pass


def refuse_over_limit(conn: ClientConnection) -> None:
    """max_connections reached: a 503 in clear, or, on a TLS port, nothing (a 503 would read
    as garbage to a TLS client, and a handshake only to refuse costs what the limit is
    there to spare)."""
    if not conn.tls:
        answer_unasked(conn, TooManyConnections("max_connections reached"))


class HTTP1Side:
    """How a Transaction's request comes and goes on an HTTP/1.1 connection."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        #: The record of a refused client's turn that brought no request (closed, silent).
        self.unasked: Optional[Record] = None

    def read_request(self, record: Record) -> Optional[Request]:
        """The next request head, or None when the client closed or kept silent first."""
        conn = self.conn
        core = conn.server.gen.core  # the next request's options: those in force
        parser = http11.RequestHeadParser(core["max_header_size"])
        header_timeout = core["header_timeout"]
        sock = conn.sock
        # A new connection's first head is due header_timeout after accept; a later one
        # may wait idle_timeout for its first byte, then has header_timeout for the rest.
        # Socket timeouts cost nothing when the bytes are already there, unlike a timer.
        deadline = conn.ctx.started + header_timeout if conn.ctx.requests == 0 else 0.0
        if not conn.buf:
            # Between requests the connection waits: a graceful stop may end it here.
            waiting = conn.server.waiting
            waiting.add(gevent.getcurrent())
            try:
                if deadline:
                    sock.settimeout(max(deadline - time.time(), 0.001))
                    conn.buf = sock.recv(RECV_SIZE)
                else:  # bounded by the connection's reused timer, not a new one
                    conn.buf = conn.idle_wait.recv(sock, RECV_SIZE)
            except OSError:  # a timeout, a reset: nothing was asked, nothing to answer
                conn.buf = b""
            finally:
                waiting.discard(gevent.getcurrent())
            if not conn.buf:
                self.unasked = record
                return None
        record.started = time.time()
        if not deadline:
            deadline = record.started + header_timeout
        try:
            while True:
                data, conn.buf = (conn.buf, b"") if conn.buf else (sock.recv(RECV_SIZE), b"")
                if not data:
                    if parser.started:
                        raise ClientGone("client closed in the middle of a head")
                    self.unasked = record
                    return None
                request = parser.feed(data)
                if request is not None:
                    conn.buf = parser.rest
                    record.bytes_in += parser.size
                    if sock.gettimeout() != core["idle_timeout"]:  # after the deadline's
                        sock.settimeout(core["idle_timeout"])
                    return request
                left = deadline - time.time()
                if left <= 0:
                    raise HeaderTimeout("request head not received in time")
                sock.settimeout(left)
        except socket.timeout:
            raise HeaderTimeout("request head not received in time") from None
        except OSError as exc:
            raise ClientGone(f"reading the head: {exc}") from None

    def client(self, request: Optional[Request], record: Record) -> "HTTP1Exchange":
        return HTTP1Exchange(self.conn, request, record)

    def detached(self, transaction: Transaction) -> Callable[..., Any]:
        """The connection's tunnel goes on with no greenlet: the server counts it as
        detached, and its end is spawned into the server's connections."""
        self.conn.detached = transaction
        return self.conn.server.detach(self.conn)  # type: ignore[no-any-return]

    def detached_ended(self) -> None:
        """What the connection's greenlet would have done at its end."""
        conn = self.conn
        try:
            conn.gen.hooks.on_disconnect(conn.ctx)
        finally:
            conn.server.release_detached(conn)


class HTTP1Exchange:
    """The client side of one HTTP/1.1 request: its body read from the connection, its
    answer serialized onto it."""

    __slots__ = ("conn", "request", "record", "answered", "body", "body_done", "_bad_framing",
                 "_head", "_chunked", "_until_close")

    def __init__(self, conn: ClientConnection, request: Optional[Request],
                 record: Record) -> None:
        self.conn = conn
        self.request = request
        self.record = record
        self.answered = False
        #: The request body's reader. A request whose framing is bad has none that reads:
        #: it is refused (400) when its body is first needed, after the hooks saw it.
        self.body: http11.BodyReader
        self._bad_framing: Optional[ClientError] = None
        try:
            self.body = (http11.request_body_reader(request) if request is not None
                         else http11.NoBody())
        except ClientError as exc:
            self.body, self._bad_framing = _UNREAD, exc
        #: The request body was read to its end (or it has none).
        self.body_done = self.body.done
        #: The answer's head, sent with its first body bytes.
        self._head = b""
        self._chunked = False
        #: The answer's body ends where the connection does (no length, no chunks).
        self._until_close = False

    # -- the request body -------------------------------------------------------------

    @property
    def has_body(self) -> bool:
        return self.request is not None and request_has_body(self.request)

    def framing(self) -> Framing:
        if self._bad_framing is not None:
            raise self._bad_framing
        body = self.body
        if isinstance(body, http11.ChunkedReader):
            return CHUNKED
        if isinstance(body, http11.LengthReader):
            return ("Content-Length", str(body.remaining))
        return None

    def read_body(self) -> list[bytes]:
        if self._bad_framing is not None:
            raise self._bad_framing
        conn, body = self.conn, self.body
        data = conn.recv()
        if not data:
            raise ClientGone("client closed in the middle of the request body")
        pieces = body.feed(data)
        # What follows the body is the next request's: counted there, never here (a count
        # told to on_progress cannot go back).
        if body.done:
            self.body_done = True
            conn.buf = body.rest
            self.record.bytes_in += len(data) - len(body.rest)
        else:
            self.record.bytes_in += len(data)
        return pieces

    # -- the answer -----------------------------------------------------------------------

    def send_interim(self, status: int, fields: list[tuple[str, str]]) -> None:
        if self.request is not None and self.request.version == "HTTP/1.1":
            self._send(http11.serialize_head(
                f"HTTP/1.1 {status} {http11.reason_phrase(status)}", fields))

    def send_head(self, status: int, reason: str, headers: Headers, open_ended: bool,
                  keep: bool) -> bool:
        request = self.request
        # A head not sent yet (an error found in the first body bytes) is replaced whole.
        self._chunked = self._until_close = False
        keep = keep and request is not None and self._may_go_on(request, status)
        if open_ended:
            if request is not None and request.version == "HTTP/1.1":
                headers.add("Transfer-Encoding", "chunked")
                self._chunked = True
            else:
                keep = False
                self._until_close = True
        if not keep:
            headers.add("Connection", "close")
        elif request is not None and request.version == "HTTP/1.0":
            headers.add("Connection", "keep-alive")
        self._head = http11.serialize_head(f"HTTP/1.1 {status} {reason}", headers)
        return keep

    def _may_go_on(self, request: Request, status: int) -> bool:
        """Whether the connection may serve another request after this answer: not when the
        client or a stop ends it, nor when what follows cannot be framed with certainty (a
        request body left unread, a CONNECT answered 2xx without a tunnel (the client takes
        it for one), a refused switch of protocols with bytes behind its head), nor after
        the answer to a client refused at connect."""
        conn = self.conn
        if conn.server.stopping or conn.refusal is not None or not client_keeps_alive(request):
            return False
        if not self.body_done:
            return False
        if request.is_connect and 200 <= status < 300:
            return False
        return not self._switch_refused(request, status)

    def _switch_refused(self, request: Request, status: int) -> bool:
        """Whether the client may have begun another protocol after ``request``, which was
        answered ``status`` instead: it asked to switch (CONNECT, or Upgrade), the answer
        did not switch (not 2xx, not 101), and bytes followed its head, read already or
        waiting. A client may send its first tunnel or WebSocket bytes before the answer
        (RFC 9110 9.3.6, 7.8); after a refusal they are no request, so the connection must
        close after the answer, and nothing of them is read. With nothing behind the head
        the client waited, and the connection may go on (a 407's retry, say)."""
        if request.is_connect:
            if 200 <= status < 300:
                return False
        elif status == 101 or not wants_upgrade(request):
            return False
        return self.conn.sent_more()

    def send_body(self, pieces: Sequence[bytes], end: bool = False) -> None:
        out = self._head
        self._head = b""
        if self._chunked:
            out += b"".join(http11.encode_chunk(piece) for piece in pieces if piece)
            if end:
                out += http11.LAST_CHUNK
        elif pieces:
            out += b"".join(pieces)
        if out:
            self._send(out)

    def _send(self, data: bytes) -> None:
        self.conn.send(data)
        record = self.record
        if not self.answered:
            self.answered = True
            record.first_byte_time = time.time() - record.started
        record.bytes_out += len(data)

    def abort(self) -> None:
        """An answer that ends at the close (an HTTP/1.0 client's, with no length) has no
        other way to say that it was cut: the coming close becomes a reset."""
        if self.answered and self._until_close:
            try:
                self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
            except OSError:
                pass

    def finish(self, cut: bool) -> None:
        """Nothing more to write: a connection that may not go on is closed by its server."""

    def cancel(self) -> None:
        """Cut: the connection closes with it."""

    def require_http11(self) -> bool:
        return False

    def upgrade(self, fields: list[tuple[str, str]], upstream: socket.socket,
                to_client: bytes, record: Record, idle_timeout: float) -> str:
        self._send(http11.serialize_head("HTTP/1.1 101 Switching Protocols", fields))
        to_upstream, self.conn.buf = self.conn.buf, b""
        return relay(self.conn.sock, upstream, record, idle_timeout,
                     to_upstream=to_upstream, to_client=to_client)

    def tunnel(self, upstream: socket.socket, record: Record, early: bytes,
               inspect: Optional[Callable[[bytes], bool]],
               idle_timeout: float) -> tuple[SocketRelay, str]:
        """"200 Connection Established", then the socket relay, with what the client sent
        behind its CONNECT (a TLS ClientHello, say) first in line upstream."""
        self._send(http11.serialize_head("HTTP/1.1 200 Connection Established", []))
        record.status = 200
        to_upstream, self.conn.buf = self.conn.buf, b""
        return open_relay(self.conn.sock, upstream, record, idle_timeout,
                          to_upstream=to_upstream, to_client=early, inspect=inspect)


class _Unread(http11.BodyReader):
    """The reader of a body whose framing is bad: never done, never read."""

    done = False


_UNREAD = _Unread()
