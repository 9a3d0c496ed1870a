"""Reload (SIGHUP): a new configuration for new connections, the old one kept by open ones."""

from __future__ import annotations

import signal

import gevent

from geproxy.testing import curl, echo, exchange, kit_ini, wait_for_records

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
