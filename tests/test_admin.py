"""The admin listener (``admin_listen``): health, readiness while draining, /tunnels and
closing a tunnel, /metrics without the plugin, /debug/stats, and what the proxy port does
not serve."""

from __future__ import annotations

import os
import socket
import time

import gevent
import pytest
import requests

from geproxy import ConfigError
from geproxy.testing import curl, echo, exchange, open_tunnel, recv_all, wait_for_records

ADMIN = "admin_listen = 127.0.0.1:0\n"

# Every test here twice: tunnels relaying with their greenlet waiting, and detached at once.
pytestmark = pytest.mark.usefixtures("relay_mode")



def _admin_url(proxy, path: str) -> str:
    host, port = proxy.server.admin_address
    return f"http://{host}:{port}{path}"


def _open_tunnel(proxy, target: str) -> socket.socket:
    """CONNECT through ``proxy`` and check one echo round through the tunnel."""
    sock, head = open_tunnel(proxy, target)
    assert head.startswith(b"HTTP/1.1 200 "), head
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    return sock


def test_admin_is_off_by_default(proxy):
    assert proxy.server.admin_address is None
    assert proxy.server.admin is None


def test_healthz_and_readyz(proxy_factory):
    proxy = proxy_factory(ADMIN)
    assert proxy.server.admin_address[1] not in (0, proxy.port)
    for path, body in (("/healthz", b"ok\n"), ("/readyz", b"ready\n")):
        out = curl("-i", _admin_url(proxy, path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(b"HTTP/1.1 200 ") and out.stdout.endswith(body)
    answer = requests.get(_admin_url(proxy, "/nothing"), timeout=10)
    assert answer.status_code == 404
    answer = requests.post(_admin_url(proxy, "/readyz"), timeout=10)
    assert answer.status_code == 405


def test_readyz_answers_503_while_a_stop_drains(proxy_factory, raw_origin):
    proxy = proxy_factory(ADMIN)
    server = raw_origin(echo)
    sock = _open_tunnel(proxy, f"127.0.0.1:{server.port}")
    admin = proxy.server.admin_address
    stopper = gevent.spawn(proxy.server.stop, 30)
    try:
        for _ in range(100):
            if proxy.server.stopping:
                break
            gevent.sleep(0.01)
        assert proxy.server.stopping
        answer = requests.get(_admin_url(proxy, "/readyz"), timeout=10)
        assert answer.status_code == 503
        assert requests.get(_admin_url(proxy, "/healthz"), timeout=10).status_code == 200
        # The proxy port is closed already; the admin port is open until the end.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=10).close()
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
        stopper.join(timeout=10)
        assert stopper.dead and stopper.successful()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(admin, timeout=10).close()
    finally:
        sock.close()
        stopper.kill()


def test_tunnels_lists_an_open_tunnel_and_closes_it(proxy_factory, raw_origin):
    proxy = proxy_factory(ADMIN)
    server = raw_origin(echo)
    target = f"127.0.0.1:{server.port}"
    sock = _open_tunnel(proxy, target)
    try:
        answer = requests.get(_admin_url(proxy, "/tunnels"), timeout=10)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        found = [t for t in answer.json() if t["target"] == target]
        assert len(found) == 1, answer.json()
        tunnel = found[0]
        assert tunnel["client"] == "127.0.0.1:%d" % sock.getsockname()[1]
        assert tunnel["method"] == "CONNECT" and tunnel["user"] is None
        assert tunnel["age"] >= 0 and tunnel["bytes_in"] >= 4 and tunnel["bytes_out"] >= 4
        # A GET on the close URL changes nothing.
        answer = requests.get(_admin_url(proxy, f"/tunnels/{tunnel['id']}/close"), timeout=10)
        assert answer.status_code == 405 and answer.headers["allow"] == "POST"
        sock.sendall(b"pong")
        assert sock.recv(4) == b"pong"

        answer = requests.post(_admin_url(proxy, f"/tunnels/{tunnel['id']}/close"),
                               timeout=10)
        assert answer.status_code == 200
        assert recv_all(sock) == b""  # the client sees the close
    finally:
        sock.close()
    records = wait_for_records(proxy, 1)
    assert records[0].method == "CONNECT" and records[0].close_reason == "admin"
    assert requests.get(_admin_url(proxy, "/tunnels"), timeout=10).json() == []


def test_closing_an_unknown_connection_is_404(proxy_factory):
    proxy = proxy_factory(ADMIN)
    answer = requests.post(_admin_url(proxy, "/tunnels/c0/close"), timeout=10)
    assert answer.status_code == 404


def test_metrics_is_404_without_the_metrics_plugin(proxy_factory):
    proxy = proxy_factory(ADMIN + "disable = metrics\n")
    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(_admin_url(proxy, "/metrics"), timeout=10)
        assert answer.status_code == 404


def test_the_proxy_port_serves_no_admin_page(proxy_factory):
    proxy = proxy_factory(ADMIN)
    for path in ("/tunnels", "/readyz", "/metrics", "/debug/stats"):
        answer = exchange(proxy.address, f"GET {path} HTTP/1.1\r\nHost: p\r\n"
                          "Connection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 404 "), (path, answer)
    answer = exchange(proxy.address, b"POST /tunnels/c1/close HTTP/1.1\r\nHost: p\r\n"
                      b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")
    answer = exchange(proxy.address, b"GET /healthz HTTP/1.1\r\nHost: p\r\n"
                      b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


#: The figures of one process, summed over the workers at the top level.
FIGURES = {"rss_kib", "open_fds", "greenlets", "parked_greenlets", "threads", "connections",
           "idle_connections", "in_flight", "tunnels", "detached_tunnels", "upstream_pool"}
STATS_KEYS = FIGURES | {"pid", "generation", "stopping", "workers"}


def _stats(proxy) -> dict:
    answer = requests.get(_admin_url(proxy, "/debug/stats"), timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    return answer.json()


def _stats_until(proxy, done, limit: float = 10.0) -> dict:
    """/debug/stats once ``done(stats)`` holds (bounded wait); the last answer else."""
    deadline = time.monotonic() + limit
    stats = _stats(proxy)
    while not done(stats) and time.monotonic() < deadline:
        gevent.sleep(0.02)
        stats = _stats(proxy)
    return stats


def test_debug_stats_follow_a_tunnel_and_a_pooled_connection(proxy_factory, raw_origin,
                                                               origin):
    proxy = proxy_factory(ADMIN)
    server = raw_origin(echo)
    before = _stats(proxy)
    assert set(before) == STATS_KEYS
    # The proxy runs in this process here: its figures are this process's, the same at
    # the top and as its one worker's, as a master gives them for its workers.
    assert before["pid"] == os.getpid()
    worker, = before["workers"]
    assert set(worker) == FIGURES | {"worker", "pid", "generation", "stopping"}
    assert worker["worker"] == 0 and worker["pid"] == os.getpid()
    assert all(worker[name] == before[name] for name in FIGURES - {"greenlets", "open_fds"})
    assert 10_000 < before["rss_kib"] < 4_000_000
    assert 3 < before["open_fds"] < 1000 and before["threads"] >= 1
    assert before["greenlets"] >= 0 and before["generation"] == 1
    assert before["stopping"] is False
    assert (before["connections"], before["in_flight"], before["tunnels"],
            before["upstream_pool"]) == (0, 0, 0, 0)

    sock = _open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        during = _stats(proxy)
        assert (during["connections"], during["in_flight"], during["tunnels"]) == (1, 1, 1)
        # The client's socket, the proxy's two and the origin's: all in this process.
        assert during["open_fds"] >= before["open_fds"] + 4
        # The connection's greenlet (until DETACH_AFTER) and the origin's handler; then the
        # tunnel goes on without the first, and is still a connection and a tunnel.
        assert during["greenlets"] - before["greenlets"] in (1, 2)
        later = _stats_until(proxy, lambda s: s["greenlets"] == before["greenlets"] + 1)
        assert later["greenlets"] == before["greenlets"] + 1
        assert (later["connections"], later["in_flight"], later["tunnels"]) == (1, 1, 1)
        # A tunnel that relays with no greenlet waiting for it is told apart.
        assert later["detached_tunnels"] == 1
    finally:
        sock.close()
    after = _stats_until(proxy, lambda s: s["connections"] == 0 and
                         s["open_fds"] <= before["open_fds"])
    assert (after["connections"], after["in_flight"], after["tunnels"]) == (0, 0, 0)
    assert after["open_fds"] <= before["open_fds"]

    # A plain GET with keep-alive leaves its upstream connection in the pool.
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    pooled = _stats_until(proxy, lambda s: s["upstream_pool"] == 1 and s["connections"] == 0)
    assert pooled["upstream_pool"] == 1 and pooled["tunnels"] == 0
    assert pooled["connections"] == 0
    assert pooled["open_fds"] >= after["open_fds"] + 1


def test_debug_stats_is_read_only_and_counts_reloads(proxy_factory):
    proxy = proxy_factory(ADMIN)
    answer = requests.post(_admin_url(proxy, "/debug/stats"), timeout=10)
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD"
    out = curl("-I", _admin_url(proxy, "/debug/stats"))
    assert out.returncode == 0 and out.stdout.startswith(b"HTTP/1.1 200 "), out.stderr
    assert proxy.server.reload()
    assert _stats(proxy)["generation"] == 2


def test_debug_stats_cannot_be_put_on_the_proxy_port(proxy_factory):
    with pytest.raises(ConfigError, match="local_paths"):
        proxy_factory(ADMIN + "local_paths = /healthz /debug/stats\n")


def test_a_busy_admin_port_fails_the_start(proxy_factory):
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            proxy_factory(f"admin_listen = 127.0.0.1:{port}\n")
    finally:
        taken.close()


@pytest.mark.parametrize("value", ["example.com:9128", "127.0.0.1:9128 127.0.0.2:9128",
                                   "9128"])
def test_a_bad_admin_address_stops_the_start(proxy_factory, value):
    with pytest.raises(ConfigError, match="admin_listen"):
        proxy_factory(f"admin_listen = {value}\n")
