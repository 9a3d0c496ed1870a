"""Connecting upstream: Happy Eyeballs ordering, the race, and its failures, on loopback."""

from __future__ import annotations

import socket

import pytest

from geproxy.errors import ConnectRefused, ConnectTimeout
from geproxy.net.upstream import connect, interleave


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_interleave_alternates_families_from_the_first():
    v6a, v6b = ("2001:db8::1", 443, 0, 0), ("2001:db8::2", 443, 0, 0)
    v4a, v4b, v4c = ("192.0.2.1", 443), ("192.0.2.2", 443), ("192.0.2.3", 443)
    assert interleave([v6a, v6b, v4a, v4b, v4c]) == [v6a, v4a, v6b, v4b, v4c]
    assert interleave([v4a, v4b, v6a]) == [v4a, v6a, v4b]
    assert interleave([v4a]) == [v4a]


def test_a_refused_address_hands_over_at_once(origin):
    """The next attempt starts when the previous fails, not after the stagger delay."""
    good = ("127.0.0.1", origin.port)
    sock, address = connect([("127.0.0.1", _closed_port()), good], timeout=5, delay=30)
    sock.close()
    assert address == good  # with a 30 s stagger and a 5 s timeout, only a hand-over wins


def test_a_silent_address_is_overtaken_after_the_delay(origin, blackhole):
    good = ("127.0.0.1", origin.port)
    sock, address = connect([("127.0.0.1", blackhole), good], timeout=10, delay=0.05)
    sock.close()
    assert address == good


def test_all_refused_is_connection_refused():
    with pytest.raises(ConnectRefused):
        connect([("127.0.0.1", _closed_port()), ("127.0.0.1", _closed_port())], timeout=5)


def test_all_silent_is_a_timeout(blackhole):
    with pytest.raises(ConnectTimeout):
        connect([("127.0.0.1", blackhole), ("127.0.0.1", blackhole)], timeout=0.3, delay=0.05)
    with pytest.raises(ConnectTimeout):
        connect([("127.0.0.1", blackhole)], timeout=0.3)
