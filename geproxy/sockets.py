"""Socket helpers for the hot paths, written to spare system calls.

gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call; a proxy sends a few times
per request or per relayed chunk, so that is an extra system call each time for nothing.
"""

from __future__ import annotations

import socket
from typing import Optional

__all__ = ["peek", "send_all", "still_idle"]


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
    raw = getattr(sock, "_sock", sock)  # gevent's socket wraps a non-blocking one
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
