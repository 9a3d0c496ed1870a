"""Socket helpers for the hot paths, written to spare system calls and timers.

gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call; a proxy sends a few times
per request or per relayed chunk, so that is an extra system call each time for nothing.

A socket with a timeout (``settimeout``) makes gevent create a ``Timeout`` and arm a new
libev timer for every wait that blocks: about 5 µs each, and a keep-alive request has two
such waits (the client's next request, the upstream's answer). ``IdleWait`` bounds those
two with one timer per connection, re-armed for each wait.

``raw_socket`` and ``watchers`` are the one place that reaches under gevent's socket: for the
operating system's socket, and for the two libev watchers gevent made with it (its own
waits use them; IdleWait, an upstream connect and the tunnels' relay wait on them too,
rather than make new ones: a watcher and the system call libev makes to check its
descriptor, each time).
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import gevent.socket
from gevent import get_hub, getcurrent
from gevent.exceptions import ConcurrentObjectUseError

__all__ = ["IdleWait", "peek", "raw_socket", "send_all", "still_idle", "watchers"]


def raw_socket(sock: Any) -> Any:
    """The non-blocking socket under gevent's cooperative ``sock``: its calls never wait,
    they raise BlockingIOError instead, as the hub's callbacks and a peek need. Anything
    else (a socket gevent did not patch) is returned as it is.

    gevent keeps it in its private attribute ``_sock`` and has no public way to it: this
    is the one reader. A gevent socket without it raises AttributeError (and
    tests/test_sockets.py fails), never falling back to the cooperative socket, whose
    calls would wait inside the hub."""
    if isinstance(sock, gevent.socket.socket):
        return sock._sock
    return sock


def watchers(sock: Any) -> Optional[tuple[Any, Any]]:
    """The libev watchers gevent made with ``sock``, (readable, writable), each free to
    wait on when its ``callback`` is None (gevent's own waits insist on one waiter per
    watcher); None for any other stream (a TLS one). Whoever borrows one stops it when
    done, never closes it: the socket's ``close`` does. Read from gevent's private
    ``_read_event`` and ``_write_event`` (tests/test_sockets.py fails if they move)."""
    if isinstance(sock, gevent.socket.socket):
        return sock._read_event, sock._write_event
    return None


class IdleWait:
    """Waits of one greenlet for bytes, each bounded by ``timeout`` seconds: one libev timer,
    made on first use and re-armed (``ev_timer_again``) by each wait, raises
    ``socket.timeout`` in the waiting greenlet when it fires.

    The socket's own timeout is set aside for the wait (gevent would arm a timer for it as
    well) and put back after. ``close`` when the connection ends.
    """

    __slots__ = ("timeout", "_timer")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._timer: Any = None

    def recv(self, sock: Any, size: int) -> bytes:
        """``sock.recv(size)``, raising ``socket.timeout`` after ``timeout`` seconds."""
        timer = self._timer
        if timer is None:
            timer = self._timer = get_hub().loop.timer(self.timeout, self.timeout)
        own = watchers(sock)
        if own is not None:
            # gevent's own socket: read under it and wait on its read watcher, as its recv
            # does, with no timeout of the socket's to set aside (two settimeout calls) and
            # no timer armed when the bytes are there already.
            raw, watcher = raw_socket(sock), own[0]
            while True:
                try:
                    return raw.recv(size)  # type: ignore[no-any-return]
                except BlockingIOError:
                    pass
                if watcher.callback is not None:  # as gevent: one waiter per watcher
                    raise ConcurrentObjectUseError(
                        f"This socket is already used by another greenlet: {watcher.callback!r}")
                timer.again(getcurrent().throw, socket.timeout)
                try:
                    sock.hub.wait(watcher)
                finally:
                    timer.stop()
        timeout = sock.gettimeout()  # another stream (TLS): its recv, its timeout set aside
        sock.settimeout(None)
        timer.again(getcurrent().throw, socket.timeout)
        try:
            return sock.recv(size)  # type: ignore[no-any-return]
        finally:
            timer.stop()
            sock.settimeout(timeout)

    def set_timeout(self, timeout: float) -> None:
        """Bound the next waits by ``timeout`` (a reload changed idle_timeout)."""
        if timeout != self.timeout:
            self.close()
            self.timeout = timeout

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data``. The socket's timeout bounds each wait for buffer space, so a
    peer that keeps reading is never cut off, and one that stops is."""
    sent = sock.send(data)
    if sent == len(data):
        return
    view = memoryview(data)
    while sent < len(data):
        sent += sock.send(view[sent:])


def peek(sock: socket.socket) -> Optional[bytes]:
    """What a recv would give at once, left unread: None when it would wait; b"" for an
    EOF or an error; else a byte of what is there."""
    raw = raw_socket(sock)
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # type: ignore[no-any-return]
    except BlockingIOError:
        return None
    except OSError:
        return b""


def still_idle(sock: socket.socket) -> bool:
    """True when nothing is readable on ``sock``, without waiting: an idle HTTP connection
    that became readable was closed by its peer, or got bytes nobody asked for."""
    return peek(sock) is None
