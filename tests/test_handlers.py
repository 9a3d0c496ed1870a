"""Greenlets kept for the next connection (serve/handlers.py): reused, told apart from
connections and leaks, let go when idle, never reached by a kill meant for an earlier
connection; /debug/stats counts them with one worker and with two."""

from __future__ import annotations

import contextvars
import re
import socket

import gevent
import gevent.event
import gevent.pool
import pytest
import requests

from geproxy import hookimpl
from geproxy.serve.handlers import MAX_PARKED, Handlers, is_parked
from geproxy.testing import (
    echo,
    exchange,
    live_greenlets,
    open_tunnel,
    wait_until,
)

ADMIN = "admin_listen = 127.0.0.1:0\n"
#: Set by a plugin in one connection's greenlet, read in the next one's.
LEFT_BEHIND: contextvars.ContextVar[str] = contextvars.ContextVar("left_behind",
                                                                  default="nothing")


class Greenlets:
    """Which greenlet served each connection, and what context it found there."""

    def __init__(self) -> None:
        self.served: list[gevent.Greenlet] = []
        self.found: list[str] = []

    @hookimpl
    def on_connect(self, ctx):
        self.served.append(gevent.getcurrent())
        self.found.append(LEFT_BEHIND.get())
        LEFT_BEHIND.set(ctx.conn_id)


def _tunnel(proxy, port: int) -> socket.socket:
    sock, head = open_tunnel(proxy, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200 "), head
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    return sock


def _healthz(proxy) -> bytes:
    return exchange(proxy.address, b"GET /healthz HTTP/1.1\r\nHost: p\r\n"
                    b"Connection: close\r\n\r\n")


def test_a_connection_that_ended_lends_its_greenlet_to_the_next(proxy_factory, no_leaks):
    seen = Greenlets()
    proxy = proxy_factory(plugins=[seen])
    handlers = proxy.server.handlers
    assert _healthz(proxy).startswith(b"HTTP/1.1 200 ")
    assert wait_until(lambda: len(handlers) == 1)
    first = seen.served[0]
    assert is_parked(first) and not first.dead
    # Parked, it is neither a connection nor a live greenlet to the leak checks.
    assert proxy.server.open_connections() == 0
    assert first not in proxy.server.connections
    assert _healthz(proxy).startswith(b"HTTP/1.1 200 ")
    assert seen.served[1] is first
    # The second connection found none of the first one's context variables.
    assert seen.found == ["nothing", "nothing"]
    assert wait_until(lambda: len(handlers) == 1)


def test_parked_greenlets_are_let_go_when_idle(proxy_factory, raw_origin, no_leaks):
    proxy = proxy_factory(detach_after=60)
    server = raw_origin(echo)
    handlers = proxy.server.handlers
    before = live_greenlets()
    tunnels = [_tunnel(proxy, server.port) for _ in range(5)]
    assert proxy.server.open_connections() == 5 and len(handlers) == 0
    for sock in tunnels:
        sock.close()
    assert wait_until(lambda: len(handlers) == 5)
    parked = list(handlers._parked)
    assert live_greenlets() <= before + 1  # the origin's last handler may still end
    # Unused for a whole tick, they end: an idle proxy holds none (the tick is a second).
    assert wait_until(lambda: len(handlers) == 0, limit=5)
    assert wait_until(lambda: all(greenlet.dead for greenlet in parked))


def test_a_tick_lets_go_only_those_parked_all_along():
    # The trimming rule on its own, with the server's tick called by hand: the greenlets
    # run plain functions here, the proxy's connections in the tests around.
    handlers = Handlers(gevent.pool.Group())
    go = gevent.event.Event()
    for _ in range(3):
        handlers.spawn(go.wait)
    gevent.sleep(0)
    assert len(handlers) == 0 and len(handlers.group) == 3
    go.set()
    assert wait_until(lambda: len(handlers) == 3)
    handlers.trim()  # the first tick: nothing was counted yet, nothing ends
    assert len(handlers) == 3
    used = handlers.spawn(lambda: None)  # one taken and given back: the fewest were 2
    assert wait_until(lambda: len(handlers) == 3)
    oldest = handlers._parked[:2]
    handlers.trim()
    assert handlers._parked == [used]  # the one this second needed stays
    assert wait_until(lambda: all(greenlet.dead for greenlet in oldest))
    handlers.trim()  # unused for a whole tick now
    assert len(handlers) == 0 and wait_until(lambda: used.dead)
    handlers.close()
    late = handlers.spawn(lambda: None)
    assert wait_until(lambda: late.dead) and len(handlers) == 0  # closed: none parks


def test_no_more_than_max_parked_are_kept(proxy_factory):
    proxy = proxy_factory()
    handlers = proxy.server.handlers
    handlers.limit = 2
    socks = [socket.create_connection(proxy.address, timeout=10) for _ in range(4)]
    assert wait_until(lambda: proxy.server.open_connections() == 4)
    for sock in socks:
        sock.close()
    assert wait_until(lambda: proxy.server.open_connections() == 0)
    assert len(handlers) == 2
    assert MAX_PARKED >= 50  # the bench's 50 clients at a time reuse theirs


def test_a_kill_meant_for_an_ended_request_spares_the_next_connection(proxy_factory,
                                                                      raw_origin):
    proxy = proxy_factory(detach_after=60)
    server = raw_origin(echo)
    first = _tunnel(proxy, server.port)
    transaction, = proxy.server.active.values()
    greenlet = transaction.greenlet
    assert greenlet is not None
    first.close()
    assert wait_until(lambda: len(proxy.server.handlers) == 1)
    second = _tunnel(proxy, server.port)  # served by the greenlet the first one had
    try:
        now, = proxy.server.active.values()
        assert now.greenlet is greenlet and transaction.greenlet is None
        transaction.close("admin")  # late: its request is over, nothing is queued
        # A close made while the request was in flight, whose callback the hub runs only
        # now, after the greenlet went on to the second connection: it must do nothing.
        gevent.get_hub().loop.run_callback(transaction._cut, greenlet)
        gevent.sleep(0)  # queued after it: the callback has run when this returns
        second.sendall(b"pong")
        assert second.recv(4) == b"pong"
        assert not greenlet.dead
        # The admin's close of the request in flight still ends it, and its greenlet.
        assert proxy.server.close_connection(now.ctx.conn_id)
        assert wait_until(lambda: greenlet.dead)
        second.settimeout(10)
        assert second.recv(100) == b""
    finally:
        second.close()
    assert len(proxy.server.handlers) == 0  # a killed greenlet never parks


def test_a_stop_ends_the_parked_greenlets(proxy_factory, no_leaks):
    proxy = proxy_factory()
    assert _healthz(proxy).startswith(b"HTTP/1.1 200 ")
    assert wait_until(lambda: len(proxy.server.handlers) == 1)
    parked = proxy.server.handlers._parked[0]
    proxy.server.stop(timeout=1)
    assert wait_until(lambda: parked.dead)
    assert len(proxy.server.handlers) == 0 and proxy.server.handlers.closed


@pytest.mark.parametrize("workers", [1, 2])
def test_debug_stats_count_parked_greenlets_apart(proxy_process, raw_origin, workers):
    proxy = proxy_process(f"workers = {workers}\n{ADMIN}")
    assert wait_until(lambda: any("admin listener on" in line for line in proxy.log))
    line = next(line for line in proxy.log if "admin listener on" in line)
    admin = "http://" + re.search(r"admin listener on (\S+)", line).group(1)

    def stats() -> dict:
        answer = requests.get(admin + "/debug/stats", timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    assert wait_until(lambda: len(stats()["workers"]) == workers)
    # Enough connections that every worker serves some (the kernel spreads them).
    for _ in range(20 * workers):
        assert _healthz(proxy).startswith(b"HTTP/1.1 200 ")
    seen = {}

    def parked() -> bool:
        seen.update(stats())
        return seen["parked_greenlets"] >= 1 and seen["connections"] == 0

    assert wait_until(parked, limit=10)
    assert seen["parked_greenlets"] == sum(w["parked_greenlets"] for w in seen["workers"])
    assert wait_until(lambda: stats()["parked_greenlets"] == 0, limit=10)
    assert proxy.stop() == 0
