"""sockets.raw_socket: the one reader of gevent's private ``_sock``, and peek, which uses it;
IdleWait, which waits on a gevent socket's own read watcher (``_read_event``).

Real socket pairs (gevent's, as the conftest patched them, and the standard library's):
no mocks. If gevent moves what raw_socket reads, these fail first.
"""

from __future__ import annotations

import socket

import gevent.socket
import pytest
from gevent import monkey

from geproxy.net.sockets import IdleWait, peek, raw_socket, still_idle, watchers

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
        assert watchers(sock) is None


def test_a_gevent_sockets_watchers_are_the_ones_its_own_waits_use():
    """``watchers``: the readable and writable watchers of the socket's descriptor that
    gevent's recv and send wait on (a greenlet waiting in recv holds the first)."""
    left, right = socket.socketpair()
    with left, right:
        readable, writable = watchers(left)
        assert (readable.fd, writable.fd) == (left.fileno(), left.fileno())
        assert (readable.events & 3, writable.events & 3) == (1, 2)  # READ, WRITE
        assert readable.callback is None and writable.callback is None
        waiting = gevent.spawn(left.recv, 10)
        for _ in range(100):  # until it waits (bounded)
            if readable.callback is not None:
                break
            gevent.sleep(0)
        assert readable.callback is not None and writable.callback is None
        right.sendall(b"x")
        assert waiting.get(timeout=5) == b"x"
        assert readable.callback is None


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


def test_an_idle_wait_reads_waits_and_times_out_leaving_the_socket_as_it_was():
    """What is there is read at once; else the wait ends with the bytes, or with
    socket.timeout after the wait's timeout; the socket's own timeout is untouched, and its
    read watcher is free again after each wait (gevent's own recv can use it)."""
    left, right = socket.socketpair()
    wait = IdleWait(0.2)
    with left, right:
        left.settimeout(7.0)
        right.sendall(b"ready")
        assert wait.recv(left, 100) == b"ready"
        later = gevent.spawn_later(0.05, right.sendall, b"later")
        assert wait.recv(left, 100) == b"later"
        later.join(timeout=5)
        with pytest.raises(socket.timeout):
            wait.recv(left, 100)
        assert left.gettimeout() == 7.0
        assert left._read_event.callback is None  # nobody waits on it now
        right.sendall(b"again")
        assert left.recv(100) == b"again"
    wait.close()


def test_a_second_waiter_on_one_socket_is_refused_as_gevent_refuses_it():
    left, right = socket.socketpair()
    wait = IdleWait(5.0)
    with left, right:
        first = gevent.spawn(wait.recv, left, 100)
        for _ in range(100):  # until the first waits (bounded)
            if left._read_event.callback is not None:
                break
            gevent.sleep(0)
        assert left._read_event.callback is not None
        with pytest.raises(gevent.exceptions.ConcurrentObjectUseError):
            IdleWait(5.0).recv(left, 100)
        right.sendall(b"x")
        assert first.get(timeout=5) == b"x"
    wait.close()
