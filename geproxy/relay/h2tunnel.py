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
from .tunnel import Direction, Relay

__all__ = ["StreamRelay", "StreamEnd"]

BUFFER = 64 * 1024
_READ = 1  # libev's EV_READ
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
        #: The upstream's bytes, read as far as the stream's send window allows.
        self.reader = self.loop.io(upstream.fileno(), _READ)
        #: The client's DATA to the upstream: written by the base's write path, which parks
        #: what the upstream did not take (``up.pending``) until it has room.
        self.up = Direction(None, upstream, True, self.loop)
        #: The flow-controlled size of the DATA parked in ``up.pending``: given back to the
        #: client once it went.
        self.pending_size = 0
        #: Client chunks after the parked one (or held while a plugin looks at the first).
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
        if self.inspect is not None or self.up.pending or self.queue:
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
        self.up.writer.stop()

    def _release(self) -> None:
        self.reader.close()
        self.up.close()

    def _drained(self, d: Direction) -> None:
        self.stream.give_back(self.pending_size)
        self.pending_size = 0
        self._drain()

    def _side_failed(self, name: str) -> None:
        if name == "upstream":  # the stream is reset with CONNECT_ERROR (RFC 9113 8.5)
            self._reset_code = _CONNECT_ERROR
        self._abort(name)

    # -- the hub's side: callbacks, which never block ------------------------------------

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
            self._side_failed("upstream")
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
        while self.queue and not self.up.pending and not self.finished:
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
        self.pending_size = size
        if self._write(self.up, data):
            self.pending_size = 0
            self.stream.give_back(size)
