"""CONNECT tunnels end to end: real clients, real origins, real sockets on loopback."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import time

import gevent
import pytest

from geproxy import Denied, hookimpl
from geproxy.testing import (
    curl,
    echo,
    exchange,
    open_tunnel,
    pattern,
    pattern_sha256,
    recv_all,
    require_tool,
    wait_for_records,
)

# Every test here twice: tunnels relaying with their greenlet waiting, and detached at once.
pytestmark = pytest.mark.usefixtures("relay_mode")


def test_curl_https_through_connect(proxy, tls_origin, ca_file):
    size = 3 * 1024 * 1024 + 17
    out = curl("--cacert", ca_file, "-x", proxy.url,
               tls_origin.url(f"/bytes/{size}", host="origin.test"))
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == pattern_sha256(size)
    record = wait_for_records(proxy, 1)[-1]
    assert (record.method, record.status) == ("CONNECT", 200)
    assert record.target == f"origin.test:{tls_origin.port}"
    assert record.bytes_out > size  # the TLS records on top of the body
    assert record.upstream_addr == ("127.0.0.1", tls_origin.port)


def test_curl_proxytunnel_for_http(proxy, origin):
    out = curl("-p", "-x", proxy.url, origin.url("/echo", host="origin.test"))
    assert out.returncode == 0, out.stderr
    assert b'"path": "/echo"' in out.stdout
    # Inside a tunnel the proxy adds nothing: no Via reaches the origin.
    assert "via" not in origin.seen[-1].headers


def test_curl_http2_over_the_tunnel(proxy, tls_ca, ca_file, tmp_path):
    nginx = require_tool("nginx")
    cert = tls_ca.issue_cert("origin.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "origin.pem"))
    (tmp_path / "index.html").write_text("over h2\n")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; user root; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
  fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {tmp_path}/origin.pem; ssl_certificate_key {tmp_path}/origin.pem;
    root {tmp_path};
  }}
}}
""")
    process = subprocess.Popen([nginx, "-c", str(conf), "-e", str(tmp_path / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                gevent.sleep(0.05)
        out = curl("--http2", "--cacert", ca_file, "-x", proxy.url, "-w", "%{http_version}",
                   f"https://origin.test:{port}/index.html")
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"over h2\n2"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_bytes_after_the_connect_head_go_into_the_tunnel(proxy, origin):
    request = b"GET /echo HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
    sock, head = open_tunnel(proxy, f"origin.test:{origin.port}", extra=request)
    try:
        data = head + recv_all(sock)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 200 Connection Established\r\n")
    answer = data.split(b"\r\n\r\n", 1)[1]
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"path": "/echo"' in answer


def test_connect_to_an_ipv6_literal(proxy_factory, raw_origin):
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"hello over v6")
        conn.close()

    server = gevent.spawn(serve)
    try:
        proxy = proxy_factory()
        sock, head = open_tunnel(proxy, f"[::1]:{port}")
        try:
            assert head.startswith(b"HTTP/1.1 200 ")
            assert (head.split(b"\r\n\r\n", 1)[1] + recv_all(sock)) == b"hello over v6"
        finally:
            sock.close()
    finally:
        server.kill()
        listener.close()


def test_half_close_from_the_client(proxy, raw_origin):
    """The client's FIN reaches the origin, which still answers on its half."""

    def echo_after_eof(sock: socket.socket) -> None:
        sock.sendall(b"got:" + recv_all(sock))

    server = raw_origin(echo_after_eof)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"ping" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"got:" + b"ping" * 1000
    finally:
        sock.close()


def test_half_close_from_the_origin(proxy, raw_origin):
    """The origin's FIN reaches the client, whose bytes still flow to the origin."""
    received = []

    def speak_then_listen(sock: socket.socket) -> None:
        sock.sendall(b"banner")
        sock.shutdown(socket.SHUT_WR)
        received.append(recv_all(sock))

    server = raw_origin(speak_then_listen)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        body = head.split(b"\r\n\r\n", 1)[1]
        sock.settimeout(10)
        while len(body) < len(b"banner"):
            body += sock.recv(100)
        assert body == b"banner"
        assert sock.recv(100) == b""  # the origin's half-close arrived as EOF
        sock.sendall(b"late words")  # our half is still open
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(10):
            while not received:
                gevent.sleep(0.01)
        assert received == [b"late words"]
    finally:
        sock.close()


def test_idle_timeout_from_the_first_moment(proxy_factory, raw_origin):
    """A tunnel where nothing ever moves is closed after idle_timeout."""
    proxy = proxy_factory("idle_timeout = 300ms\n")
    server = raw_origin(lambda sock: sock.recv(1))
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the proxy, long before our 10 s
    finally:
        sock.close()
    assert wait_for_records(proxy, 1)[-1].close_reason == "idle timeout"


def test_activity_keeps_a_tunnel_open_past_idle_timeout(proxy_factory, raw_origin):
    proxy = proxy_factory("idle_timeout = 1s\n")
    server = raw_origin(echo)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.settimeout(10)
        for _ in range(12):  # about 2.4 s in all, never 1 s of silence
            sock.sendall(b"x")
            assert sock.recv(10) == b"x"
            gevent.sleep(0.2)
    finally:
        sock.close()


def test_happy_eyeballs_skips_a_silent_address(proxy_factory, origin, blackhole):
    """The first address drops SYNs; the second answers and wins long before the timeout."""
    silent = ("127.0.0.1", blackhole)
    good = ("127.0.0.1", origin.port)

    class TwoPorts:
        @hookimpl(tryfirst=True)
        def resolve(self, ctx, host, port):
            return [silent, good] if host == "dual.test" else None

    # With one attempt at a time, the silent address would use up connect_timeout: 504.
    proxy = proxy_factory("connect_timeout = 20s\n", plugins=[TwoPorts()])
    sock, head = open_tunnel(proxy, "dual.test:443")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert wait_for_records(proxy, 1)[-1].upstream_addr == good


def test_connect_timeout_answers_504(proxy_factory, blackhole):
    proxy = proxy_factory("connect_timeout = 300ms\n")
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{blackhole} HTTP/1.1\r\n\r\n".encode(),
                      until_close=False)
    assert answer.startswith(b"HTTP/1.1 504 ")
    assert b"Proxy-Status: geproxy; error=connection_timeout\r\n" in answer


def test_tls_through_the_tunnel_with_python_ssl(proxy, tls_origin, ca_file):
    """A Python TLS client inside a raw tunnel: the proxy never touches the TLS bytes."""
    sock, head = open_tunnel(proxy, f"origin.test:{tls_origin.port}")
    assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    context = ssl.create_default_context(cafile=ca_file)
    with context.wrap_socket(sock, server_hostname="origin.test") as tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n")
        data = recv_all(tls)
    assert data.startswith(b"HTTP/1.1 200 OK") and b'"path": "/echo"' in data


def test_listens_on_several_addresses_ipv4_and_ipv6(proxy_factory, origin):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proxy = proxy_factory("listen = 127.0.0.1:0 [::1]:0\n")
    assert [host for host, _ in proxy.server.addresses] == ["127.0.0.1", "::1"]
    for host, port in proxy.server.addresses:
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        out = curl("-p", "-x", url, origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    clients = {record.ctx.client_addr[0] for record in wait_for_records(proxy, 2)}
    assert clients == {"127.0.0.1", "::1"}


def test_a_stop_drains_then_cuts_tunnels_and_records_them(proxy_factory, raw_origin):
    proxy = proxy_factory("graceful_timeout = 300ms\n")
    server = raw_origin(lambda sock: sock.recv(1))
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        stopper = gevent.spawn(proxy.server.stop)
        assert recv_all(sock) == b""  # cut once graceful_timeout is over
        stopper.join(timeout=10)
        assert stopper.dead
    finally:
        sock.close()
    record = wait_for_records(proxy, 1)[-1]
    assert (record.method, record.status, record.close_reason) == ("CONNECT", 200, "shutdown")
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=2).close()  # no longer listening


def test_on_tunnel_data_sees_the_first_bytes_and_may_close(proxy_factory, raw_origin):
    seen = []

    class Peek:
        @hookimpl
        def on_tunnel_data(self, ctx, request, record, data):
            seen.append(data)
            record.sni = "peeked.test"
            if data.startswith(b"BAD"):
                return Denied("not allowed in", rule="peek")
            return None

    def banner_then_echo(sock: socket.socket) -> None:
        sock.sendall(b"hello first\n")  # a server that speaks first is not held up
        data = sock.recv(100)
        if data:
            sock.sendall(data.upper())

    proxy = proxy_factory(plugins=[Peek()])
    server = raw_origin(banner_then_echo)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        sock.settimeout(10)
        body = head.split(b"\r\n\r\n", 1)[1]
        while b"\n" not in body:
            body += sock.recv(100)
        assert body == b"hello first\n" and seen == []  # before the client said anything
        sock.sendall(b"good words")
        assert sock.recv(100) == b"GOOD WORDS"
    finally:
        sock.close()
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}", extra=b"BAD bytes")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        recv_all(sock)  # closed by the proxy; the origin never got the bytes
    finally:
        sock.close()
    assert seen == [b"good words", b"BAD bytes"]
    records = wait_for_records(proxy, 2)
    refused = [r for r in records if r.rule == "peek"]
    assert len(refused) == 1 and refused[0].close_reason == "denied"
    assert refused[0].error == "http_request_denied" and refused[0].sni == "peeked.test"


def test_max_tunnel_lifetime_closes_a_busy_tunnel(proxy_factory, raw_origin):
    proxy = proxy_factory("max_tunnel_lifetime = 500ms\nidle_timeout = 1m\n")
    server = raw_origin(echo)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    closed = False
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.settimeout(10)
        for _ in range(200):  # busy all the time, never idle: only the lifetime ends it
            try:
                sock.sendall(b"x")
                if sock.recv(10) == b"":
                    closed = True
                    break
            except OSError:
                closed = True
                break
            gevent.sleep(0.02)
    finally:
        sock.close()
    assert closed
    assert wait_for_records(proxy, 1)[-1].close_reason == "max lifetime"


# -- the relay's two ways of moving bytes: recv/send, and splice past SPLICE_AFTER ----------

SPLICED = 4 * 1024 * 1024 + 4099  # well past SPLICE_AFTER, and not a multiple of any buffer


@pytest.fixture
def splice_calls(monkeypatch):
    """Counts the relay's os.splice calls (the real ones: the wrapper only counts)."""
    import os

    from geproxy.relay import tunnel

    calls = []
    real = os.splice

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "splice", counting)
    return calls, monkeypatch, tunnel


@pytest.mark.parametrize("spliced", [True, False], ids=["splice", "recv-send"])
def test_a_large_echo_both_ways_then_half_close(proxy, raw_origin, splice_calls, spliced):
    calls, monkeypatch, tunnel = splice_calls
    if not spliced:
        monkeypatch.setattr(tunnel, "_SPLICE", False)
    server = raw_origin(echo)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    data = b"".join(pattern(SPLICED))
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        sender = gevent.spawn(sock.sendall, data)
        got = bytearray()
        with gevent.Timeout(30):
            while len(got) < len(data):
                piece = sock.recv(1 << 20)
                assert piece, "the tunnel closed early"
                got += piece
        sender.get(timeout=10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        sock.shutdown(socket.SHUT_WR)  # the echo sees EOF and closes: so does the tunnel
        assert recv_all(sock) == b""
    finally:
        sock.close()
    record = wait_for_records(proxy, 1)[-1]
    assert record.close_reason == "done"
    target = f"127.0.0.1:{server.port}"
    connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"  # as open_tunnel sends
    assert record.bytes_in == len(connect) + SPLICED
    assert record.bytes_out == len(head) + SPLICED
    assert bool(calls) == spliced  # the fast path was taken, or not at all


def test_idle_timeout_holds_on_a_spliced_tunnel(proxy_factory, raw_origin, splice_calls):
    calls, _, _ = splice_calls
    proxy = proxy_factory("idle_timeout = 500ms\n")
    server = raw_origin(echo)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        sock.sendall(b"x" * SPLICED)
        got = 0
        with gevent.Timeout(30):
            while got < SPLICED:
                got += len(sock.recv(1 << 20))
        assert calls  # spliced by now; then nothing moves
        assert recv_all(sock, timeout=10) == b""  # closed at idle_timeout
    finally:
        sock.close()
    record = wait_for_records(proxy, 1)[-1]
    assert record.close_reason == "idle timeout"
