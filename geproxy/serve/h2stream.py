"""One stream of an HTTP/2 connection (http2.py), served as a request on a connection of
its own would be: the same hooks, errors and forwarding code (``Connection``'s), with the
stream's DATA as the request body and the answer's bytes turned into HEADERS and DATA.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

import gevent
import gevent.event
import h2.errors
import h2.exceptions

from ..errors import ClientError, ClientGone, InternalError, ProxyError, UpstreamTimeout
from ..models import Headers, Record, Request
from ..protocol import http11
from ..relay import tunnel
from ..relay.h2tunnel import StreamRelay
from .connection import Connection

if TYPE_CHECKING:
    from .http2 import _H2Connection

__all__ = ["H2Stream"]

#: Fields of HTTP/1.1 that HTTP/2 forbids (RFC 9113 section 8.2.2).
_CONNECTION_FIELDS = frozenset({"connection", "keep-alive", "proxy-connection",
                                "transfer-encoding", "upgrade"})
_CANCEL = h2.errors.ErrorCodes.CANCEL
_INTERNAL = h2.errors.ErrorCodes.INTERNAL_ERROR


class _Reset(Exception):
    """The stream was reset by the client, or its connection ended."""


class _StreamSocket:
    """What forward.py may ask of a client socket, for a stream: an abortive close there
    (SO_LINGER 0, for a cut answer) is a reset of the stream here."""

    def __init__(self, stream: "H2Stream") -> None:
        self.stream = stream

    def setsockopt(self, *args: Any) -> None:
        self.stream.must_reset = True


class H2Stream(Connection):
    """One stream: served as one request on a connection of its own would be. Its context
    is a copy of the connection's, with an id of its own (``c12-3`` for stream 3 of
    ``c12``), so ``/tunnels`` lists and closes streams one by one, and what one stream's
    request sets (its user, its stash) is not another's."""

    def __init__(self, owner: "_H2Connection", stream_id: int, fields: list[tuple[str, str]],
                 ended: bool) -> None:
        conn = owner.conn
        # The stash starts as a copy of the connection's (what plugins noted at connect
        # time holds for every stream); what one stream's request notes is its own.
        ctx = dataclasses.replace(conn.ctx, conn_id=f"{conn.ctx.conn_id}-{stream_id}",
                                  user=None, requests=0, stash=dict(conn.ctx.stash))
        # No socket of its own: what forward.py may ask of one is answered by _StreamSocket.
        super().__init__(conn.server, conn.conn_gen,
                         _StreamSocket(self),  # type: ignore[arg-type]
                         ctx.client_addr, ctx.server_addr, tls=True, ctx=ctx)
        # A stream is a request: decided by the configuration in force when it came.
        self.follow(conn.server.gen)
        #: The relay of a CONNECT stream, once its DATA goes straight to it; ``detached``
        #: too when no greenlet waits for its end.
        self.relay: Optional[StreamRelay] = None
        self.detached: Optional[StreamRelay] = None
        self.owner: "_H2Connection" = owner
        self.stream_id = stream_id
        self.fields = fields
        #: Request body (or tunnel) bytes from the client with their flow-controlled size
        #: (padding included); None for its END_STREAM.
        self.inbound: deque[Optional[tuple[bytes, int]]] = deque()
        self.arrived = gevent.event.Event()
        #: Set when the send window may have grown (WINDOW_UPDATE, SETTINGS) or at a cut.
        self.window = gevent.event.Event()
        self.client_ended = ended
        #: The request's HEADERS ended the stream: it has no body.
        self.bodiless = ended
        self.unacked = 0
        self.cut_by: Optional[str] = None
        self.must_reset = False
        self._writer: Optional[Any] = None
        #: A plain request without Content-Length: its DATA is passed on chunked.
        self.chunk_body = False
        #: Refused at connect: this stream, the connection's one, is answered with it.
        self.refusal = conn.refusal

    # -- from the connection's greenlet ---------------------------------------------------

    def received(self, data: Optional[bytes], size: int) -> None:
        item: Optional[tuple[bytes, int]] = None
        if data is None:
            self.client_ended = True
        else:
            self.unacked += size
            item = (data, size)
        if self.relay is not None:
            self.relay.from_client(item)
            return
        self.inbound.append(item)
        self.arrived.set()

    def window_opened(self) -> None:
        self.window.set()
        if self.relay is not None:
            self.relay.window_opened()

    def cut(self, reason: str) -> None:
        """The client reset the stream, or the connection ended: stop serving it."""
        if self.cut_by is None:
            self.cut_by = reason
            self.arrived.set()
            self.window.set()
            if self.relay is not None:
                self.relay.abort(reason, None)
            greenlet = self.greenlet
            if greenlet is not None and greenlet is not gevent.getcurrent():
                greenlet.kill(_Reset(reason), block=False)

    def close(self, reason: str) -> None:
        """From the admin listener (or a stop): reset this stream, the others go on."""
        self.cut_reason = reason
        if self.detached is not None:
            self.detached.abort(reason)
        elif self.greenlet is not None:
            self.greenlet.kill(block=False)

    # -- the stream's greenlet ------------------------------------------------------------

    def run(self) -> None:
        ctx = self.ctx
        record = Record(ctx)
        record.version = "HTTP/2"
        request: Optional[Request] = None
        self.greenlet = gevent.getcurrent()
        try:
            try:
                request = self._make_request()
                ctx.requests += 1
                record.request = request
                record.method, record.target = request.method, request.target
                self.record = record
                self.server.active[ctx.conn_id] = self
                self._dispatch(request, record)
                if self.detached is not None:
                    return  # the tunnel relays on; its end writes the record
                self._end(cut=False)
            except (_Reset, ClientGone, h2.exceptions.ProtocolError):
                # Reset or gone, whichever noticed first: the client's doing (h2 refuses
                # frames on a stream or connection the client already closed).
                record.close_reason = record.close_reason or self.cut_by or "client"
            except ProxyError as exc:
                cut = self.answered  # an answer begun cannot become an error: reset
                self._fail(exc, record, request)
                self._end(cut)
            except Exception as exc:  # a bug, or a plugin that raised: fail closed
                self.log.exception("internal error")
                cut = self.answered
                self._fail(InternalError(repr(exc)), record, request)
                self._end(cut)
        except gevent.GreenletExit:
            record.close_reason = self.cut_reason
            self.reset(_CANCEL)
            try:
                self._close_record(record)
            finally:
                self.let_go()
            raise
        finally:
            self.idle_wait.close()
            if self.detached is None:
                self.server.active.pop(ctx.conn_id, None)
                self.record = None
                self.owner.ended(self)
        try:
            self._close_record(record)
        finally:
            self.let_go()

    def _make_request(self) -> Request:
        pseudo: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        cookies: list[str] = []
        for name, value in self.fields:
            if name.startswith(":"):
                pseudo[name] = value
            elif name == "cookie":
                cookies.append(value)  # split for HTTP/2 (RFC 9113 8.2.3), one for 1.1
            else:
                headers.append((name, value))
        if cookies:
            headers.append(("cookie", "; ".join(cookies)))
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority", "")
        if ":protocol" in pseudo:
            raise ClientError("extended CONNECT is not supported")
        if method == "CONNECT":
            target = authority
        else:
            scheme = pseudo.get(":scheme", "")
            if scheme != "http" or not authority:
                # Only a request for the proxy itself (/healthz, the PAC file) is not
                # http://: anything else would be forwarded as what the client did not ask.
                target = pseudo.get(":path", "")
                if authority:
                    self._check_addressed_to_us(authority, scheme)
                    headers.append(("host", authority))
            else:
                target = f"http://{authority}{pseudo.get(':path', '/')}"
            if not self.bodiless and "content-length" not in (k for k, _ in headers):
                headers.append(("transfer-encoding", "chunked"))
                self.chunk_body = True
        return http11.make_request(method, target, "HTTP/2", Headers(headers, frozen=True))

    def _check_addressed_to_us(self, authority: str, scheme: str) -> None:
        host, _, port = authority.rpartition(":")
        if not host or not port.isdigit():
            host, port = authority, "443" if scheme == "https" else "80"
        probe = Request("GET", "/", "HTTP/2", Headers(), scheme, host.strip("[]"), int(port))
        if not self.server.is_local(probe, self.ctx):
            raise ClientError("only http:// targets are forwarded; use CONNECT for https")

    # -- what Connection's request code calls ---------------------------------------------

    def recv(self) -> bytes:
        """The next piece of the request body; b"" after the client's END_STREAM."""
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        idle = self.settings["idle_timeout"]
        while not self.inbound:
            if self.cut_by is not None:
                raise _Reset(self.cut_by)
            self.arrived.clear()
            if not self.arrived.wait(idle) and not self.inbound:
                raise ClientGone("client sent nothing for idle_timeout")
        item = self.inbound.popleft()
        if item is None:
            self.inbound.appendleft(None)  # it stays at the end
            if self.chunk_body:
                self.chunk_body = False
                return http11.LAST_CHUNK
            return b""
        piece, size = item
        self.give_back(size)
        if self.chunk_body:
            return http11.encode_chunk(piece) if piece else b""
        return piece

    def sent_more(self) -> bool:
        """Never: a stream's DATA is framed by HTTP/2, so no byte of it can be taken for a
        next request, whatever the answer."""
        return False

    def give_back(self, size: int) -> None:
        """Bytes passed on: the client may send that many more on this stream."""
        size = min(size, self.unacked)
        if size and self.cut_by is None:
            self.unacked -= size
            self.owner._ack(size, self.stream_id)
            self.owner.flush()

    def send(self, data: bytes, record: Record) -> None:
        """An HTTP/1.1 answer from the request code (head, then body bytes) as HEADERS
        and DATA frames."""
        if self._writer is None:
            self._writer = _AnswerWriter(self)
        self._writer.feed(data)
        if not self.answered:
            self.answered = True
            record.first_byte_time = time.time() - record.started
        record.bytes_out += len(data)

    def _end(self, cut: bool) -> None:
        """The answer is whole: END_STREAM; a reset when it was cut after its start. A
        request whose body is still coming is then told to stop sending (NO_ERROR)."""
        if self.cut_by is not None:
            return
        if cut or self.must_reset:
            self.reset(_INTERNAL)
            return
        if self._writer is not None:
            self._writer.finish()
        if not self.client_ended:
            self.reset(h2.errors.ErrorCodes.NO_ERROR)

    def reset(self, code: int) -> None:
        if self.cut_by is None and not self.owner.closed:
            self.cut_by = "reset"
            try:
                self.owner.h2.reset_stream(self.stream_id, code)
                self.owner.flush()
            except (h2.exceptions.ProtocolError, OSError):
                pass

    def send_data(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` on this stream within its flow-control window, waiting (up to
        idle_timeout) for the client to open it."""
        owner = self.owner
        conn = owner.h2
        view = memoryview(data)
        idle = self.settings["idle_timeout"]
        while view or end:
            if self.cut_by is not None or owner.closed:
                raise _Reset(self.cut_by or "client")
            if owner.choked and not owner.wait_unchoked(idle):
                raise UpstreamTimeout("client took no bytes for idle_timeout")
            window = conn.local_flow_control_window(self.stream_id)
            size = min(window, len(view), conn.max_outbound_frame_size)
            if view and size <= 0:
                self.window.clear()
                if not self.window.wait(idle):
                    raise UpstreamTimeout("client took no bytes for idle_timeout")
                continue
            piece = view[:size].tobytes()
            view = view[size:]
            last = end and not view
            conn.send_data(self.stream_id, piece, end_stream=last)
            owner.flush()
            if last:
                break

    # -- tunnels --------------------------------------------------------------------------

    def _tunnel(self, request: Request, record: Record) -> None:
        routes = self.hooks.route(self.ctx, request)
        upstream, _, early, _ = self.open_upstream(request, record, routes)
        relay: Optional[StreamRelay] = None
        try:
            self.owner.h2.send_headers(self.stream_id, [(":status", "200")])
            self.owner.flush()
            self.answered = True
            record.status = 200
            record.first_byte_time = time.time() - record.started
            if early:  # what a parent sent after its 200
                self.send_data(early)
                record.bytes_out += len(early)
            settings = self.settings
            relay = StreamRelay(self, upstream, record, settings["idle_timeout"],
                                settings["max_tunnel_lifetime"])
            ended = gevent.event.Event()
            relay.on_done = lambda reason: ended.set()
            relay.start(settings["max_tunnel_lifetime"])
            if self.hooks.inspects_tunnels:
                self._inspect_first(request, record, relay)
            self.relay = relay  # from here the reader hands the client's DATA to it
            while self.inbound:
                relay.from_client(self.inbound.popleft())
            # A tunnel still relaying after DETACH_AFTER goes on with no greenlet: its end
            # is spawned when it comes (as tunnel.py's detached tunnels).
            if not ended.wait(tunnel.DETACH_AFTER) and not relay.finished:
                self.detached = relay
                self.greenlet = None
                relay.on_done = lambda reason: self.owner.group.spawn(
                    self._end_detached, upstream, record, reason)
                return
            record.close_reason = relay.reason or "done"
        finally:
            if self.detached is None:
                if relay is not None:
                    relay.close()
                upstream.close()

    def _inspect_first(self, request: Request, record: Record, relay: StreamRelay) -> None:
        """on_tunnel_data sees the client's first bytes (in this greenlet: plugins may do
        what greenlets do) before any goes upstream."""
        idle = self.settings["idle_timeout"]
        while not self.inbound and not relay.finished:
            if self.cut_by is not None:
                raise _Reset(self.cut_by)
            self.arrived.clear()
            if not self.arrived.wait(idle) and not self.inbound:
                relay.abort("idle timeout")
        item = self.inbound[0] if self.inbound else None
        if item is not None and not relay.finished and not self._inspect_tunnel(
                request, record, item[0]):
            relay.abort("denied")

    def _end_detached(self, upstream: socket.socket, record: Record, reason: str) -> None:
        """The end of a tunnel that relayed with no greenlet: what ``run`` does for the
        others."""
        relay = self.detached
        try:
            if relay is not None:
                relay.close()
            upstream.close()
            record.close_reason = reason
        finally:
            self.server.active.pop(self.ctx.conn_id, None)
            self.record = None
            self.owner.ended(self)
        try:
            self._close_record(record)
        finally:
            self.let_go()


class _AnswerWriter:
    """HTTP/1.1 answer bytes, as the request code writes them, turned into the stream's
    HEADERS (fields HTTP/2 forbids left out) and DATA frames."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.parser: Optional[http11.ResponseHeadParser] = http11.ResponseHeadParser(
            stream.settings["max_header_size"])
        self.started = False

    def feed(self, data: bytes) -> None:
        if self.parser is not None:
            response = self.parser.feed(data)
            if response is None:
                return
            data, self.parser = self.parser.rest, None
            fields = [(":status", str(response.status))]
            fields += [(k.lower(), v) for k, v in response.headers
                       if k.lower() not in _CONNECTION_FIELDS]
            if 100 <= response.status < 200:
                self.parser = http11.ResponseHeadParser(self.stream.settings["max_header_size"])
            self.stream.owner.h2.send_headers(self.stream.stream_id, fields)
            self.stream.owner.flush()
            self.started = True
        if data:
            self.stream.send_data(data)

    def finish(self) -> None:
        if self.started:
            self.stream.send_data(b"", end=True)
