"""The TLS listener (an HTTPS proxy) and client certificates as identity, with real clients:
curl and requests speaking TLS to the proxy, Python's ssl for what they cannot show."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import ssl

import gevent
import pytest

from geproxy import hookimpl
from geproxy.testing import (
    StaticResolver,
    curl,
    echo,
    pattern,
    pattern_sha256,
    recv_all,
    wait_for_records,
)

LISTEN = "[geproxy]\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n"
RESOLVER = {"origin.test": ["127.0.0.1"]}


class Handshakes:
    """Records on_tls_handshake calls: (error, ctx.tls)."""

    name = "handshakes"

    def __init__(self):
        self.seen = []

    @hookimpl
    def on_tls_handshake(self, ctx, error):
        self.seen.append((error, ctx.tls))

    def wait(self, count, limit=10.0):
        with gevent.Timeout(limit, AssertionError(f"{len(self.seen)} handshakes seen")):
            while len(self.seen) < count:
                gevent.sleep(0.01)
        return self.seen


@pytest.fixture
def handshakes():
    return Handshakes()


@pytest.fixture
def tls_proxy(proxy_factory, tls_files, handshakes):
    def start(ini="", core="", **tls):
        return proxy_factory(LISTEN + core + tls_files.ini(**tls) + ini, plugins=[handshakes],
                             resolver=StaticResolver(RESOLVER))
    return start


def client_context(tls_files, cert=None):
    context = ssl.create_default_context(cafile=tls_files.ca_file)
    if cert is not None:
        context.load_cert_chain(cert)
    return context


def via_tls(proxy, tls_files, url, *args, cert=None):
    """curl through the proxy's TLS listener (``cert``: the client certificate to show)."""
    extra = ("--proxy-cert", cert) if cert else ()
    return curl("-x", proxy.tls_url, "--proxy-cacert", tls_files.ca_file, *extra, *args, url)


def status_via_tls(proxy, tls_files, url, cert=None):
    out = via_tls(proxy, tls_files, url, "-o", "/dev/null", "-w", "%{http_code}", cert=cert)
    return out.stdout.decode()


def tls_connect(proxy, tls_files, cert=None):
    raw = socket.create_connection(proxy.tls_address, timeout=10)
    return client_context(tls_files, cert).wrap_socket(raw, server_hostname="127.0.0.1")


# -- the listener --------------------------------------------------------------------------


def test_curl_https_origin_through_a_tls_proxy(tls_proxy, tls_files, tls_origin, handshakes):
    proxy = tls_proxy()
    size = 2 * 1024 * 1024 + 3
    out = curl("-x", proxy.tls_url, "--proxy-cacert", tls_files.ca_file,
               "--cacert", tls_files.ca_file,
               tls_origin.url(f"/bytes/{size}", host="origin.test"))
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == pattern_sha256(size)
    record = wait_for_records(proxy, 1)[-1]
    assert (record.method, record.status) == ("CONNECT", 200)
    tls = record.ctx.tls
    assert tls is not None and tls.version in ("TLSv1.2", "TLSv1.3")
    assert tls.alpn == "http/1.1" and tls.identity is None
    assert handshakes.wait(1)[0][0] is None


def test_curl_plain_http_through_a_tls_proxy(tls_proxy, tls_files, origin):
    proxy = tls_proxy()
    body = b"".join(pattern(300_000))
    out = curl("-x", proxy.tls_url, "--proxy-cacert", tls_files.ca_file,
               "--data-binary", "@-", "-H", "Content-Type: application/octet-stream",
               origin.url("/sha256", host="origin.test"), input=body)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"length": len(body),
                                      "sha256": hashlib.sha256(body).hexdigest()}
    # Keep-alive on the TLS connection: two requests, one connection.
    url = origin.url("/", host="origin.test")
    out = curl("-x", proxy.tls_url, "--proxy-cacert", tls_files.ca_file, url, url)
    assert out.returncode == 0 and out.stdout == b"hello\nhello\n", out.stderr
    records = wait_for_records(proxy, 3)
    assert records[1].ctx.conn_id == records[2].ctx.conn_id


# requests checks an HTTPS proxy's certificate (against ``verify``) for https:// URLs only;
# for http:// ones it does not, and warns.
@pytest.mark.parametrize("asked, kept", [("localhost", "localhost"), ("127.0.0.1", None)])
def test_the_server_name_the_client_asked_for_is_kept(tls_proxy, tls_files, origin, asked,
                                                       kept):
    """ctx.tls.server_name is the SNI of the handshake (a client names no IP address in
    it): guards tls.remember_server_names, which gets past gevent's wrapping of SNI
    callbacks to reach the stream's session."""
    proxy = tls_proxy()
    raw = socket.create_connection(proxy.tls_address, timeout=10)
    with client_context(tls_files).wrap_socket(raw, server_hostname=asked) as sock:
        sock.sendall(f"GET {origin.url('/', host='origin.test')} HTTP/1.1\r\n"
                     "Host: origin.test\r\nConnection: close\r\n\r\n".encode())
        assert recv_all(sock).endswith(b"\r\n\r\nhello\n")
    record = wait_for_records(proxy, 1)[-1]
    assert record.status == 200
    assert record.ctx.tls is not None and record.ctx.tls.server_name == kept


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_requests_through_a_tls_proxy(tls_proxy, tls_files, tls_origin, origin):
    requests = pytest.importorskip("requests")
    proxy = tls_proxy()
    proxies = {"http": proxy.tls_url, "https": proxy.tls_url}
    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(tls_origin.url("/bytes/100000", host="origin.test"),
                             proxies=proxies, verify=tls_files.ca_file, timeout=10)
        assert answer.status_code == 200
        assert hashlib.sha256(answer.content).hexdigest() == pattern_sha256(100000)
        answer = session.get(origin.url("/echo", host="origin.test"), proxies=proxies,
                             verify=tls_files.ca_file, timeout=10)
        assert answer.status_code == 200 and answer.json()["path"] == "/echo"


def test_same_errors_as_on_a_plain_listener(tls_proxy, tls_files):
    proxy = tls_proxy()
    with tls_connect(proxy, tls_files) as sock:
        sock.sendall(b"CONNECT origin.test:0 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Proxy-Status: geproxy; error=http_request_error" in answer
    with tls_connect(proxy, tls_files) as sock:
        sock.sendall(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 502 ") and b"error=dns_error" in head


@pytest.mark.usefixtures("relay_mode")
def test_a_large_tunnel_both_ways_and_half_close_over_tls(tls_proxy, tls_files, raw_origin):
    """Past the point where plain tunnels splice: a TLS side is relayed record by record,
    and the origin's FIN reaches the client as close_notify while its own side goes on."""
    got = {}

    def count_then_answer(sock):
        digest, size = hashlib.sha256(), 0
        while True:
            data = sock.recv(65536)
            if not data:
                break
            digest.update(data)
            size += len(data)
        got["up"] = (size, digest.hexdigest())
        for piece in pattern(3 * 1024 * 1024):
            sock.sendall(piece)

    def talk_after_eof(sock):
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)  # the origin is done talking; it still listens
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        got["late"] = data

    proxy = tls_proxy()
    origin = raw_origin(count_then_answer)
    size = 5 * 1024 * 1024 + 11
    with tls_connect(proxy, tls_files) as sock:
        sock.sendall(f"CONNECT origin.test:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        for piece in pattern(size):
            sock.sendall(piece)
        # Half-close the TCP connection under TLS: the proxy sees the client's end.
        raw = socket.socket(fileno=socket.dup(sock.fileno()))
        raw.shutdown(socket.SHUT_WR)
        raw.close()
        down = recv_all(sock, timeout=20)
    assert got["up"] == (size, pattern_sha256(size))
    assert hashlib.sha256(down).hexdigest() == pattern_sha256(3 * 1024 * 1024)

    origin = raw_origin(talk_after_eof)
    with tls_connect(proxy, tls_files) as sock:
        sock.sendall(f"CONNECT origin.test:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert sock.recv(65536) == b"bye"
        assert sock.recv(65536) == b""  # the proxy's close_notify: the origin's FIN
        sock.sendall(b"still heard")  # the other direction stays open
        raw = socket.socket(fileno=socket.dup(sock.fileno()))
        raw.shutdown(socket.SHUT_WR)
        raw.close()
        with gevent.Timeout(10):
            while "late" not in got:
                gevent.sleep(0.01)
    assert got["late"] == b"still heard"
    records = wait_for_records(proxy, 2)
    assert records[-1].close_reason == "done"


def test_an_upgrade_on_a_tls_listener(tls_proxy, tls_files, raw_origin):
    def upgrade(sock):
        origin.read_head(sock)
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n")
        echo(sock)

    origin = raw_origin(upgrade)
    proxy = tls_proxy()
    with tls_connect(proxy, tls_files) as sock:
        sock.sendall(f"GET http://origin.test:{origin.port}/ws HTTP/1.1\r\n"
                     f"Host: origin.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                     .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"frame")
        assert sock.recv(65536) == b"frame"


# -- handshakes that fail -------------------------------------------------------------------


def test_a_silent_client_is_dropped_at_handshake_timeout(tls_proxy, handshakes, caplog):
    caplog.set_level(logging.INFO, logger="geproxy")
    proxy = tls_proxy(handshake_timeout="300ms")
    with socket.create_connection(proxy.tls_address, timeout=10) as sock:
        assert recv_all(sock, timeout=5) == b""
    assert handshakes.wait(1)[0] == ("timeout", None)
    lines = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


def test_plain_http_to_the_tls_port_gets_a_clear_400(tls_proxy, handshakes):
    proxy = tls_proxy()
    with socket.create_connection(proxy.tls_address, timeout=10) as sock:
        sock.sendall(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Proxy-Status: geproxy; error=http_request_error" in answer
    assert handshakes.wait(1)[0][0] == "plain_http"


def test_a_client_that_refuses_the_certificate_is_counted(tls_proxy, tls_files, handshakes):
    proxy = tls_proxy()
    out = curl("-x", proxy.tls_url, "http://origin.test/")  # the system's CAs only
    assert out.returncode != 0
    assert handshakes.wait(1)[0][0] == "server_certificate"


def test_min_version_refuses_older_clients(tls_proxy, tls_files, handshakes):
    proxy = tls_proxy(min_version="TLSv1.3")
    context = client_context(tls_files)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection(proxy.tls_address, timeout=10)
    with pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    raw.close()
    assert handshakes.wait(1)[0][0] == "protocol"


def test_handshake_failures_are_counted_in_metrics(proxy_factory, tls_files):
    proxy = proxy_factory(LISTEN + "admin_listen = 127.0.0.1:0\n"
                          + tls_files.ini(handshake_timeout="200ms"))
    with socket.create_connection(proxy.tls_address, timeout=10) as sock:
        recv_all(sock, timeout=5)
    with tls_connect(proxy, tls_files):
        pass
    host, port = proxy.server.admin_address
    out = curl(f"http://{host}:{port}/metrics")
    text = out.stdout.decode()
    assert 'geproxy_tls_handshakes_total{result="timeout"} 1.0' in text
    assert 'geproxy_tls_handshakes_total{result="ok"} 1.0' in text


# -- client certificates as identity --------------------------------------------------------


ACL_SVC_A = "[acl]\nconnect_ports = 1-65535\nrules =\n    allow user svc-a\n    deny all\n"


def test_a_client_certificate_names_the_user_for_the_acl(tls_proxy, tls_files, origin,
                                                         tmp_path):
    log = tmp_path / "access.log"
    proxy = tls_proxy(ACL_SVC_A, core=f"access_log = {log}\nlog_format = json\n",
                      client_cert="optional", client_ca=tls_files.client_ca)
    url = origin.url("/", host="origin.test")
    out = via_tls(proxy, tls_files, url, cert=tls_files.client)
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    # optional: no certificate, no user, denied by the rules
    assert status_via_tls(proxy, tls_files, url) == "403"
    first, second = wait_for_records(proxy, 2)
    assert first.ctx.user == "svc-a" and first.status == 200
    assert first.ctx.tls.client_subject == "O=geproxy tests,CN=svc-a"
    assert second.ctx.user is None and second.status == 403
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["user"], line["status"]) for line in lines] == [("svc-a", 200), (None, 403)]
    assert lines[0]["tls"]["client_subject"] == "O=geproxy tests,CN=svc-a"
    assert lines[1]["tls"]["client_subject"] is None
    assert lines[0]["tls"]["version"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("source, user", [
    ("cn", "svc-a"),
    ("san_uri", "spiffe://example.test/svc-a"),
    ("san_dns", "svc-a.internal"),
])
def test_identity_from(tls_proxy, tls_files, origin, source, user):
    proxy = tls_proxy(client_cert="required", client_ca=tls_files.client_ca,
                      identity_from=source)
    out = via_tls(proxy, tls_files, origin.url("/", host="origin.test"), cert=tls_files.client)
    assert out.returncode == 0, out.stderr
    assert wait_for_records(proxy, 1)[0].ctx.user == user


def test_a_certificate_without_the_chosen_name_names_no_user(tls_proxy, tls_files, origin):
    cert = tls_files.client_cert("nouri", common_name="svc-b")
    proxy = tls_proxy(ACL_SVC_A, client_cert="required", client_ca=tls_files.client_ca,
                      identity_from="san_uri")
    assert status_via_tls(proxy, tls_files, origin.url("/", host="origin.test"),
                          cert=cert) == "403"


def test_a_certificate_from_another_ca_fails_the_handshake(tls_proxy, tls_files, handshakes):
    proxy = tls_proxy(client_cert="optional", client_ca=tls_files.client_ca)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(proxy, tls_files, cert=tls_files.stranger) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if not sock.recv(65536):  # TLS 1.3: the refusal comes after the handshake
                raise ConnectionError("closed")
    assert handshakes.wait(1)[0][0] == "client_certificate"


def test_required_with_no_certificate_fails_the_handshake(tls_proxy, tls_files, handshakes):
    proxy = tls_proxy(client_cert="required", client_ca=tls_files.client_ca)
    assert via_tls(proxy, tls_files, "http://origin.test/").returncode != 0
    assert handshakes.wait(1)[0][0] == "client_certificate"


def test_a_certificate_and_proxy_authorization_together_are_refused(tls_proxy, tls_files,
                                                                   origin, tmp_path):
    proxy = tls_proxy(client_cert="required", client_ca=tls_files.client_ca)
    out = via_tls(proxy, tls_files, origin.url("/", host="origin.test"), "--proxy-user",
                  "bob:secret", "-o", "/dev/null", "-w", "%{http_code}", cert=tls_files.client)
    assert out.stdout == b"400"
    assert wait_for_records(proxy, 1)[0].error == "http_request_error"


def test_a_certificate_satisfies_auth_without_a_password(tls_proxy, tls_files, origin,
                                                        tmp_path):
    from passlib.hash import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("bob:" + bcrypt.using(ident="2y", rounds=4).hash("secret") + "\n")
    proxy = tls_proxy(f"[auth]\nhtpasswd = {htpasswd}\n", client_cert="optional",
                      client_ca=tls_files.client_ca)
    url = origin.url("/", host="origin.test")
    out = via_tls(proxy, tls_files, url, cert=tls_files.client)
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    assert status_via_tls(proxy, tls_files, url) == "407"


# -- configuration and reload ---------------------------------------------------------------


@pytest.mark.parametrize("tls, key, message", [
    ("", "certificate", "needs a certificate"),
    ("certificate = /nonexistent.pem\n", "certificate", "cannot read"),
    ("client_cert = required\n", "client_ca", "needs client_ca"),
    ("ciphers = NOT-A-CIPHER\n", "ciphers", "no cipher matches"),
])
def test_bad_tls_settings_stop_the_start(tmp_path, tls_files, tls, key, message):
    from geproxy import ConfigError
    from geproxy.serve.server import create_server

    if "certificate" not in tls and key != "certificate":
        tls = f"certificate = {tls_files.certificate}\n" + tls
    path = tmp_path / "g.ini"
    path.write_text(LISTEN + "[tls]\n" + tls)
    with pytest.raises(ConfigError) as raised:
        create_server(str(path), entry_points=False)
    assert f"[tls] {key}" in str(raised.value) and message in str(raised.value)


def test_listen_parses_tls_addresses():
    from geproxy.config import parse_listen

    found = parse_listen("tls://127.0.0.1:3129, 127.0.0.1:3128, tls://[::1]:3129")
    assert [(tuple(a), a.tls) for a in found] == [
        (("127.0.0.1", 3129), True), (("127.0.0.1", 3128), False), (("::1", 3129), True)]
    with pytest.raises(ValueError):
        parse_listen("udp://127.0.0.1:3128")


def test_sighup_reloads_the_certificate(proxy_factory, tls_files, tmp_path):
    import trustme

    cert = tmp_path / "proxy.pem"
    shutil.copy(tls_files.certificate, cert)
    proxy = proxy_factory(LISTEN + f"[tls]\ncertificate = {cert}\n")

    def issuer():
        with tls_connect(proxy, tls_files) as sock:
            return dict(x[0] for x in sock.getpeercert()["issuer"])

    before = issuer()
    renewed_ca = trustme.CA(organization_name="renewed")
    renewed_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    assert proxy.server.reload()
    renewed_ca_file = tmp_path / "renewed-ca.pem"
    renewed_ca.cert_pem.write_to_path(str(renewed_ca_file))
    raw = socket.create_connection(proxy.tls_address, timeout=10)
    context = ssl.create_default_context(cafile=str(renewed_ca_file))
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        after = dict(x[0] for x in sock.getpeercert()["issuer"])
    assert before != after and after["organizationName"] == "renewed"
    # A reload with a bad certificate keeps the running one.
    cert.write_text("not a certificate")
    assert not proxy.server.reload()
    raw = socket.create_connection(proxy.tls_address, timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
        pass


def test_pipelined_requests_in_one_tls_record(tls_proxy, tls_files, origin):
    proxy = tls_proxy()
    url = f"http://origin.test:{origin.port}/"
    request = f"GET {url} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode()
    with tls_connect(proxy, tls_files) as sock:
        sock.sendall(request * 3)
        data = b""
        with gevent.Timeout(10):
            while data.count(b"hello\n") < 3:
                data += sock.recv(65536)
    assert data.count(b"HTTP/1.1 200 ") == 3


def test_a_proxy_protocol_header_then_the_handshake_in_one_segment(proxy_factory, tls_files,
                                                                  origin):
    """A load balancer's PROXY header and the client's ClientHello in one write: the bytes
    past the header are the handshake's start."""
    proxy = proxy_factory(LISTEN + "proxy_protocol = v1\nproxy_protocol_from = 127.0.0.1\n"
                          + tls_files.ini() + "[acl]\nconnect_ports = 1-65535\n"
                          "rules =\n    allow src 192.0.2.0/24\n",
                          resolver=StaticResolver(RESOLVER))

    def more():
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed")
        incoming.write(data)

    context = client_context(tls_files)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(proxy.tls_address, timeout=10) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            session.do_handshake()
        sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 3129\r\n" + outgoing.read())
        for _ in range(20):  # a handshake is a few flights
            try:
                session.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                more()
        session.write(f"GET http://origin.test:{origin.port}/ HTTP/1.1\r\n"
                      f"Host: origin.test\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        answer = b""
        with gevent.Timeout(10):
            while b"hello\n" not in answer:
                more()
                try:
                    answer += session.read(65536)
                except ssl.SSLWantReadError:
                    pass
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert wait_for_records(proxy, 1)[0].ctx.client_addr == ("192.0.2.7", 40000)


def test_clients_that_abort_anywhere_leave_nothing_behind(tls_proxy, tls_files, raw_origin):
    """Many TLS clients each stop at a random point (mid-handshake, after the CONNECT head,
    in the middle of a transfer, with a reset or a FIN): the proxy serves the next client,
    and the leak check (every test's) finds no descriptor or greenlet left."""
    import random
    import struct

    proxy = tls_proxy()
    origin = raw_origin(echo)
    rng = random.Random(8)
    context = client_context(tls_files)

    def one(point, reset):
        raw = socket.create_connection(proxy.tls_address, timeout=10)
        try:
            if reset:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if point == 0:
                raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # half a ClientHello
                return
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            if point == 1:
                return
            sock.sendall(f"CONNECT origin.test:{origin.port} HTTP/1.1\r\n\r\n".encode())
            if point == 2:
                return
            sock.recv(65536)
            sock.sendall(b"x" * rng.randrange(1, 300_000))
            if point == 3:
                return
            sock.recv(65536)
        except OSError:
            pass
        finally:
            raw.close()

    jobs = [gevent.spawn(one, rng.randrange(5), rng.random() < 0.5) for _ in range(120)]
    gevent.joinall(jobs, timeout=60)
    assert all(job.dead for job in jobs)
    with tls_connect(proxy, tls_files) as sock:  # still serving
        sock.sendall(f"CONNECT origin.test:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"ping")
        assert sock.recv(65536) == b"ping"


def test_sni_inside_a_tunnel_through_the_tls_listener(tls_proxy, tls_files, tls_origin):
    """TLS inside TLS: the sni plugin reads the inner ClientHello as on a plain listener."""
    proxy = tls_proxy("[sni]\nmode = enforce\n")
    out = via_tls(proxy, tls_files, tls_origin.url("/", host="origin.test"), "--cacert",
                  tls_files.ca_file)
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    first = wait_for_records(proxy, 1)[0]
    assert first.sni == "origin.test" and first.status == 200


def test_over_max_connections_a_tls_client_is_closed_before_any_handshake(tls_proxy,
                                                                          tls_files,
                                                                          handshakes):
    """No 503 in clear on a TLS port (a TLS client would read it as garbage), and no
    handshake only to refuse: the connection is closed."""
    proxy = tls_proxy(core="max_connections = 1\n")
    with tls_connect(proxy, tls_files) as holder:
        holder.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert holder.recv(1000).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(proxy.tls_address, timeout=10) as refused:
            refused.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello
            assert recv_all(refused, timeout=5) == b""
    assert len(handshakes.seen) == 1  # the holder's only
    for _ in range(100):  # the holder gone (its end takes a moment), served again
        try:
            with tls_connect(proxy, tls_files) as later:
                later.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
                if later.recv(1000).startswith(b"HTTP/1.1 200 "):
                    break
        except (ssl.SSLError, ConnectionError):
            pass
        gevent.sleep(0.02)
    else:
        raise AssertionError("not served again after the holder left")
