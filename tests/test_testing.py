"""The test kit checks itself: its leak counters see what a leak would leave behind."""

from __future__ import annotations

import socket

import gevent

from geproxy.testing import live_greenlets, open_fds, pattern, settle


def test_the_leak_counters_see_sockets_and_greenlets():
    fds, greenlets = open_fds(), live_greenlets()
    sock = socket.socket()
    waiter = gevent.spawn(gevent.sleep, 30)
    gevent.sleep(0)
    try:
        assert open_fds() == fds + 1
        assert live_greenlets() == greenlets + 1
        # settle() gives up (bounded) and reports the leak rather than hiding it.
        assert settle(fds, greenlets, limit=0.1) == (fds + 1, greenlets + 1)
    finally:
        sock.close()
        waiter.kill()
    assert settle(fds, greenlets, limit=2) == (fds, greenlets)


def test_the_pattern_does_not_depend_on_the_piece_size():
    whole = b"".join(pattern(200_003))
    assert len(whole) == 200_003
    assert b"".join(pattern(200_003, block=7_001)) == whole
    assert whole[:65504] == whole[65504:131008]  # the block repeats
    assert whole[:65536] != whole[65536:131072]  # but not at a power-of-two period
