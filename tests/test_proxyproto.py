"""PROXY protocol: the parser (bytes in), the listener's rules, and haproxy in front."""

from __future__ import annotations

import socket
import struct
import subprocess

import gevent
import pytest

from geproxy.protocol.proxyproto import V2_SIGNATURE, ProxyHeaderError, parse
from geproxy.testing import curl, exchange, free_port, require_tool, wait_for_records


def v2(source: str, port: int, command: int = 1) -> bytes:
    """A v2 header as haproxy's send-proxy-v2 writes it (no TLVs)."""
    if ":" in source:
        body = (socket.inet_pton(socket.AF_INET6, source) + bytes(16)
                + struct.pack("!HH", port, 3128))
        family = 0x21
    else:
        body = socket.inet_aton(source) + bytes(4) + struct.pack("!HH", port, 3128)
        family = 0x11
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


@pytest.mark.pure
@pytest.mark.parametrize("header, client", [
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 40000 3128\r\n", ("192.0.2.10", 40000)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 3128\r\n", ("2001:db8::7", 40001)),
    (b"PROXY UNKNOWN\r\n", None),
    (v2("192.0.2.11", 40002), ("192.0.2.11", 40002)),
    (v2("2001:db8::8", 40003), ("2001:db8::8", 40003)),
    (v2("192.0.2.12", 1, command=0), None),
])
def test_headers_parse_whole_and_byte_by_byte(header, client):
    data = header + b"GET / HTTP/1.1\r\n"
    assert parse(data, "any") == (len(header), client)
    for cut in range(1, len(header)):
        assert parse(header[:cut], "any") is None  # incomplete: more bytes needed


@pytest.mark.pure
@pytest.mark.parametrize("data, versions", [
    (b"GET / HTTP/1.1\r\n\r\n", "any"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 40000\r\n", "v1"),
    (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "v1"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 99999 3128\r\n", "v1"),
    (b"PROXY " + b"x" * 200, "v1"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 40000 3128\r\n", "v2"),
    (v2("192.0.2.10", 1), "v1"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "v2"),
])
def test_bad_or_unexpected_headers_are_errors(data, versions):
    with pytest.raises(ProxyHeaderError):
        parse(data, versions)


def _ini(extra: str = "") -> str:
    return "proxy_protocol = any\nproxy_protocol_from = 127.0.0.1/32\n" + extra


def test_the_header_gives_the_client_address(proxy_factory, origin):
    proxy = proxy_factory(_ini() + "[acl]\nrules = allow all\n")
    request = (f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n"
               "Connection: close\r\n\r\n")
    answer = exchange(proxy.address, v2("192.0.2.10", 40000) + request.encode())
    assert answer.endswith(b"\r\n\r\nhello\n")
    assert wait_for_records(proxy, 1)[-1].ctx.client_addr == ("192.0.2.10", 40000)
    answer = exchange(proxy.address, b"PROXY UNKNOWN\r\n" + request.encode())
    assert answer.endswith(b"\r\n\r\nhello\n")
    assert wait_for_records(proxy, 2)[-1].ctx.client_addr[0] == "127.0.0.1"


def test_the_acl_sees_the_real_client(proxy_factory, origin):
    proxy = proxy_factory(_ini() + "[acl]\nconnect_ports = 1-65535\n"
                          "rules =\n    lb-clients: allow src 192.0.2.0/24\n    rest: deny all\n")
    tunnel = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode()
    assert exchange(proxy.address, v2("192.0.2.10", 1) + tunnel,
                    until_close=False).startswith(b"HTTP/1.1 200 ")
    refused = exchange(proxy.address, v2("198.51.100.1", 1) + tunnel)
    assert refused.startswith(b"HTTP/1.1 403 "), refused  # by its real address
    refused = [r for r in wait_for_records(proxy, 2) if r.ctx.client_addr[0] == "198.51.100.1"]
    assert [r.rule for r in refused] == ["rest"]


def test_no_header_or_a_sender_not_allowed_is_closed(proxy_factory, origin):
    request = f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    proxy = proxy_factory(_ini())
    assert exchange(proxy.address, request) == b""  # no header: closed, nothing said
    others = proxy_factory("proxy_protocol = v2\nproxy_protocol_from = 10.0.0.0/8\n")
    assert exchange(others.address, v2("192.0.2.10", 1) + request) == b""
    assert origin.seen == []


def test_proxy_protocol_needs_its_senders(proxy_factory):
    from geproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="proxy_protocol_from"):
        proxy_factory("proxy_protocol = v1\n")


HAPROXY = """
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend egress
    bind 127.0.0.1:{port}
    default_backend proxies
backend proxies
    balance roundrobin
    server one 127.0.0.1:{one} send-proxy-v2
    server two 127.0.0.1:{two} send-proxy-v2
"""


def test_haproxy_in_front_of_two_instances(proxy_factory, origin, tmp_path):
    """haproxy (TCP mode, send-proxy-v2) balances two geproxy instances: the ACL holds on
    the real client address, and the access log shows it."""
    haproxy = require_tool("haproxy")
    policy = ("[acl]\nconnect_ports = 1-65535\n"
              "rules =\n    office: allow src 127.0.0.5\n    rest: deny all\n")
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    proxies = [proxy_factory(_ini(f"access_log = {log}\n") + policy) for log in logs]
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY.format(port=port, one=proxies[0].port, two=proxies[1].port))
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with gevent.Timeout(10):
            while True:  # probe from an allowed client, so the probe is no refused record
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1,
                                             source_address=("127.0.0.5", 0)).close()
                    break
                except OSError:
                    gevent.sleep(0.05)
        for _ in range(4):  # round robin: each instance gets two
            out = curl("--interface", "127.0.0.5", "-x", f"http://127.0.0.1:{port}",
                       origin.url("/"))
            assert out.stdout == b"hello\n", out.stderr
        refused = curl("--interface", "127.0.0.6", "-x", f"http://127.0.0.1:{port}",
                       origin.url("/"))
        assert refused.stdout == b"403 Forbidden\n", refused.stderr  # told, by its address
    finally:
        process.terminate()
        process.wait(timeout=10)
    for proxy in proxies:
        clients = {record.ctx.client_addr[0] for record in wait_for_records(proxy, 2)}
        assert "127.0.0.5" in clients and "127.0.0.1" not in clients  # never the balancer
    lines = [line for log in logs for line in log.read_text().splitlines()]
    assert sum(" 127.0.0.5 GET " in line for line in lines) == 4
    refused = [line.split() for line in lines if " 127.0.0.6 " in line]
    assert [fields[12] for fields in refused] == ["rest"]  # the rule field
