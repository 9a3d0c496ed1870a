"""One stream of an HTTP/2 connection (http2.py), served as one request: a Transaction whose
client side (its ``Exchange``) is the stream. The request is made from the stream's
HEADERS, its body is the stream's DATA, and its answer goes out as HEADERS and DATA
frames; a CONNECT stream's tunnel is a StreamRelay (relay/h2tunnel.py).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections import deque
from typing import Any, Callable, Optional, Protocol, Sequence

import gevent
import gevent.event
import h2.errors
import h2.exceptions

from ..errors import ClientError, ClientGone, UpstreamTimeout
from ..models import Headers, Record, Request
from ..net.sockets import IdleWait
from ..protocol.h2map import answer_fields, request_from_fields
from ..protocol.semantics import CHUNKED, Framing
from ..relay.h2tunnel import StreamRelay
from .client import ClientConnection, log
from .log import ConnLogger
from .transaction import Transaction

__all__ = ["H2Stream"]

_CANCEL = h2.errors.ErrorCodes.CANCEL
_INTERNAL = h2.errors.ErrorCodes.INTERNAL_ERROR


class Owner(Protocol):
    """What a stream asks of its connection (http2.H2Connection)."""

    conn: ClientConnection
    #: The h2 state machine, and whether the connection closed.
    h2: Any
    closed: bool
    #: The client reads nothing: producing more for it waits (``wait_unchoked``).
    choked: bool
    #: The greenlets of the streams and of detached tunnels' ends.
    group: Any

    def flush(self) -> None: ...
    def wait_unchoked(self, timeout: float) -> bool: ...
    def ack(self, size: int, stream_id: int) -> None: ...
    def ended(self, stream: "H2Stream") -> None: ...


class StreamReset(ClientGone):
    """The stream was reset by the client, or its connection ended."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.close_reason = reason


class H2Stream:
    """One stream: the client side of its request (an ``Exchange``) and the ``Side`` of the
    Transaction that serves it. Its context is a copy of the connection's, with an id of
    its own (``c12-3`` for stream 3 of ``c12``), so ``/tunnels`` lists and closes streams
    one by one, and what one stream's request sets (its user, its stash) is not another's."""

    def __init__(self, owner: Owner, stream_id: int, fields: list[tuple[str, str]],
                 ended: bool) -> None:
        conn = owner.conn
        # The stash starts as a copy of the connection's (what plugins noted at connect
        # time holds for every stream); what one stream's request notes is its own.
        self.ctx = dataclasses.replace(conn.ctx, conn_id=f"{conn.ctx.conn_id}-{stream_id}",
                                       user=None, requests=0, stash=dict(conn.ctx.stash))
        self.owner = owner
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
        #: The END_STREAM of the request body was read (``read_body``).
        self.body_done = ended
        self.unacked = 0
        self.cut_by: Optional[str] = None
        self.must_reset = False
        self.answered = False
        #: The answer's HEADERS, until its first DATA goes (``send_head``).
        self._head: Optional[list[tuple[str, str]]] = None
        self._answer_ended = False
        self.record: Optional[Record] = None
        #: The relay of a CONNECT stream, once its DATA goes straight to it.
        self.relay: Optional[StreamRelay] = None
        self.transaction = Transaction(conn.server, self, self.ctx, conn.gen,
                                       IdleWait(conn.server.gen.config.core["idle_timeout"]),
                                       ConnLogger(log, self.ctx),
                                       conn.refusal)

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
                self.relay.client_gone(reason)
            greenlet = self.transaction.greenlet
            if greenlet is not None and greenlet is not gevent.getcurrent():
                greenlet.kill(StreamReset(reason), block=False)

    # -- the stream's greenlet: the Side of its Transaction ---------------------------

    def run(self) -> None:
        try:
            self.transaction.serve()
        finally:
            self.transaction.idle_wait.close()
            if self.transaction.detached is None:
                self.owner.ended(self)

    def read_request(self, record: Record) -> Optional[Request]:
        record.version = "HTTP/2"
        self.record = record
        request, for_us = request_from_fields(self.fields)
        if for_us is not None and not self.owner.conn.server.names_proxy(*for_us, self.ctx):
            raise ClientError("only http:// targets are forwarded; use CONNECT for https")
        return request

    def client(self, request: Optional[Request], record: Record) -> "H2Stream":
        self.record = record
        return self

    def detached(self, transaction: Transaction) -> Callable[..., Any]:
        return self.owner.group.spawn  # type: ignore[no-any-return]

    def detached_ended(self) -> None:
        self.owner.ended(self)

    # -- the Exchange: the request body -------------------------------------------------

    @property
    def has_body(self) -> bool:
        """DATA may come, and no content-length says it is empty."""
        return not self.bodiless and self._content_length() not in ("0", "")

    def framing(self) -> Framing:
        if self.bodiless:
            length = self._content_length()
            return None if length is None else ("Content-Length", length)
        length = self._content_length()
        return CHUNKED if length is None else ("Content-Length", length)

    def _content_length(self) -> Optional[str]:
        for name, value in self.fields:
            if name == "content-length":
                return value.strip()
        return None

    def read_body(self) -> list[bytes]:
        idle = self.transaction.core["idle_timeout"]
        while not self.inbound:
            if self.cut_by is not None:
                raise StreamReset(self.cut_by)
            self.arrived.clear()
            if not self.arrived.wait(idle) and not self.inbound:
                raise ClientGone("client sent nothing for idle_timeout")
        item = self.inbound.popleft()
        if item is None:
            self.body_done = True
            return []
        piece, size = item
        self.give_back(size)
        assert self.record is not None
        self.record.bytes_in += len(piece)
        return [piece]

    def give_back(self, size: int) -> None:
        """Bytes passed on: the client may send that many more on this stream."""
        size = min(size, self.unacked)
        if size and self.cut_by is None:
            self.unacked -= size
            self.owner.ack(size, self.stream_id)
            self.owner.flush()

    # -- the Exchange: the answer ---------------------------------------------------------

    def send_interim(self, status: int, fields: list[tuple[str, str]]) -> None:
        """An interim answer (a 100, a 103) as a HEADERS frame of its own, before the final
        one (RFC 9113 8.1): a proxy passes 1xx answers on (RFC 9110 15.2)."""
        self._frames(self.owner.h2.send_headers, self.stream_id, answer_fields(status, fields))
        self._sent(0)  # answered, as on HTTP/1.1: a failure from here on is a reset

    def send_head(self, status: int, reason: str, headers: Headers, open_ended: bool,
                  keep: bool) -> bool:
        """HEADERS, sent with the first DATA (``send_body``): until then an error found in
        the answer's first bytes can still be answered instead."""
        self._head = answer_fields(status, headers)
        return False  # the stream ends with its answer

    def send_body(self, pieces: Sequence[bytes], end: bool = False) -> None:
        data = b"".join(pieces)
        if self._head is not None:
            fields, self._head = self._head, None
            self._frames(self.owner.h2.send_headers, self.stream_id, fields,
                         end_stream=end and not data)
            self._sent(0)
            if end and not data:
                self._answer_ended = True
                return
        if data or end:
            self.send_data(data, end=end)
            self._answer_ended = end
        self._sent(len(data))

    def _sent(self, size: int) -> None:
        assert self.record is not None
        if not self.answered:
            self.answered = True
            self.record.first_byte_time = time.time() - self.record.started
        self.record.bytes_out += size

    def abort(self) -> None:
        self.must_reset = True

    def upgrade(self, fields: list[tuple[str, str]], upstream: socket.socket,
                to_client: bytes, record: Record, idle_timeout: float) -> str:
        raise ClientError("no switch of protocols on HTTP/2")  # h2 refuses Upgrade fields

    def finish(self, cut: bool) -> None:
        """The answer is whole: END_STREAM; a reset when it was cut after its start. A
        request whose body is still coming is then told to stop sending (NO_ERROR)."""
        if self.cut_by is not None:
            return
        if cut or self.must_reset:
            self.reset(_INTERNAL)
            return
        if self.answered and not self._answer_ended:
            try:
                self.send_data(b"", end=True)
            except StreamReset:
                return
            self._answer_ended = True
        if not self.client_ended:
            self.reset(h2.errors.ErrorCodes.NO_ERROR)

    def cancel(self) -> None:
        self.reset(_CANCEL)

    def require_http11(self) -> bool:
        self.reset(h2.errors.ErrorCodes.HTTP_1_1_REQUIRED)
        return True

    def reset(self, code: int) -> None:
        if self.cut_by is None and not self.owner.closed:
            self.cut_by = "reset"
            try:
                self.owner.h2.reset_stream(self.stream_id, code)
                self.owner.flush()
            except (h2.exceptions.ProtocolError, OSError):
                pass

    def _frames(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Frames from ``call``, a method of the h2 state machine, queued for the
        connection's writer; a stream closed under us (the client reset it) ends the
        request as the client's doing."""
        if self.cut_by is not None or self.owner.closed:
            raise StreamReset(self.cut_by or "client")
        try:
            call(*args, **kwargs)
        except h2.exceptions.ProtocolError:
            raise StreamReset(self.cut_by or "client") from None
        self.owner.flush()

    def send_data(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` on this stream within its flow-control window, waiting (up to
        idle_timeout) for the client to open it."""
        owner = self.owner
        conn = owner.h2
        view = memoryview(data)
        idle = self.transaction.core["idle_timeout"]
        while view or end:
            if self.cut_by is not None or owner.closed:
                raise StreamReset(self.cut_by or "client")
            if owner.choked and not owner.wait_unchoked(idle):
                raise UpstreamTimeout("client took no bytes for idle_timeout")
            try:
                window = conn.local_flow_control_window(self.stream_id)
            except h2.exceptions.ProtocolError:
                raise StreamReset(self.cut_by or "client") from None
            size = min(window, len(view), conn.max_outbound_frame_size)
            if view and size <= 0:
                self.window.clear()
                if not self.window.wait(idle):
                    raise UpstreamTimeout("client took no bytes for idle_timeout")
                continue
            piece = view[:size].tobytes()
            view = view[size:]
            last = end and not view
            self._frames(conn.send_data, self.stream_id, piece, end_stream=last)
            if last:
                break

    # -- tunnels ----------------------------------------------------------------------

    def tunnel(self, upstream: socket.socket, record: Record, early: bytes,
               inspect: Optional[Callable[[bytes], bool]],
               idle_timeout: float) -> tuple[StreamRelay, str]:
        """"200" on the stream, then a StreamRelay, given the client's DATA that came
        already; from here the connection's reader hands it each DATA as it comes."""
        self._frames(self.owner.h2.send_headers, self.stream_id, [(":status", "200")])
        self._sent(0)
        self._answer_ended = True  # the tunnel's END_STREAM is the relay's to send
        record.status = 200
        if early:  # what a parent sent after its 200
            self.send_data(early)
            record.bytes_out += len(early)
        relay = StreamRelay(self, upstream, record, idle_timeout, inspect)
        self.relay = relay
        while self.inbound:
            relay.from_client(self.inbound.popleft())
        return relay, ""
