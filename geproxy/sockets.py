"""Socket helpers for the hot paths, written to spare system calls.

gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call; a proxy sends a few times
per request or per relayed chunk, so that is an extra system call each time for nothing.
"""

from __future__ import annotations

import socket

__all__ = ["send_all", "still_idle"]


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data``. The socket's timeout bounds each wait for buffer space, so a
    peer that keeps reading is never cut off, and one that stops is."""
    sent = sock.send(data)
    if sent == len(data):
        return
    view = memoryview(data)
    while sent < len(data):
        sent += sock.send(view[sent:])


def still_idle(sock: socket.socket) -> bool:
    """True when nothing is readable on ``sock``, without waiting: an idle HTTP connection
    that became readable was closed by its peer, or got bytes nobody asked for."""
    raw = getattr(sock, "_sock", sock)  # gevent's socket wraps a non-blocking one
    try:
        raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
