"""The relay of a CONNECT stream on an HTTP/2 connection: the tunnel's bytes in DATA frames.

As tunnel.py does for a tunnel of its own connection, libev watchers move the bytes, from
callbacks in the hub: the upstream's readable event sends DATA frames as far as the stream's
send window allows (and stops reading when it is shut, until a WINDOW_UPDATE); the client's
DATA, handed over by the connection's reader as it arrives, goes to the upstream, and its
window is given back only once the upstream took it. So a tunnel holds no greenlet while it
relays, a chunk costs no greenlet switch, and a slow side stops only its own stream.

The client's END_STREAM is a half-close of the upstream, the upstream's FIN an END_STREAM;
the tunnel ends when both happened, at a reset of either side (an upstream reset resets the
stream with CONNECT_ERROR), after ``idle_timeout`` with nothing moving, or at its lifetime.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

import h2.errors
import h2.exceptions
from gevent import get_hub

from ..models import Record
from .tunnel import IdleWatch

if TYPE_CHECKING:
    from ..serve.http2 import H2Stream

__all__ = ["StreamRelay"]

BUFFER = 64 * 1024
_READ, _WRITE = 1, 2  # libev's EV_READ, EV_WRITE
_CANCEL = h2.errors.ErrorCodes.CANCEL
_CONNECT_ERROR = h2.errors.ErrorCodes.CONNECT_ERROR


class StreamRelay:
    def __init__(self, stream: "H2Stream", upstream: socket.socket, record: Record,
                 idle_timeout: float, lifetime: float) -> None:
        self.loop = get_hub().loop
        self.stream = stream
        self.h2 = stream.owner.h2
        self.upstream = upstream
        self.raw = getattr(upstream, "_sock", upstream)  # its calls never wait
        self.record = record
        fd = upstream.fileno()
        self.reader = self.loop.io(fd, _READ)
        self.writer = self.loop.io(fd, _WRITE)
        #: Client bytes the upstream did not take yet, and their flow-controlled size.
        self.pending: Any = b""
        self.pending_size = 0
        #: Client chunks after ``pending``: (bytes, size), or None for END_STREAM.
        self.queue: deque[Optional[tuple[bytes, int]]] = deque()
        self.up_done = False  # the client's END_STREAM was passed on
        self.down_done = False  # the upstream's FIN was passed on
        self.reason = ""
        self.finished = False
        self.idle = IdleWatch(self.loop, idle_timeout, lambda: self.abort("idle timeout"))
        self._timers: list[Any] = []
        #: Called (from the loop's callback queue) with the close reason at the end.
        self.on_done: Optional[Callable[[str], None]] = None

    # -- from greenlets ---------------------------------------------------------------

    def start(self, lifetime: float) -> None:
        self.idle.start()
        if lifetime:
            timer = self.loop.timer(lifetime)
            timer.start(self.abort, "max lifetime")
            self._timers.append(timer)
        self.window_opened()

    def from_client(self, item: Optional[tuple[bytes, int]]) -> None:
        """The client's next DATA (bytes and flow-controlled size), or None at its
        END_STREAM; called by the connection's reader, never waits."""
        if self.finished:
            if item is not None:
                self.stream.give_back(item[1])
            return
        if self.pending or self.queue:
            self.queue.append(item)
            return
        self._to_upstream(item)

    def window_opened(self) -> None:
        """The stream's send window may have grown: read from the upstream again."""
        if not self.finished and not self.down_done and not self.reader.active:
            self.reader.start(self._readable)

    def abort(self, reason: str, code: Optional[int] = _CANCEL) -> None:
        """End the tunnel: the stream is reset with ``code`` (None: the client reset it
        already), the upstream shut."""
        if self.finished:
            return
        self.reason = self.reason or reason
        if code is not None:
            self.stream.reset(code)
        try:
            self.upstream.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._finish()

    def close(self) -> None:
        """Free the watchers and timers, by whoever handles the end."""
        self._stop()
        self.reader.close()
        self.writer.close()

    # -- the hub's side: callbacks, which never block ------------------------------------

    def _readable(self) -> None:
        stream_id = self.stream.stream_id
        try:
            window = self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:  # the stream or connection closed under us
            self.abort("client", None)
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
            self.abort("upstream", _CONNECT_ERROR)
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
            self.abort("client", None)
            return
        self.stream.owner.flush()
        if self.down_done and self.up_done:
            self._finish()

    def _to_upstream(self, item: Optional[tuple[bytes, int]]) -> None:
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
            self.abort("upstream", _CONNECT_ERROR)
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
            self.abort("upstream", _CONNECT_ERROR)
            return
        self._moved_up(sent)
        self.pending = self.pending[sent:]
        if self.pending:
            return
        self.writer.stop()
        self.stream.give_back(self.pending_size)
        self.pending_size = 0
        while self.queue and not self.pending and not self.finished:
            self._to_upstream(self.queue.popleft())

    def _moved_up(self, sent: int) -> None:
        if sent:
            self.idle.last = self.loop.now()
            self.record.bytes_in += sent

    # -- the end --------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop()
        if self.on_done is not None:
            self.loop.run_callback(self.on_done, self.reason or "done")

    def _stop(self) -> None:
        self.reader.stop()
        self.writer.stop()
        self.idle.close()
        for timer in self._timers:
            timer.close()
        self._timers = []
