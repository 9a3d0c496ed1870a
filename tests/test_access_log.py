"""The access log: its four formats, escaping, the lines left out, and reopening on
SIGUSR1. The squid format beside a real squid is in test_squid_log.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import gevent
import pytest

from geproxy import ConfigError
from geproxy.testing import (
    curl,
    exchange,
    free_port,
    require_tool,
    wait_for_lines,
    wait_for_records,
    wait_until,
)


def _lines(path, count):
    return wait_for_lines(path, count)


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


def test_squid_lines_are_stamped_when_written(proxy_factory, origin, tmp_path):
    """As Squid's, a line's time is when it is written, the end of its request: a quick
    request that ends during a slow one comes first in the file, with the earlier time."""
    path = tmp_path / "squid.log"
    proxy = proxy_factory(f"access_log = {path}\nlog_format = squid\n")
    before = time.time()
    slow = gevent.spawn(curl, "-x", proxy.url, origin.url("/sleep/0.5"))
    for _ in range(500):  # until the slow request reached the origin
        if origin.seen:
            break
        gevent.sleep(0.01)
    assert origin.seen, "the slow request did not arrive"
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert slow.get(timeout=10).stdout == b"slept\n"
    fields = [line.split() for line in _lines(path, 2)]
    assert [f[6] for f in fields] == [origin.url("/"), origin.url("/sleep/0.5")]
    stamps = [float(f[0]) for f in fields]
    assert stamps == sorted(stamps) and stamps[-1] <= time.time()
    for f in fields:  # the time less the elapsed milliseconds is when the request came
        assert float(f[0]) - int(f[1]) / 1000 >= before - 0.002, f


def test_the_squid_format_logs_the_content_type_the_client_got(proxy_factory, origin,
                                                                 tmp_path):
    """The type without its parameters, as Squid logs it: the origin's, the proxy's own
    error page's, ``-`` for a tunnel."""
    path = tmp_path / "squid.log"
    proxy = proxy_factory(f"access_log = {path}\nlog_format = squid\n")
    assert curl("-x", proxy.url, origin.url("/echo")).returncode == 0
    assert curl("-p", "-x", proxy.url, origin.url("/")).returncode == 0
    curl("-x", proxy.url, f"http://127.0.0.1:{free_port()}/")  # 502 from the proxy
    fields = [line.split() for line in _lines(path, 3)]
    assert [(f[3], f[9]) for f in fields] == [
        ("TCP_MISS/200", "application/json"), ("TCP_TUNNEL/200", "-"),
        ("TCP_MISS/502", "text/plain")]


def test_skip_paths_leave_out_requests_for_the_proxy_itself(proxy_factory, origin, tmp_path):
    """Only origin-form requests whose path (less its query) is listed are left out: the
    same path forwarded, or in absolute form to the proxy's own address, is logged."""
    path = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {path}\n[access_log]\nskip_paths = /healthz /ping\n")
    assert curl(f"{proxy.url}/healthz").stdout == b"ok\n"
    assert curl(f"{proxy.url}/healthz?from=lb").stdout == b"ok\n"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", f"{proxy.url}/nosuch").stdout == b"404"
    assert curl("-x", proxy.url, f"{proxy.url}/healthz").stdout == b"ok\n"
    assert curl("-x", proxy.url, origin.url("/healthz")).stdout == b"hello\n"
    assert len(wait_for_records(proxy, 5)) == 5  # every request had its record
    targets = [line.split()[4] for line in _lines(path, 3)]
    assert targets == ["/nosuch", f"{proxy.url}/healthz", origin.url("/healthz")]


HAPROXY_CHECKS = """
global
    maxconn 50
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 5s
frontend egress
    bind 127.0.0.1:{port}
    default_backend proxies
backend proxies
    option httpchk GET /healthz
    server one 127.0.0.1:{proxy} check inter 100ms
"""


def test_haproxy_health_checks_are_not_logged(proxy_factory, origin, tmp_path):
    """haproxy's ``option httpchk GET /healthz`` every 100 ms, and a client through it:
    only the client's request is in the log."""
    haproxy = require_tool("haproxy")
    path = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {path}\n[access_log]\nskip_paths = /healthz\n")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CHECKS.format(port=port, proxy=proxy.port))
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def checks() -> list:
            return [r for r in proxy.records.records if r.target == "/healthz"]

        for _ in range(1000):  # bounded: until three checks were answered
            if len(checks()) >= 3:
                break
            assert process.poll() is None, "haproxy exited"
            gevent.sleep(0.01)
        assert [r.status for r in checks()[:3]] == [200] * 3
        out = curl("-x", f"http://127.0.0.1:{port}", origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    finally:
        process.terminate()
        process.wait(timeout=10)
    lines = _lines(path, 1)
    assert [line.split()[4] for line in lines] == [origin.url("/")]


def test_skip_src_leaves_out_every_line_of_those_clients(proxy_factory, origin, tmp_path):
    """Requests of any outcome and refused connections of the listed clients are left out;
    the others' are logged."""
    path = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {path}\n[access_log]\nskip_src = 127.0.0.4/31\n"
                          "[acl]\nconnect_ports = 1-65535\n"
                          "rules =\n    shut: deny src 127.0.0.5\n    allow all\n")
    for client in ("127.0.0.4", "127.0.0.5", "127.0.0.1"):
        curl("--interface", client, "-x", proxy.url, origin.url("/"))
    records = wait_for_records(proxy, 3)
    assert {(r.ctx.client_ip, r.error) for r in records} == {
        ("127.0.0.4", None), ("127.0.0.5", "http_request_denied"), ("127.0.0.1", None)}
    lines = _lines(path, 1)
    assert [line.split()[2] for line in lines] == ["127.0.0.1"]


def test_skip_paths_takes_paths_only(proxy_factory):
    with pytest.raises(ConfigError, match=r"\[access_log\] skip_paths: not a path: 'healthz'"):
        proxy_factory("[access_log]\nskip_paths = healthz\n")


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
    assert entry["content_type"] == "text/plain"  # the origin's
    assert entry["parent"] is None and entry["routes_tried"] == 1  # direct, at once


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_a_moved_log(proxy_process, origin, tmp_path, workers):
    """With workers, SIGUSR1 to the master reaches every worker: whichever serves the next
    requests writes them to the new file."""
    path = tmp_path / "access.log"
    proxy = proxy_process(f"workers = {workers}\naccess_log = {path}\nlog_format = json\n")
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    _lines(path, 1)
    path.rename(tmp_path / "access.log.1")
    proxy.process.send_signal(signal.SIGUSR1)
    # The signal is handled asynchronously: wait for the line of every process that serves
    # (and of the master, with workers, which lets its own copy go).
    told = workers + 1 if workers > 1 else 1
    assert wait_until(lambda: sum("reopening log files" in line for line in proxy.log)
                      == told), proxy.log[-5:]
    sent = 0
    for sent in range(1, 41):  # new connections, until every process wrote some (bounded)
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
        lines = _lines(path, sent)  # a new file, with the new lines only
        if sent >= 4 and len({json.loads(line)["worker"] for line in lines}) == workers:
            break
    assert len(lines) == sent
    assert len({json.loads(line)["worker"] for line in lines}) == workers
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
