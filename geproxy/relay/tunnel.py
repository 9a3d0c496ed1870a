"""The byte relay behind CONNECT (and Upgrade): both directions until both are done.

A FIN from one side is passed on as a half-close of the other, and the opposite direction
keeps flowing. The relay ends when both directions ended, or when nothing moved in either
direction for ``idle_timeout`` (counted from the first moment), or when a side resets.

Bytes are moved by libev watchers whose callbacks run in the hub: readable, read what is
there, write it on; a write that would block parks the rest and waits for room, with that
direction's reading paused (backpressure). The connection's greenlet only waits, and wakes
for what must run in a greenlet (a plugin looking at the client's first bytes) and for the
end. So a tunnel costs no greenlet of its own and no switch per chunk, and an idle one holds
no buffer. After DETACH_AFTER the connection's greenlet may stop waiting altogether
(``run(detach_after=...)`` returns, ``detach`` names what to call at the end), so a
long-lived tunnel holds no greenlet at all. A direction that has carried SPLICE_AFTER bytes
moves the rest with ``splice(2)`` through a pipe of its own, without copying through user
space.

``Relay`` is all of that but where the bytes come from: the waiting greenlet, the first
bytes' inspection, the detach, the idle watch, the lifetime, the report of the end, and
the write path (``Direction``: what a socket did not take waits for room). ``SocketRelay``
reads both sockets (and splices); ``StreamRelay`` (h2tunnel.py) takes an HTTP/2 stream's
DATA as its client side.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections import deque
from typing import Any, Callable, Optional

from gevent import get_hub
from gevent.hub import Waiter

from ..models import Record
from ..net.sockets import raw_socket, send_all, watchers

__all__ = ["Relay", "SocketRelay", "Direction", "IdleWatch", "relay", "open_relay", "SPLICE_AFTER",
           "DETACH_AFTER"]

BUFFER = 64 * 1024
#: Bytes a direction carries by recv/send before it switches to splice: a short exchange
#: never pays for a pipe; a download does after its first quarter MiB.
SPLICE_AFTER = 256 * 1024
#: The pipe's size asked for: bytes per pair of splice calls (the kernel may give less).
PIPE_SIZE = 1024 * 1024
_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in fcntl only from Python 3.10

_READ, _WRITE = 1, 2  # libev's EV_READ, EV_WRITE
_DONE = object()
_DETACH = object()
#: Seconds a tunnel relays with its connection's greenlet waiting before it lets that
#: greenlet go (``run(detach_after=...)``): a short exchange ends without the cost of a
#: second greenlet for its end; a long-lived one stops holding a greenlet's stacks.
DETACH_AFTER = 0.25


def _watcher(sock: Any, which: int, fd: int, events: int, loop: Any) -> tuple[Any, bool]:
    """The watcher of ``events`` on ``fd`` and whether it is borrowed: the gevent socket's
    own (``sockets.watchers``: ``which`` 0 readable, 1 writable) when it is free, or a new
    one for any other stream (TLS). A borrowed one is stopped, never closed, when the
    relay lets it go."""
    own = watchers(sock)
    if own is not None:
        watcher = own[which]
        if watcher.callback is None and watcher.loop is loop:
            return watcher, True
    return loop.io(fd, events), False


def _raw(sock: socket.socket) -> Any:
    """What the hub's callbacks call: the non-blocking socket under gevent's wrapper, or a
    TLS stream's calls that never wait (``TLSStream.nowait``)."""
    if watchers(sock) is None:  # not gevent's socket: a TLS stream has calls that never wait
        nowait = getattr(sock, "nowait", None)
        if nowait is not None:
            return nowait
    # (Asked of gevent's socket, getattr would look in the socket under it and raise
    # AttributeError inside: four exceptions per tunnel.)
    return raw_socket(sock)


class IdleWatch:
    """Calls ``expired()`` from the hub once nothing moved for ``timeout`` seconds. Its owner
    sets ``last`` to ``loop.now()`` at each move; the timer is armed for what is left of the
    timeout, not re-armed per move, so a busy relay pays one attribute store per chunk."""

    __slots__ = ("loop", "timeout", "expired", "last", "_timer")

    def __init__(self, loop: Any, timeout: float, expired: Callable[[], None]) -> None:
        self.loop = loop
        self.timeout = timeout
        self.expired = expired
        self.last = loop.now()
        self._timer: Any = None

    def start(self) -> None:
        self._arm(self.timeout)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.timer(delay)
        self._timer.start(self._check)

    def _check(self) -> None:
        idle_for = self.loop.now() - self.last
        self.close()
        if idle_for >= self.timeout:
            self.expired()
        else:
            self._arm(self.timeout - idle_for)


class Direction:
    """One direction of a tunnel: bytes read from ``src`` and written to ``dst``. A source
    of None pushes its bytes (an HTTP/2 stream's DATA): no reader watches it."""

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "upward", "name", "dst_name", "reader",
                 "writer", "pending", "moved", "eof", "done", "pipe", "piped", "buffered",
                 "tls_out", "splices", "borrowed")

    def __init__(self, src: Optional[socket.socket], dst: socket.socket, upward: bool,
                 loop: Any) -> None:
        self.src: Any = _raw(src) if src is not None else None
        self.dst = _raw(dst)
        self.src_fd, self.dst_fd = (src.fileno() if src is not None else -1), dst.fileno()
        self.upward = upward
        self.name, self.dst_name = ("client", "upstream") if upward else ("upstream", "client")
        #: None for a source that pushes (no descriptor to watch). A gevent socket's own
        #: watchers are borrowed (``_watcher``): nothing else waits on a relayed socket.
        self.reader: Any = None
        reader_borrowed = False
        if src is not None:
            self.reader, reader_borrowed = _watcher(src, 0, self.src_fd, _READ,
                                                    loop)
        self.writer, writer_borrowed = _watcher(dst, 1, self.dst_fd, _WRITE, loop)
        self.borrowed = (reader_borrowed, writer_borrowed)
        #: Read and not yet written (recv mode), while the writer waits for room.
        self.pending: Any = b""
        self.moved = 0
        self.eof = False
        self.done = False
        #: (read end, write end) once the direction splices; ``piped`` bytes sit in it.
        self.pipe: Optional[tuple[int, int]] = None
        self.piped = 0
        #: A TLS source may hold plaintext that no readable event announces; a TLS
        #: destination may hold ciphertext it did not send (``blocked``).
        self.buffered: Optional[Callable[[], bool]] = getattr(self.src, "buffered", None)
        self.tls_out = hasattr(self.dst, "blocked")
        #: splice moves bytes between descriptors: not for a side that speaks TLS.
        self.splices = _SPLICE and self.buffered is None and not self.tls_out

    def close(self) -> None:
        for watcher, borrowed in zip((self.reader, self.writer), self.borrowed, strict=True):
            if watcher is None:
                continue
            if borrowed:
                watcher.stop()  # the socket's again: its close closes it
            else:
                watcher.close()
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class Relay:
    """What every tunnel's relay shares, whichever its ends: the greenlet that waits for
    the end (and for what must run in a greenlet: a plugin looking at the client's first
    bytes), the detach after DETACH_AFTER, the idle watch, the lifetime, and the report
    of the end (``on_done``). Subclasses move the bytes from the hub's callbacks:
    ``SocketRelay`` between two sockets, ``StreamRelay`` (h2tunnel.py) between an HTTP/2
    stream and a socket.

    Writing to a socket is the base's: ``_write`` sends what fits and parks the rest in
    its ``Direction`` until the writer watcher finds room, then calls ``_drained``. A
    subclass provides how bytes come (``_begin``: start moving), ``_pass_on(data)`` (the
    inspected first bytes go upstream), ``_drained(d)`` (what follows a parked write),
    ``_shut(reason)`` (both sides told of the end), ``_halt`` (its watchers stopped) and
    ``_release`` (its watchers and buffers freed)."""

    def __init__(self, record: Record, idle_timeout: float,
                 inspect: Optional[Callable[[bytes], bool]]) -> None:
        hub = get_hub()
        self.hub = hub
        self.loop = hub.loop
        self.record = record
        self.inspect = inspect
        #: Why it ended ("" until then): the record's close reason.
        self.reason = ""
        self.idle = IdleWatch(self.loop, idle_timeout, lambda: self._abort("idle timeout"))
        self.waiter = Waiter(hub)
        #: For the waiting greenlet, in order: client bytes to inspect, _DETACH, _DONE.
        self.messages: deque[Any] = deque()
        self.finished = False
        self._lifetime: Any = None
        self._detach: Any = None
        self._detach_after = 0.0
        #: Detached: called with the close reason, from the loop's callback queue, at the end.
        self.on_done: Optional[Callable[[str], None]] = None

    # -- the greenlet's side ----------------------------------------------------------

    def run(self, lifetime: float, detach_after: float = 0) -> str:
        """Relay, with this greenlet waiting, until the end; returns the close reason.

        With ``detach_after`` (and no ``inspect``), returns "" instead once the tunnel has
        relayed that long: it goes on with no greenlet, and the caller must ``detach`` it
        at once, without yielding in between."""
        detaching = False
        self._detach_after = detach_after
        try:
            self.idle.start()
            if lifetime:
                self._lifetime = self.loop.timer(lifetime)
                self._lifetime.start(self._abort, "max lifetime")
            self._begin()
            if self.inspect is None:
                self._arm_detach()
            while True:
                while not self.messages:
                    self.waiter = Waiter(self.hub)
                    self.waiter.get()
                message = self.messages.popleft()
                if message is _DONE:
                    break
                if message is _DETACH:
                    if not self.finished:  # else its _DONE is next
                        detaching = True
                        return ""
                    continue
                self._inspected(message)
        finally:
            if not detaching:
                self._stop()
        return self.reason or "done"

    def _arm_detach(self) -> None:
        """Once no plugin waits for the client's first bytes, the greenlet may go."""
        if self._detach_after and self._detach is None and not self.finished:
            self._detach = self.loop.timer(self._detach_after)
            self._detach.start(self._wake, _DETACH)

    def detach(self, on_done: Callable[[str], None]) -> None:
        """After ``run`` returned "": the end is reported by ``on_done(reason)``, called
        from the hub (it may spawn, not block)."""
        self.on_done = on_done

    def cancel(self, reason: str) -> None:
        """End the tunnel from elsewhere (a stop, the admin listener, a reload): both sides
        are told, and the end is reported with ``reason``."""
        if not self.finished:
            self._abort(reason)

    def close(self) -> None:
        """Free the watchers, timers and buffers; after the end, by whoever handled it."""
        self._stop()
        self._release()

    def first(self, data: bytes) -> bool:
        """Hand the client's first bytes to ``inspect`` once; False when it closed all."""
        inspect, self.inspect = self.inspect, None
        if inspect is not None and not inspect(data):
            self._shut("denied")
            return False
        return True

    def _inspected(self, data: bytes) -> None:
        # In the greenlet: plugins may do what greenlets do. Then the bytes go on.
        if self.first(data):
            self._pass_on(data)
            self._arm_detach()
        else:
            self._finish()

    # -- the end ------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        self._shut(reason)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop()
        self._wake(_DONE)

    def _wake(self, message: Any) -> None:
        if message is _DONE and self.on_done is not None:
            self.loop.run_callback(self.on_done, self.reason or "done")
            return
        # Queued, and the greenlet switched to from the loop's callback queue, not from
        # inside a watcher's callback: it closes the watchers, which libev must not see
        # while it runs one. A greenlet busy with an earlier message finds it queued.
        self.messages.append(message)
        self.loop.run_callback(self._deliver)

    def _deliver(self) -> None:
        if self.messages and self.waiter.greenlet is not None:
            self.waiter.switch(None)

    def _stop(self) -> None:
        self._halt()
        self.idle.close()
        for timer in (self._lifetime, self._detach):
            if timer is not None:
                timer.close()
        self._lifetime = self._detach = None

    # -- the write path, both relays': callbacks in the hub, which never block ------------

    def _write(self, d: Direction, data: Any) -> bool:
        """Send ``data`` to ``d``'s destination; True when all of it went. What did not fit
        waits in ``d.pending`` for room (the writer watcher), with ``d``'s reading stopped,
        and ``_drained(d)`` follows once it went."""
        try:
            sent = d.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._side_failed(d.dst_name)
            return False
        self._count(d, sent)
        if sent < len(data) or (d.tls_out and d.dst.blocked):
            d.pending = memoryview(data)[sent:]
            if d.reader is not None:
                d.reader.stop()
            d.writer.start(self._writable, d)
            return False
        return True

    def _writable(self, d: Direction) -> None:
        data = d.pending
        try:
            sent = d.dst.send(data)
        except BlockingIOError:
            return
        except OSError:
            self._side_failed(d.dst_name)
            return
        self._count(d, sent)
        if sent < len(data) or (d.tls_out and d.dst.blocked):
            d.pending = data[sent:]
            return
        d.pending = b""
        d.writer.stop()
        self._drained(d)

    def _count(self, d: Direction, sent: int) -> None:
        if sent:
            d.moved += sent
            self.idle.last = self.loop.now()
            if d.upward:
                self.record.bytes_in += sent
            else:
                self.record.bytes_out += sent

    def _side_failed(self, name: str) -> None:
        """Reading from or writing to the ``name`` side ("client", "upstream") failed."""
        self._abort(name)

    # -- what a subclass does -----------------------------------------------------------

    def _drained(self, d: Direction) -> None:
        """All that waited in ``d.pending`` went out."""
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _pass_on(self, data: bytes) -> None:
        raise NotImplementedError

    def _shut(self, reason: str) -> None:
        raise NotImplementedError

    def _halt(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class SocketRelay(Relay):
    """A tunnel between two sockets (a TLS stream on the client's side, maybe): one
    ``Direction`` each way, spliced once it carried SPLICE_AFTER bytes."""

    def __init__(self, client: socket.socket, upstream: socket.socket, record: Record,
                 idle_timeout: float, inspect: Optional[Callable[[bytes], bool]]) -> None:
        super().__init__(record, idle_timeout, inspect)
        self.client, self.upstream = client, upstream
        self.up = Direction(client, upstream, True, self.loop)
        self.down = Direction(upstream, client, False, self.loop)

    def _begin(self) -> None:
        self._read_on(self.up)
        self._read_on(self.down)

    def _pass_on(self, data: bytes) -> None:
        self._write_on(self.up, data)

    def _halt(self) -> None:
        for d in (self.up, self.down):
            d.reader.stop()
            d.writer.stop()

    def _release(self) -> None:
        self.up.close()
        self.down.close()

    # -- the hub's side: callbacks, which never block ------------------------------------

    def _readable(self, d: Direction) -> None:
        if d.pipe is not None:
            self._splice_in(d)
            return
        try:
            data = d.src.recv(BUFFER)
        except BlockingIOError:
            return
        except OSError:
            self._abort(d.name)
            return
        if not data:
            self._eof(d)
            return
        self.idle.last = self.loop.now()
        if d.upward and self.inspect is not None:
            d.reader.stop()  # until the greenlet had the plugins look at them
            self._wake(data)
            return
        self._write_on(d, data)

    def _write_on(self, d: Direction, data: Any) -> None:
        """Pass ``data`` on, then read on when nothing waits; a direction that carried
        SPLICE_AFTER bytes by recv and send switches to splice."""
        if self._write(d, data) and d.splices and d.moved >= SPLICE_AFTER and d.pipe is None:
            self._to_splice(d)
        if not d.reader.active and not d.writer.active and not self.finished:
            self._read_on(d)

    def _read_on(self, d: Direction) -> None:
        d.reader.start(self._readable, d)
        if d.buffered is not None and d.buffered():
            self.loop.run_callback(self._read_buffered, d)

    def _read_buffered(self, d: Direction) -> None:
        """Plaintext a TLS source already holds: read as if the socket were readable."""
        if d.reader.active and not self.finished:
            self._readable(d)

    def _writable(self, d: Direction) -> None:
        if d.pipe is not None:
            self._splice_out(d)
            return
        super()._writable(d)

    def _drained(self, d: Direction) -> None:
        self._resume(d)

    def _resume(self, d: Direction) -> None:
        """All that was read went out: read on, or pass on the EOF that came meanwhile."""
        if d.eof:
            self._eof(d)
        elif not self.finished:
            self._read_on(d)

    def _eof(self, d: Direction) -> None:
        d.eof = True
        d.reader.stop()
        if d.pending or d.piped or d.writer.active:
            return  # the writer passes it on once the rest went out
        d.done = True
        if self.up.done and self.down.done:
            self._finish()  # closing the sockets sends the last FIN
            return
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- splice -------------------------------------------------------------------------

    def _to_splice(self, d: Direction) -> None:
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors, say: recv and send do as well
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default pipe size works, in more calls
        d.pipe = (read_end, write_end)

    def _splice_in(self, d: Direction) -> None:
        assert d.pipe is not None
        try:
            got = os.splice(d.src_fd, d.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self._abort(d.name)
            return
        if not got:
            self._eof(d)
            return
        d.piped = got
        self._splice_out(d)
        if d.piped:
            d.reader.stop()
            d.writer.start(self._writable, d)

    def _splice_out(self, d: Direction) -> None:
        assert d.pipe is not None
        try:
            sent = os.splice(d.pipe[0], d.dst_fd, d.piped, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self._abort(d.dst_name)
            return
        d.piped -= sent
        self._count(d, sent)
        if not d.piped and d.writer.active:
            d.writer.stop()
            self._resume(d)

    # -- the end ------------------------------------------------------------------------

    def _shut(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def open_relay(client: socket.socket, upstream: socket.socket, record: Record,
               idle_timeout: float, to_upstream: bytes = b"", to_client: bytes = b"",
               inspect: Optional[Callable[[bytes], bool]] = None) -> tuple[SocketRelay, str]:
    """A relay between ``client`` and ``upstream``, once the bytes already read past a head
    on either side went on: ``to_client`` (what a parent sent with its 200) first, then
    ``to_upstream`` (a client's TLS ClientHello sent right after CONNECT, say), past
    ``inspect``. Returns the relay, to ``run`` or ``detach``, and "" (or the close reason,
    when the tunnel already ended); the caller ``close``s it in the end."""
    tunnel = SocketRelay(client, upstream, record, idle_timeout, inspect)
    try:
        if to_upstream and not tunnel.first(to_upstream):
            return tunnel, tunnel.reason
        client.settimeout(idle_timeout)
        upstream.settimeout(idle_timeout)
        if to_client:
            try:
                send_all(client, to_client)
            except OSError:
                tunnel._shut("client")
                return tunnel, tunnel.reason
            record.bytes_out += len(to_client)
        if to_upstream:
            try:
                send_all(upstream, to_upstream)
            except OSError:  # reset, say, right after a parent's 200
                tunnel._shut("upstream")
                return tunnel, tunnel.reason
            record.bytes_in += len(to_upstream)
    except BaseException:
        tunnel.close()
        raise
    tunnel.idle.last = tunnel.loop.now()
    return tunnel, ""


def relay(client: socket.socket, upstream: socket.socket, record: Record,
          idle_timeout: float, to_upstream: bytes = b"", to_client: bytes = b"",
          inspect: Optional[Callable[[bytes], bool]] = None, lifetime: float = 0) -> str:
    """Relay until both directions are done, this greenlet waiting; returns the close
    reason for the record. ``inspect``, if given, sees the client's first bytes before they
    go upstream and may close the tunnel by returning False. ``lifetime`` (seconds, 0 for
    none) bounds how long the tunnel may stay open at all."""
    tunnel, ended = open_relay(client, upstream, record, idle_timeout, to_upstream, to_client,
                               inspect)
    try:
        return ended or tunnel.run(lifetime)
    finally:
        tunnel.close()
