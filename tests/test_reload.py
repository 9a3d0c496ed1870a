"""Reload (SIGHUP): a new configuration for new connections, the old one kept by open ones."""

from __future__ import annotations

import signal
import socket

import gevent
import pytest

from geproxy.testing import (
    ResponseReader,
    curl,
    echo,
    exchange,
    kit_ini,
    open_tunnel,
    wait_for_records,
)

ALLOW = "[acl]\nconnect_ports = 1-65535\nrules = allow src 127.0.0.1\n"
DENY = "[acl]\nconnect_ports = 1-65535\nrules = closed: deny all\n"


def _rewrite(proxy, text: str) -> None:
    with open(proxy.server.config.path, "w", encoding="utf-8") as handle:
        handle.write(kit_ini(text))


def test_a_reload_changes_the_acl_and_an_open_tunnel_keeps_working(proxy_factory,
                                                                      raw_origin, origin):
    proxy = proxy_factory(ALLOW)
    server = raw_origin(echo)
    tunnel = proxy.connect()
    try:
        tunnel.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n\r\n".encode())
        assert tunnel.recv(1000).startswith(b"HTTP/1.1 200 ")
        _rewrite(proxy, DENY)
        assert proxy.server.reload()
        # New connections get the new policy: refused at connect.
        refused = exchange(proxy.address, b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 403 "), refused
        # The open tunnel keeps its policy and its bytes.
        tunnel.settimeout(10)
        tunnel.sendall(b"still here")
        assert tunnel.recv(100) == b"still here"
    finally:
        tunnel.close()
    assert any(r.rule == "closed" for r in wait_for_records(proxy, 2))


def test_a_broken_file_changes_nothing(proxy_factory, origin, caplog):
    proxy = proxy_factory(ALLOW)
    with open(proxy.server.config.path, "a", encoding="utf-8") as handle:
        handle.write("\n[acl]\nmode = sometimes\n")  # a duplicate section, a bad value
    before = proxy.server.gen
    assert not proxy.server.reload()
    assert proxy.server.gen is before
    assert "reload refused" in caplog.text
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"


def test_the_old_generation_is_released_when_its_last_connection_ends(proxy_factory,
                                                                        raw_origin, tmp_path):
    """Its access log file is closed then: the leak check of every test would see it."""
    log = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {log}\n" + ALLOW)
    server = raw_origin(echo)
    tunnel = proxy.connect()
    try:
        tunnel.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n\r\n".encode())
        assert tunnel.recv(1000).startswith(b"HTTP/1.1 200 ")
        old = proxy.server.gen
        _rewrite(proxy, f"access_log = {log}\n" + ALLOW)
        assert proxy.server.reload()
        assert old.retired and not old.released  # the tunnel still uses it
    finally:
        tunnel.close()
    for _ in range(500):
        if old.released:
            break
        gevent.sleep(0.01)
    assert old.released
    assert "CONNECT" in log.read_text()  # the old generation logged its tunnel


def test_sighup_reloads_the_running_process(proxy_process, origin, tmp_path):
    proxy = proxy_process(ALLOW)
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    path = next(tmp_path.glob("process-*.ini"))
    path.write_text(kit_ini(DENY, access_log="-"))
    proxy.process.send_signal(signal.SIGHUP)
    for _ in range(1000):  # bounded: until the process says it reloaded
        if any("reloaded" in line for line in proxy.log):
            break
        gevent.sleep(0.01)
    assert any("reloaded" in line for line in proxy.log), proxy.log[-5:]
    refused = curl("-x", proxy.url, origin.url("/"))
    assert refused.stdout == b"403 Forbidden\n", refused.stderr


# -- a reload applies to what comes next ---------------------------------------------------

ADMIN = "admin_listen = 127.0.0.1:0\n"


def _revoking(port: int, extra: str = "") -> str:
    """An ACL that refuses ``port`` (decided per request, not at connect)."""
    return (f"{extra}[acl]\nconnect_ports = 1-65535\nmax_connections_per_client = 1\n"
            f"rules =\n    revoked: deny port {port}\n    allow all\n")


def _metric(proxy, name: str) -> float:
    import requests

    host, port = proxy.server.admin_address
    text = requests.get(f"http://{host}:{port}/metrics", timeout=10).text
    found = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(found[0])


def test_the_next_request_of_a_kept_alive_connection_follows_the_reload(proxy_factory,
                                                                         origin):
    """A destination the reload revokes is refused on a connection opened before it; what
    belongs to the connection (its per-client count, the open-connection gauge) stays with
    the configuration it was accepted with, so nothing leaks or goes negative."""
    base = ADMIN + "[acl]\nconnect_ports = 1-65535\nmax_connections_per_client = 1\n"
    proxy = proxy_factory(base + "rules = allow all\n")
    get = (f"GET {origin.url('/')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
           ).encode()
    with socket.create_connection(proxy.address, timeout=10) as sock:
        answers = ResponseReader(sock)
        sock.sendall(get)
        head, body = answers.read()
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello\n"
        _rewrite(proxy, ADMIN + _revoking(origin.port))
        assert proxy.server.reload()
        sock.sendall(get)
        head, body = answers.read()
        assert head.startswith(b"HTTP/1.1 403 ") and b"error=http_request_denied" in head
        first, second = wait_for_records(proxy, 2)
        assert first.ctx.conn_id == second.ctx.conn_id  # the same kept-alive connection
        assert (first.rule, second.rule) == (None, "revoked")
        assert _metric(proxy, "geproxy_connections_open") == 1
    for _ in range(500):  # bounded: until the proxy saw the close
        if _metric(proxy, "geproxy_connections_open") == 0:
            break
        gevent.sleep(0.01)
    assert _metric(proxy, "geproxy_connections_open") == 0
    assert _metric(proxy, "geproxy_requests_in_flight") == 0
    # Its per-client count went with it: the one connection the client may have is free.
    out = curl("-x", proxy.url, f"http://127.0.0.1:{proxy.port}/healthz")
    assert out.returncode == 0 and out.stdout == b"ok\n"


def _tunnel(proxy, port: int) -> socket.socket:
    sock, head = open_tunnel(proxy, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


def _connect_status(proxy, port: int) -> int:
    """The status a new CONNECT to ``port`` gets (a refused CONNECT with nothing after it
    may stay open)."""
    sock, head = open_tunnel(proxy, f"127.0.0.1:{port}")
    sock.close()
    return int(head.split()[1])


def _closed(sock) -> bool:
    """Whether the proxy closed the tunnel (bounded wait for its end)."""
    sock.settimeout(10)
    try:
        return sock.recv(100) == b""
    except OSError:
        return True


def _alive(sock) -> bool:
    sock.settimeout(10)
    sock.sendall(b"ping")
    return sock.recv(100) == b"ping"


@pytest.mark.parametrize("detached", [False, True], ids=["waiting", "detached"])
def test_reload_tunnels_recheck_closes_the_tunnels_now_refused(proxy_factory, raw_origin,
                                                               detached):
    revoked, kept = raw_origin(echo), raw_origin(echo)
    proxy = proxy_factory("[acl]\nconnect_ports = 1-65535\nrules = allow all\n")
    first, second = _tunnel(proxy, revoked.port), _tunnel(proxy, kept.port)
    try:
        if detached:  # relaying with no greenlet, as every long-lived tunnel does
            for _ in range(500):
                if len(proxy.server.detached) == 2:
                    break
                gevent.sleep(0.01)
            assert len(proxy.server.detached) == 2
        _rewrite(proxy, "reload_tunnels = recheck\n" + _revoking(revoked.port))
        assert proxy.server.reload()
        assert _closed(first)
        assert _alive(second)
        record = next(r for r in wait_for_records(proxy, 1)
                      if r.target == f"127.0.0.1:{revoked.port}")
        assert record.close_reason == "reload" and record.status == 200
        # A new tunnel to the revoked port is refused; to the other, let through.
        assert _connect_status(proxy, revoked.port) == 403
    finally:
        first.close()
        second.close()


def test_reload_tunnels_keep_lets_open_tunnels_run(proxy_factory, raw_origin):
    revoked = raw_origin(echo)
    proxy = proxy_factory("[acl]\nconnect_ports = 1-65535\nrules = allow all\n")
    tunnel = _tunnel(proxy, revoked.port)
    try:
        _rewrite(proxy, _revoking(revoked.port))  # reload_tunnels = keep, the default
        assert proxy.server.reload()
        assert _alive(tunnel)
        assert _connect_status(proxy, revoked.port) == 403
    finally:
        tunnel.close()


def test_recheck_applies_the_destination_guard_to_the_connected_address(proxy_factory,
                                                                         raw_origin):
    server = raw_origin(echo)
    acl = "[acl]\nconnect_ports = 1-65535\nrules = allow all\n"
    proxy = proxy_factory(acl + "[destinations]\nallow = 127.0.0.0/8\n")
    tunnel = _tunnel(proxy, server.port)
    try:
        _rewrite(proxy, "reload_tunnels = recheck\n" + acl + "[destinations]\nallow =\n")
        assert proxy.server.reload()
        assert _closed(tunnel)
        record, = wait_for_records(proxy, 1)
        assert record.close_reason == "reload"
    finally:
        tunnel.close()


def test_recheck_keeps_the_identity_the_tunnel_was_opened_with(proxy_factory, raw_origin,
                                                               tmp_path):
    """No credentials are asked again: a tunnel opened by alice stays while alice may, and
    is closed once the new rules let only bob through."""
    import base64

    from passlib.hash import bcrypt

    htpasswd = tmp_path / "users"
    htpasswd.write_text("alice:" + bcrypt.using(ident="2y", rounds=4).hash("pw") + "\n")
    server = raw_origin(echo)

    def policy(user: str) -> str:
        return ("reload_tunnels = recheck\n[auth]\nhtpasswd = " + str(htpasswd) + "\n"
                "[acl]\nconnect_ports = 1-65535\n"
                f"rules =\n    allow user {user}\n    deny all\n")

    proxy = proxy_factory(policy("alice"))
    credentials = base64.b64encode(b"alice:pw").decode()
    tunnel = socket.create_connection(proxy.address, timeout=10)
    try:
        tunnel.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: x\r\n"
                       f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode())
        assert tunnel.recv(1000).startswith(b"HTTP/1.1 200 ")
        _rewrite(proxy, policy("alice"))
        assert proxy.server.reload()
        proxy.server.rechecking.join(timeout=10)  # it runs in a greenlet of its own
        assert proxy.server.rechecking.dead
        assert _alive(tunnel)
        _rewrite(proxy, policy("bob"))
        assert proxy.server.reload()
        assert _closed(tunnel)
        record, = wait_for_records(proxy, 1)
        assert record.close_reason == "reload" and record.ctx.user == "alice"
    finally:
        tunnel.close()
