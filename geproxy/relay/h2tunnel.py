"""The relay of a CONNECT stream on an HTTP/2 connection: the tunnel's bytes in DATA frames.

The ``Relay`` of tunnel.py with an HTTP/2 stream as its client end: libev watchers move
the bytes from callbacks in the hub. The upstream's readable event sends DATA frames as
far as the stream's send window allows (and stops reading when it is shut, until a
WINDOW_UPDATE); the client's DATA, handed over by the connection's reader as it arrives,
goes to the upstream, and its window is given back only once the upstream took it. So a
tunnel holds no greenlet while it relays, a chunk costs no greenlet switch, and a slow
side stops only its own stream.

The client's END_STREAM is a half-close of the upstream, the upstream's FIN an END_STREAM;
the tunnel ends when both happened, at a reset of either side (an upstream reset resets the
stream with CONNECT_ERROR), after ``idle_timeout`` with nothing moving, or at its lifetime.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any, Callable, Optional, Protocol

import h2.errors
import h2.exceptions

from ..models import Record
from ..net.sockets import raw_socket
from .tunnel import Relay

__all__ = ["StreamRelay", "StreamEnd"]

BUFFER = 64 * 1024
_READ, _WRITE = 1, 2  # libev's EV_READ, EV_WRITE
_CANCEL = h2.errors.ErrorCodes.CANCEL
_CONNECT_ERROR = h2.errors.ErrorCodes.CONNECT_ERROR

#: A piece of the client's DATA with its flow-controlled size, or None for END_STREAM.
Item = Optional[tuple[bytes, int]]


class StreamEnd(Protocol):
    """The client end of a StreamRelay: one stream of an HTTP/2 connection."""

    stream_id: int
    #: Its connection: ``h2`` (the state machine), ``choked`` (the client reads nothing),
    #: ``paused`` (relays waiting for it to read), ``flush()``.
    owner: Any

    def give_back(self, size: int) -> None:
        """``size`` bytes were passed on: the client may send as many more."""

    def reset(self, code: int) -> None:
        """Reset the stream with ``code``."""


class StreamRelay(Relay):
    """A tunnel between an HTTP/2 stream and an upstream socket."""

    def __init__(self, stream: StreamEnd, upstream: socket.socket, record: Record,
                 idle_timeout: float, inspect: Optional[Callable[[bytes], bool]]) -> None:
        super().__init__(record, idle_timeout, inspect)
        self.stream = stream
        self.h2 = stream.owner.h2
        self.upstream = upstream
        self.raw = raw_socket(upstream)  # its calls never wait
        fd = upstream.fileno()
        self.reader = self.loop.io(fd, _READ)
        self.writer = self.loop.io(fd, _WRITE)
        #: Client bytes the upstream did not take yet, and their flow-controlled size.
        self.pending: Any = b""
        self.pending_size = 0
        #: Client chunks after ``pending`` (or held while a plugin looks at the first).
        self.queue: deque[Item] = deque()
        self.up_done = False  # the client's END_STREAM was passed on
        self.down_done = False  # the upstream's FIN was passed on
        self._begun = False
        #: The code the stream is reset with at the end; None when the client reset it.
        self._reset_code: Optional[int] = _CANCEL

    # -- from greenlets and the connection's reader -----------------------------------

    def from_client(self, item: Item) -> None:
        """The client's next DATA, or None at its END_STREAM; never waits."""
        if self.finished:
            if item is not None:
                self.stream.give_back(item[1])
            return
        if self.inspect is not None or self.pending or self.queue:
            self.queue.append(item)
            if self.inspect is not None and len(self.queue) == 1:
                if item is None:
                    self.inspect = None  # closed before a byte: nothing to look at
                    self._arm_detach()
                    self._drain()
                else:  # the first bytes: to the plugins, in the waiting greenlet
                    self._wake(item[0])
            return
        self._to_upstream(item)

    def window_opened(self) -> None:
        """The stream's send window may have grown: read from the upstream again."""
        if self._begun and not self.finished and not self.down_done and (
                not self.reader.active):
            self.reader.start(self._readable)

    def client_gone(self, reason: str) -> None:
        """The client reset the stream (or its connection ended): end, resetting nothing."""
        self._reset_code = None
        self.cancel(reason)

    # -- Relay's part -------------------------------------------------------------------

    def _begin(self) -> None:
        self._begun = True
        self.window_opened()
        if self.inspect is None:
            self._drain()

    def _pass_on(self, data: bytes) -> None:
        item = self.queue.popleft()  # the one inspected
        self._to_upstream(item)
        self._drain()

    def _shut(self, reason: str) -> None:
        self.reason = self.reason or reason
        if self._reset_code is not None:
            self.stream.reset(self._reset_code)
        try:
            self.upstream.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _halt(self) -> None:
        self.reader.stop()
        self.writer.stop()

    def _release(self) -> None:
        self.reader.close()
        self.writer.close()

    # -- the hub's side: callbacks, which never block ------------------------------------

    def _upstream_failed(self) -> None:
        self._reset_code = _CONNECT_ERROR
        self._abort("upstream")

    def _client_failed(self) -> None:
        """The stream or its connection closed under the relay."""
        self._reset_code = None
        self._abort("client")

    def _readable(self) -> None:
        stream_id = self.stream.stream_id
        try:
            window = self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            self._client_failed()
            return
        if window <= 0:
            self.reader.stop()  # until window_opened
            return
        owner = self.stream.owner
        if owner.choked:  # the client is not taking what it has: until the writer caught up
            self.reader.stop()
            owner.paused.add(self)
            return
        try:
            data = self.raw.recv(min(window, BUFFER))
        except BlockingIOError:
            return
        except OSError:
            self._upstream_failed()
            return
        try:
            if not data:
                self.reader.stop()
                self.down_done = True
                self.h2.end_stream(stream_id)
            else:
                self.idle.last = self.loop.now()
                size = self.h2.max_outbound_frame_size
                for start in range(0, len(data), size):
                    self.h2.send_data(stream_id, data[start:start + size])
                self.record.bytes_out += len(data)
        except h2.exceptions.ProtocolError:
            self._client_failed()
            return
        owner.flush()
        if self.down_done and self.up_done:
            self._finish()

    def _drain(self) -> None:
        """Pass on the client's chunks held back, while the upstream takes them."""
        while self.queue and not self.pending and not self.finished:
            self._to_upstream(self.queue.popleft())

    def _to_upstream(self, item: Item) -> None:
        if item is None:
            self.up_done = True
            try:
                self.upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self.down_done:
                self._finish()
            return
        data, size = item
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._upstream_failed()
            return
        self._moved_up(sent)
        if sent < len(data):
            self.pending, self.pending_size = memoryview(data)[sent:], size
            self.writer.start(self._writable)
        else:
            self.stream.give_back(size)

    def _writable(self) -> None:
        try:
            sent = self.raw.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self._upstream_failed()
            return
        self._moved_up(sent)
        self.pending = self.pending[sent:]
        if self.pending:
            return
        self.writer.stop()
        self.stream.give_back(self.pending_size)
        self.pending_size = 0
        self._drain()

    def _moved_up(self, sent: int) -> None:
        if sent:
            self.idle.last = self.loop.now()
            self.record.bytes_in += sent
