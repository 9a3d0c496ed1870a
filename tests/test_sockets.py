"""sockets.raw_socket: the one reader of gevent's private ``_sock``, and peek, which uses it.

Real socket pairs (gevent's, as the conftest patched them, and the standard library's):
no mocks. If gevent moves what raw_socket reads, these fail first.
"""

from __future__ import annotations

import socket

import gevent.socket
import pytest
from gevent import monkey

from geproxy.net.sockets import peek, raw_socket, still_idle

pytestmark = pytest.mark.timeout(10)


def test_under_a_gevent_socket_is_the_non_blocking_socket_of_the_same_descriptor():
    left, right = socket.socketpair()
    with left, right:
        assert isinstance(left, gevent.socket.socket)  # the conftest patched socket
        raw = raw_socket(left)
        assert not isinstance(raw, gevent.socket.socket)
        assert isinstance(raw, monkey.get_original("socket", "SocketType"))
        assert raw.fileno() == left.fileno()
        assert raw.gettimeout() == 0.0
        with pytest.raises(BlockingIOError):  # at once: nothing to read, no wait
            raw.recv(1)
        right.sendall(b"xy")
        assert raw.recv(1) == b"x"
        assert left.recv(1) == b"y"  # one socket, read through either


def test_a_socket_gevent_did_not_patch_is_its_own():
    with monkey.get_original("socket", "socket")(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        assert not isinstance(sock, gevent.socket.socket)
        assert raw_socket(sock) is sock


def test_peek_leaves_the_bytes_and_never_waits():
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(5)
        assert peek(left) is None and still_idle(left)
        right.sendall(b"abc")
        assert peek(left) == b"a"
        assert not still_idle(left)
        assert left.recv(3) == b"abc"  # the peek took nothing
        right.close()
        assert peek(left) == b""  # EOF
