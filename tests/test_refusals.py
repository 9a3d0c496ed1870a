"""Refusals that tell what they are, and never leave a stream half-read.

- A destination the guard prohibits is a policy refusal (403); a parent it prohibits is the
  configuration's fault (502 ``proxy_configuration_error``), and every load warns of it.
- A client refused by ``on_connect`` (the ACL's address-only verdicts) gets a 403 to its
  first request, on plain, TLS and HTTP/2 listeners, unless the refusal is silent.
- Bytes a client sent behind a CONNECT (or Upgrade) head that was refused are never read as
  a request: the connection closes after the answer. With nothing behind the head it goes on.

Real proxies, origins and clients on loopback; the smuggled requests name a real origin,
which must never see them.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import gevent
import pytest
from passlib.hash import apr_md5_crypt

from geproxy import Denied, Response, hookimpl
from geproxy.policy.plugins import load
from geproxy.testing import (
    HookRecorder,
    RawOrigin,
    ResponseReader,
    StaticResolver,
    curl,
    exchange,
    free_port,
    head_field,
    wait_for_records,
)

pytestmark = pytest.mark.timeout(60)

DENIED = b"Proxy-Status: geproxy; error=http_request_denied\r\n"
#: Every client of these tests is 127.0.0.1: this [acl] refuses it by its address alone.
REFUSE_LOOPBACK = "[acl]\nconnect_ports = 1-65535\nrules = lo: deny src 127.0.0.1\n"




def _closed_after(sock: socket.socket, reader: ResponseReader, limit: float = 10) -> bool:
    """Whether the proxy closes ``sock`` with nothing more than what ``reader`` holds (an
    answer kept open is followed by silence; bounded by ``limit`` seconds)."""
    if reader.buf:
        return False
    try:
        return _closed(sock, limit)
    except socket.timeout:
        return False


def _closed(sock: socket.socket, limit: float = 10) -> bool:
    """Whether the proxy closes ``sock`` (EOF or a reset) with nothing more to say."""
    sock.settimeout(limit)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _proxy_header(client: str) -> bytes:
    """A PROXY protocol v1 header, as a balancer in front sends it for ``client``."""
    return f"PROXY TCP4 {client} 127.0.0.1 40000 3128\r\n".encode()


def _smuggled(origin: Any) -> bytes:
    """A request for the origin, as a client's bytes behind a head would carry it."""
    return (f"GET http://127.0.0.1:{origin.port}/smuggled HTTP/1.1\r\nHost: x\r\n"
            "Connection: close\r\n\r\n").encode()


# -- C.5: a client refused by its address is told ----------------------------------------


def test_a_client_refused_by_its_address_gets_403_to_its_first_request(proxy_factory,
                                                                         origin, tmp_path):
    log = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {log}\n" + REFUSE_LOOPBACK)
    out = curl("-i", "-x", proxy.url, origin.url("/"))
    assert out.stdout.startswith(b"HTTP/1.1 403 "), (out.stdout, out.stderr)
    assert DENIED in out.stdout and b"Empty reply" not in out.stderr
    tunnel = curl("-p", "-o", "/dev/null", "-w", "%{http_connect}", "-x", proxy.url,
                  origin.url("/"))
    assert tunnel.stdout == b"403", (tunnel.stdout, tunnel.stderr)
    # Its first request only: the connection closes after the 403, whatever follows.
    pipelined = (f"GET {origin.url('/a')} HTTP/1.1\r\nHost: x\r\n\r\n"
                 f"GET {origin.url('/b')} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    answer = exchange(proxy.address, pipelined)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 403 "), answer
    assert head_field(answer, b"connection") == b"close"
    assert answer.endswith(b"\r\n\r\n403 Forbidden\n")  # the rule stays in the log
    records = wait_for_records(proxy, 3)
    assert [(r.method, r.target, r.status, r.error, r.rule, r.close_reason)
            for r in records] == [
        ("GET", origin.url("/"), 403, "http_request_denied", "lo", "denied"),
        ("CONNECT", f"127.0.0.1:{origin.port}", 403, "http_request_denied", "lo", "denied"),
        ("GET", origin.url("/a"), 403, "http_request_denied", "lo", "denied")]
    assert origin.seen == []
    # The access log's line: the request it answered, 403, the error and the rule.
    deadline = time.monotonic() + 10
    while len(log.read_text().splitlines()) < 3 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    fields = log.read_text().splitlines()[0].split()
    assert fields[3:7] + fields[12:13] == [
        "GET", origin.url("/"), "403", "http_request_denied", "lo"], fields


def test_no_hook_but_the_observers_sees_a_refused_clients_request(proxy_factory, origin):
    recorder = HookRecorder()
    proxy = proxy_factory(REFUSE_LOOPBACK, plugins=[recorder])
    assert curl("-x", proxy.url, origin.url("/")).returncode == 0
    wait_for_records(proxy, 1)
    assert recorder.calls == [("on_connect", "127.0.0.1"), ("on_close", "GET 403")]


def test_a_silent_denial_closes_before_a_byte(proxy_factory, origin):
    recorder = HookRecorder()
    proxy = proxy_factory(REFUSE_LOOPBACK + "refuse_at_connect = close\n", plugins=[recorder])
    out = curl("-x", proxy.url, origin.url("/"))
    # As a firewall's drop: an empty reply, or a reset when the request was not yet read.
    assert out.returncode in (52, 56) and out.stdout == b"", out
    [record] = wait_for_records(proxy, 1)
    assert (record.method, record.status, record.error, record.rule, record.close_reason) == (
        "-", 0, "http_request_denied", "lo", "denied")
    assert recorder.calls == [("on_connect", "127.0.0.1"), ("on_close", "- 0")]


def test_whatever_a_refused_client_sends_it_is_told_it_is_refused(proxy_factory):
    """A head that is malformed, too large or late gets the 403 too; a client that sends
    nothing is closed at header_timeout, and its refusal is on record all the same."""
    proxy = proxy_factory("header_timeout = 500ms\nmax_header_size = 4KiB\n"
                          + REFUSE_LOOPBACK)
    for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",   # a TLS ClientHello
                 b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 8000 + b"\r\n\r\n",
                 b"GET http://x/ HTTP/1.1\r\nHost: x\r\n"):          # never finished
        answer = exchange(proxy.address, data)
        assert answer.startswith(b"HTTP/1.1 403 ") and DENIED in answer, answer
    with socket.create_connection(proxy.address, timeout=10) as silent:
        assert silent.recv(100) == b""  # closed at header_timeout, nothing said
    records = wait_for_records(proxy, 4)
    assert [(r.method, r.status, r.error, r.rule, r.close_reason) for r in records] == [
        ("-", 403, "http_request_denied", "lo", "denied")] * 3 + [
        ("-", 0, "http_request_denied", "lo", "denied")]


@pytest.mark.parametrize("refuse", ["answer", "close"])
def test_a_refused_client_on_a_tls_listener(proxy_factory, origin, tls_files, refuse):
    """answer: the handshake completes and the 403 goes over it; close: no handshake."""
    recorder = HookRecorder()
    proxy = proxy_factory("[geproxy]\nlisten = tls://127.0.0.1:0\n" + tls_files.ini()
                          + REFUSE_LOOPBACK + f"refuse_at_connect = {refuse}\n",
                          plugins=[recorder])
    out = curl("-i", "-x", proxy.tls_url, "--proxy-cacert", tls_files.ca_file,
               origin.url("/"))
    wait_for_records(proxy, 1)
    if refuse == "answer":
        assert out.stdout.startswith(b"HTTP/1.1 403 ") and DENIED in out.stdout, out.stderr
        assert recorder.calls == [("on_connect", "127.0.0.1"), ("on_tls_handshake", "ok"),
                                  ("on_close", "GET 403")]
    else:
        assert out.returncode != 0 and out.stdout == b"", out.stdout
        assert recorder.calls == [("on_connect", "127.0.0.1"), ("on_close", "- 0")]
    assert origin.seen == []


def test_a_refused_http2_client_gets_403_on_its_first_stream(proxy_factory, tls_files):
    from geproxy.testing.h2client import H2Client

    proxy = proxy_factory("[geproxy]\nlisten = tls://127.0.0.1:0\n"
                          + tls_files.ini(http2="on") + REFUSE_LOOPBACK)
    client = H2Client(proxy.tls_address, tls_files.ca_file)
    try:
        status, headers, body = client.request("GET", "http://127.0.0.1:9/")
        assert status == 403 and body == b"403 Forbidden\n"
        assert headers["proxy-status"] == "geproxy; error=http_request_denied"
        # Then the connection ends: GOAWAY, and the close.
        with gevent.Timeout(10, AssertionError("the refused connection stayed open")):
            client.reader.join()
        assert client.goaway is not None
    finally:
        client.close()
    [record] = wait_for_records(proxy, 1)
    assert (record.method, record.target, record.status, record.rule, record.close_reason) == (
        "GET", "http://127.0.0.1:9/", 403, "lo", "denied")


class _ConnectionCount:
    """Counts on_connect and on_disconnect: every refused connection gets both, once."""

    def __init__(self) -> None:
        self.connects = 0
        self.disconnects = 0

    @hookimpl(tryfirst=True)
    def on_connect(self, ctx: Any) -> None:
        self.connects += 1

    @hookimpl
    def on_disconnect(self, ctx: Any) -> None:
        self.disconnects += 1


@pytest.mark.parametrize("refuse", ["answer", "close"])
def test_refusals_behind_a_balancer_leak_no_count(proxy_factory, origin, refuse):
    """With the PROXY protocol the refusal judges (and records) the real client, and the
    per-client count of acl (max_connections_per_client) goes back to zero."""
    counter = _ConnectionCount()
    proxy = proxy_factory(
        "proxy_protocol = any\nproxy_protocol_from = 127.0.0.1/32\n"
        "[acl]\nmax_connections_per_client = 1\nconnect_ports = 1-65535\n"
        f"refuse_at_connect = {refuse}\n"
        "rules =\n    lb: allow src 192.0.2.0/24\n    rest: deny all\n", plugins=[counter])
    request = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    held = [socket.create_connection(proxy.address, timeout=10) for _ in range(3)]
    try:
        for sock in held:  # at once: over the per-client limit, all refused by the rule
            sock.sendall(_proxy_header("198.51.100.7") + request)
        for sock in held:
            if refuse == "answer":
                head, _ = ResponseReader(sock).read()
                assert head.startswith(b"HTTP/1.1 403 ") and DENIED in head + b"\r\n", head
            assert _closed(sock)
    finally:
        for sock in held:
            sock.close()
    records = wait_for_records(proxy, 3)
    assert {(r.ctx.client_addr[0], r.status, r.rule) for r in records} == {
        ("198.51.100.7", 403 if refuse == "answer" else 0, "rest")}
    acl = proxy.server.pm.get_plugin("acl")
    deadline = time.monotonic() + 10
    while counter.disconnects < counter.connects and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert counter.connects == counter.disconnects == 3
    assert acl._open == {}  # noqa: SLF001 - the count this test is about
    # The client the rules let in is served as before.
    allowed = exchange(proxy.address, _proxy_header("192.0.2.10") + request.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert allowed.endswith(b"\r\n\r\nhello\n"), allowed


# -- C.4: the destination guard's refusals ---------------------------------------------------


def test_a_prohibited_destination_is_403_and_a_prohibited_parent_502(proxy_factory, origin,
                                                                       caplog):
    caplog.set_level(logging.INFO)
    parent = RawOrigin(lambda sock: sock.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n"))
    try:
        resolver = StaticResolver({"origin.test": ["127.0.0.1"]})
        proxy = proxy_factory(
            "[destinations]\nallow = 127.0.0.1/32\n"
            f"[parents]\nparents = http://127.0.0.2:{parent.port}\n"
            "rules =\n    direct 127.0.0.0/8\n    parent all\n", resolver=resolver)
        # Direct to a prohibited address: the client's request is refused by policy.
        direct = exchange(proxy.address, f"CONNECT 127.0.0.3:{origin.port} HTTP/1.1\r\n\r\n"
                          .encode(), until_close=False)
        assert direct.startswith(b"HTTP/1.1 403 "), direct
        assert b"Proxy-Status: geproxy; error=destination_ip_prohibited\r\n" in direct
        # Through a prohibited parent: the proxy's configuration is at fault, not the client.
        for request in (f"CONNECT origin.test:{origin.port} HTTP/1.1\r\n\r\n",
                        f"GET http://origin.test:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n"):
            answer = exchange(proxy.address, request.encode(), until_close=False)
            assert answer.startswith(b"HTTP/1.1 502 "), answer
            assert b"Proxy-Status: geproxy; error=proxy_configuration_error\r\n" in answer
        assert parent.accepted == 0 and origin.seen == []
    finally:
        parent.stop()
    records = wait_for_records(proxy, 3)
    assert [(r.method, r.status, r.error) for r in records] == [
        ("CONNECT", 403, "destination_ip_prohibited"),
        ("CONNECT", 502, "proxy_configuration_error"),
        ("GET", 502, "proxy_configuration_error")]
    # Warned of at load; then each request through it says so (it is not "down": no wait
    # would cure it, and the next request meets the same fault, with the same answer).
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"parent proxy 127.0.0.2:{parent.port} is prohibited" in warned[0], warned
    failed = [line for line in warned[1:] if f"parent 127.0.0.2:{parent.port} failed" in line]
    assert len(failed) == 2 and all("prohibited" in line for line in failed), warned


def test_a_prohibited_parent_is_passed_over_and_not_marked_down(proxy_factory, origin):
    """The next parent carries the request; the prohibited one is not "down" (no wait
    cures it), so it is neither left out nor reported up again later."""
    parent = proxy_factory("via = parent-proxy\n")
    child = proxy_factory(
        "[destinations]\nallow = 127.0.0.1/32\n"
        f"[parents]\nparents = http://127.0.0.2:9 http://127.0.0.1:{parent.port}\n")
    for _ in range(2):
        out = curl("-p", "-x", child.url, origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    assert child.server.pm.get_plugin("parent").down == {}
    records = wait_for_records(child, 2)
    assert [r.upstream_addr for r in records] == [("127.0.0.1", parent.port)] * 2


# -- D: a parent the guard prohibits is a warning at each load -------------------------------


def test_a_parent_the_guard_prohibits_is_warned_of_at_load(tmp_path: Path, caplog):
    """IP-literal parents are judged by the resolve hook (the guard included); a parent
    given by name is not looked up at load."""
    caplog.set_level(logging.WARNING)
    path = tmp_path / "geproxy.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n"
                    "[destinations]\nallow = 10.40.0.0/24\n"
                    "[parents]\nparents = http://127.0.0.1:3128 http://[::1]:3129 "
                    "http://u:secret@10.40.0.9:3128 http://egress.test:3128\n")
    resolver = StaticResolver({"egress.test": ["127.0.0.1"]})
    load(str(path), objects=[resolver], entry_points=False)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2, lines
    assert "parent proxy 127.0.0.1:3128 is prohibited" in lines[0]
    assert "parent proxy [::1]:3129 is prohibited" in lines[1]
    assert all(str(path) in line and "502" in line for line in lines)
    assert "secret" not in caplog.text
    assert resolver.queries == {}  # the name was not resolved


# -- C.6: bytes behind a refused CONNECT -----------------------------------------------------


def _htpasswd(tmp_path: Path) -> str:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{apr_md5_crypt.hash('alice-pw')}\n")
    return f"[auth]\nhtpasswd = {path}\n"


#: (the configuration, the CONNECT target, the status it gets): refusals of every kind.
REFUSED_CONNECTS = {
    "acl": (lambda tmp, port: "[acl]\nconnect_ports = 1-65535\n"
            "rules =\n    deny dst blocked.test\n    allow all\n", "blocked.test:443", 403),
    "auth": (lambda tmp, port: _htpasswd(tmp), "127.0.0.1:{origin}", 407),
    "guard": (lambda tmp, port: "[destinations]\nallow = 127.0.0.1/32\n",
              "127.0.0.2:{origin}", 403),
    "upstream": (lambda tmp, port: "", "127.0.0.1:{closed}", 502),
}


def _refused_connect(proxy_factory, tmp_path, origin, kind):
    ini, target, status = REFUSED_CONNECTS[kind]
    proxy = proxy_factory(ini(tmp_path, origin.port),
                          resolver=StaticResolver({"blocked.test": ["127.0.0.1"]}))
    target = target.format(origin=origin.port, closed=free_port())
    return proxy, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(), status


@pytest.mark.parametrize("kind", sorted(REFUSED_CONNECTS))
def test_bytes_behind_a_refused_connect_are_never_a_request(proxy_factory, origin, tmp_path,
                                                           kind):
    proxy, connect, status = _refused_connect(proxy_factory, tmp_path, origin, kind)
    with proxy.connect() as sock:
        sock.sendall(connect + _smuggled(origin))  # early tunnel bytes, shaped as a request
        reader = ResponseReader(sock)
        head, _ = reader.read()
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert head_field(head, b"connection") == b"close"
        assert _closed_after(sock, reader)
    [record] = wait_for_records(proxy, 1)
    assert (record.method, record.status) == ("CONNECT", status)
    assert origin.seen == []


@pytest.mark.parametrize("kind", sorted(REFUSED_CONNECTS))
def test_with_nothing_behind_a_refused_connect_the_connection_goes_on(proxy_factory, origin,
                                                                      tmp_path, kind):
    proxy, connect, status = _refused_connect(proxy_factory, tmp_path, origin, kind)
    credentials = "Proxy-Authorization: Basic YWxpY2U6YWxpY2UtcHc=\r\n"  # alice:alice-pw
    with proxy.connect() as sock:
        sock.sendall(connect)
        reader = ResponseReader(sock)
        head, _ = reader.read()
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert head_field(head, b"connection") is None
        if kind == "auth":  # the 407's retry, with credentials, as a client sends it
            sock.sendall(connect.replace(b"\r\n\r\n", f"\r\n{credentials}\r\n".encode()))
            head, _ = reader.read()
            assert head.startswith(b"HTTP/1.1 200 Connection Established"), head
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        else:
            sock.sendall(_smuggled(origin).replace(b"/smuggled", b"/"))
        head, body = reader.read()
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello\n", head
    assert [seen.path for seen in origin.seen] == ["/"]


def test_bytes_that_arrive_while_a_connect_fails_are_never_a_request(proxy_factory, origin,
                                                                     blackhole):
    """The bytes come after the head was read, while the proxy waits for the upstream:
    they are in the socket, not yet read, when the 504 goes out."""
    proxy = proxy_factory("connect_timeout = 1s\n")
    with proxy.connect() as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{blackhole} HTTP/1.1\r\n\r\n".encode())
        deadline = time.monotonic() + 10
        while not proxy.server.active and time.monotonic() < deadline:
            gevent.sleep(0.01)  # until the head is read and the connect begun
        assert proxy.server.active
        sock.sendall(_smuggled(origin))
        reader = ResponseReader(sock)
        head, _ = reader.read()
        assert head.startswith(b"HTTP/1.1 504 "), head
        assert head_field(head, b"connection") == b"close"
        assert _closed_after(sock, reader)
    assert origin.seen == []


def test_a_plugins_2xx_to_a_connect_closes_the_connection(proxy_factory, origin):
    """A client takes any 2xx to its CONNECT for a tunnel: what it sends next is no HTTP."""

    class Established:
        @hookimpl
        def on_request(self, ctx, request):
            return Response(200, body=b"") if request.is_connect else None

    proxy = proxy_factory(plugins=[Established()])
    with proxy.connect() as sock:
        sock.sendall(b"CONNECT example.test:443 HTTP/1.1\r\n\r\n")
        reader = ResponseReader(sock)
        head, _ = reader.read()
        assert head.startswith(b"HTTP/1.1 200 ") and head_field(head, b"connection") == b"close"
        sock.sendall(_smuggled(origin))
        assert _closed_after(sock, reader)
    assert origin.seen == []


def _declining_origin() -> tuple[RawOrigin, list[bytes]]:
    """An origin that answers every request 200 ``hello`` on a kept connection, Upgrade
    or not (declining it), and lists the request lines it saw."""
    lines: list[bytes] = []

    def handle(sock: socket.socket) -> None:
        for _ in range(100):
            head = origin.read_head(sock)
            if not head:
                return
            lines.append(head.split(b"\r\n", 1)[0])
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")

    origin = RawOrigin(handle)
    return origin, lines


@pytest.mark.parametrize("declined_by", ["origin", "policy", "local page", "docroot file"])
def test_bytes_behind_a_declined_upgrade_are_never_a_request(proxy_factory, tmp_path,
                                                            declined_by):
    """A client may send the new protocol's bytes right behind its Upgrade request; when
    the switch is declined (the origin answers 200, policy 403, the proxy's own page or
    file 200) they are no request."""

    class NoUpgrades:
        @hookimpl
        def on_request(self, ctx, request):
            if "upgrade" in request.headers:
                raise Denied("no upgrades here")

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "page.txt").write_text("a page\n")
    origin, lines = _declining_origin()
    try:
        proxy = proxy_factory(f"docroot = {tmp_path / 'www'}\n",
                              plugins=[NoUpgrades()] if declined_by == "policy" else [])
        target = {"local page": "/healthz", "docroot file": "/page.txt"}.get(
            declined_by, f"http://127.0.0.1:{origin.port}/")
        upgrade = (f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                   "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n").encode()
        status = b"403" if declined_by == "policy" else b"200"
        with proxy.connect() as sock:
            sock.sendall(upgrade + _smuggled(origin))
            reader = ResponseReader(sock)
            head, _ = reader.read()
            assert head.startswith(b"HTTP/1.1 " + status), head
            assert head_field(head, b"connection") == b"close"
            assert _closed_after(sock, reader)
        assert lines == ([b"GET / HTTP/1.1"] if declined_by == "origin" else [])
        lines.clear()
        # With nothing behind the head, the client waited: the connection goes on.
        with proxy.connect() as sock:
            sock.sendall(upgrade)
            reader = ResponseReader(sock)
            head, _ = reader.read()
            assert head.startswith(b"HTTP/1.1 " + status), head
            assert head_field(head, b"connection") != b"close"
            sock.sendall(_smuggled(origin).replace(b"/smuggled", b"/again"))
            head, body = reader.read()
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello\n", head
        assert b"GET /smuggled HTTP/1.1" not in lines and lines[-1] == b"GET /again HTTP/1.1"
    finally:
        origin.stop()
