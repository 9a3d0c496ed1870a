"""The access log: its four formats, escaping, and reopening on SIGUSR1."""

from __future__ import annotations

import json
import os
import signal

import gevent

from geproxy.testing import curl, exchange


def _lines(path, count):
    """The log's lines, once there are ``count`` (bounded wait: lines follow the records)."""
    for _ in range(500):
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        gevent.sleep(0.01)
    raise AssertionError(f"{path}: {len(lines)} lines, expected {count}")


def test_the_squid_format(proxy_factory, origin, tmp_path):
    path = tmp_path / "squid.log"
    proxy = proxy_factory(f"access_log = {path}\nlog_format = squid\n")
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert curl("-p", "-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    lines = _lines(path, 2)
    fields = [line.split() for line in lines]
    get = next(f for f in fields if f[5] == "GET")
    tunnel = next(f for f in fields if f[5] == "CONNECT")
    assert get[3] == "TCP_MISS/200" and get[6] == origin.url("/")
    assert get[8] == "HIER_DIRECT/127.0.0.1" and get[2] == "127.0.0.1"
    assert tunnel[3] == "TCP_TUNNEL/200" and tunnel[6] == f"127.0.0.1:{origin.port}"
    assert all(len(f) == 10 for f in fields)  # Squid's ten fields, whatever the values


def test_denials_in_the_squid_format(proxy_factory, origin, tmp_path):
    path = tmp_path / "squid.log"
    proxy = proxy_factory(f"access_log = {path}\nlog_format = squid\n"
                          "[acl]\nconnect_ports = 443\n")
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n"
                      .encode(), until_close=False)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert _lines(path, 1)[0].split()[3] == "TCP_DENIED/403"


def test_the_combined_format_escapes_what_clients_send(proxy_factory, origin, tmp_path):
    path = tmp_path / "combined.log"
    proxy = proxy_factory(f"access_log = {path}\nlog_format = combined\n")
    out = curl("-x", proxy.url, "-A", 'agent "quoted" \\ back', "-e", "http://ref.test/",
               origin.url("/"))
    assert out.stdout == b"hello\n"
    line = _lines(path, 1)[0]
    assert line.startswith("127.0.0.1 - - [")
    assert f'"GET {origin.url("/")} HTTP/1.1" 200 ' in line
    assert line.endswith('"http://ref.test/" "agent \\x22quoted\\x22 \\x5C back"')


def test_the_json_format_has_every_field(proxy_factory, origin, tmp_path):
    path = tmp_path / "json.log"
    proxy = proxy_factory(f"access_log = {path}\nlog_format = json\n")
    proxy.resolver.add("origin.test", "127.0.0.1")
    assert curl("-x", proxy.url, origin.url("/", host="origin.test")).stdout == b"hello\n"
    entry = json.loads(_lines(path, 1)[0])
    assert entry["method"] == "GET" and entry["status"] == 200
    assert entry["upstream"] == f"127.0.0.1:{origin.port}" and entry["client"] == "127.0.0.1"
    for key in ("dns_ms", "connect_ms", "first_byte_ms", "total_ms"):
        assert isinstance(entry[key], float) and entry[key] >= 0, key
    assert entry["first_byte_ms"] <= entry["total_ms"]
    assert entry["worker"] == os.getpid() and entry["conn"].startswith("c")
    assert set(entry) >= {"user", "error", "bytes_in", "bytes_out", "close_reason", "rule",
                          "sni", "client_port", "target", "version"}


def test_sigusr1_reopens_a_moved_log(proxy_process, origin, tmp_path):
    path = tmp_path / "access.log"
    proxy = proxy_process(f"access_log = {path}\n")
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    _lines(path, 1)
    path.rename(tmp_path / "access.log.1")
    proxy.process.send_signal(signal.SIGUSR1)
    for _ in range(500):  # the signal is handled asynchronously: wait for its log line
        if any("reopening log files" in line for line in proxy.log):
            break
        gevent.sleep(0.01)
    assert any("reopening log files" in line for line in proxy.log), proxy.log[-5:]
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert len(_lines(path, 1)) == 1  # a new file, with the new line only
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
