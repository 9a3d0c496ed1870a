"""The access log: its four formats, escaping, the lines left out, and reopening on
SIGUSR1. The squid format beside a real squid is in test_squid_log.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import gevent
import pytest
from geproxy_plugins.log_formats import FORMATS

from geproxy import ConfigError, Context, Record
from geproxy.models import Headers, Request, Route, TLSInfo
from geproxy.testing import (
    curl,
    exchange,
    free_port,
    require_tool,
    wait_for_lines,
    wait_for_records,
    wait_until,
)

BENCH = Path(__file__).resolve().parent.parent / "bench" / "access_log.py"


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


@pytest.mark.parametrize("workers", [1, 2])
def test_every_worker_reopens_a_moved_file_by_name_without_a_signal(proxy_process, origin,
                                                                    tmp_path, workers):
    """logrotate without a signal, with workers: each worker checks the name on its own
    (at most a second apart), so lines of every worker come to the new file, and between
    the moved file and the new one no line is lost or written twice."""
    path, moved = tmp_path / "access.log", tmp_path / "access.log.1"
    proxy = proxy_process(f"workers = {workers}\naccess_log = {path}\nlog_format = json\n")
    assert curl("-x", proxy.url, origin.url("/first")).stdout == b"hello\n"
    _lines(path, 1)
    path.rename(moved)
    sent = 1
    for sent in range(2, 402):  # new connections, paced, until every worker wrote anew
        assert curl("-x", proxy.url, origin.url(f"/after/{sent}")).stdout == b"hello\n"
        if sent > 2 and len(_workers_in(path)) == workers:
            break
        time.sleep(0.01)
    assert len(_workers_in(path)) == workers, "not every worker reopened the file"
    assert wait_until(lambda: len(_complete(moved)) + len(_complete(path)) == sent)
    targets = [json.loads(line)["target"] for line in _complete(moved) + _complete(path)]
    expected = [origin.url("/first")] + [origin.url(f"/after/{n}") for n in range(2, sent + 1)]
    # One process writes in order, across the two files; several interleave.
    assert (targets if workers == 1 else sorted(targets)) == (
        expected if workers == 1 else sorted(expected))


def _complete(path: Path) -> list[str]:
    """The whole lines of ``path`` so far (none while it does not exist)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


def _workers_in(path: Path) -> set[int]:
    return {json.loads(line)["worker"] for line in _complete(path)}


# -- the writer: one write per line, rotation, failures, workers -------------------------------


def _descriptors_of(path) -> list[int]:
    """This process's descriptors open on the file ``path``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
        except OSError:
            pass  # the listing's own descriptor, closed since
    return found


def _replace_descriptor(path: Path, other: str, flags: int) -> int:
    """Point the proxy's one descriptor of ``path`` at ``other`` opened with ``flags``: the
    file as the proxy sees it becomes full (/dev/full) or not writable at all. Returns the
    descriptor's number."""
    [fd] = _descriptors_of(path)
    replacement = os.open(other, flags)
    try:
        os.dup2(replacement, fd)
    finally:
        os.close(replacement)
    return fd


def test_a_failing_write_loses_its_line_only(proxy_factory, origin, tmp_path, caplog):
    """A full disk (the file's descriptor made /dev/full's): the requests are served, one
    warning says so in the program log, however many lines fail; once the file can be
    written again (here after SIGUSR1's reopen), lines are written again."""
    caplog.set_level(logging.INFO, logger="geproxy")
    path = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {path}\n")
    assert curl("-x", proxy.url, origin.url("/before")).stdout == b"hello\n"
    _lines(path, 1)
    _replace_descriptor(path, "/dev/full", os.O_WRONLY)
    for n in range(3):
        assert curl("-x", proxy.url, origin.url(f"/lost/{n}")).stdout == b"hello\n"
    wait_for_records(proxy, 4)
    told = [r for r in caplog.records if r.name == "geproxy" and "access log" in r.message]
    assert len(told) == 1 and told[0].levelname == "WARNING", told
    assert "No space left on device" in told[0].message and str(path) in told[0].message
    proxy.server.reopen_logs()
    assert curl("-x", proxy.url, origin.url("/after")).stdout == b"hello\n"
    lines = _lines(path, 2)
    assert [line.split()[4] for line in lines] == [origin.url("/before"), origin.url("/after")]
    assert wait_until(lambda: any("written again" in r.message for r in caplog.records))


def test_a_descriptor_gone_bad_is_opened_again(proxy_factory, origin, tmp_path, caplog):
    """EBADF (the descriptor no longer one to write to): that line is lost and told once,
    the file is opened again for the next line, without a signal."""
    path = tmp_path / "access.log"
    proxy = proxy_factory(f"access_log = {path}\n")
    assert curl("-x", proxy.url, origin.url("/before")).stdout == b"hello\n"
    _lines(path, 1)
    fd = _replace_descriptor(path, "/dev/null", os.O_RDONLY)
    try:
        assert curl("-x", proxy.url, origin.url("/lost")).stdout == b"hello\n"
        wait_for_records(proxy, 2)
        assert curl("-x", proxy.url, origin.url("/after")).stdout == b"hello\n"
        lines = _lines(path, 2)
    finally:
        os.close(fd)  # the sink let this number go: the test's /dev/null now
    assert [line.split()[4] for line in lines] == [origin.url("/before"), origin.url("/after")]
    told = [r for r in caplog.records if r.name == "geproxy" and "access log" in r.message]
    assert len(told) == 1 and "Bad file descriptor" in told[0].message, told


def test_standard_output_has_each_line_at_once(proxy_factory, origin, capsys):
    """``access_log = -``: each line is on standard output when its request ends, not held
    back for a collector reading it live."""
    proxy = proxy_factory("access_log = -\nlog_format = json\n")
    written: list[str] = []

    def read() -> list[str]:
        written.extend(capsys.readouterr().out.splitlines())
        return written

    for n in range(3):
        assert curl("-x", proxy.url, origin.url(f"/{n}")).stdout == b"hello\n"
        wait_for_records(proxy, n + 1)
        assert wait_until(lambda count=n + 1: len(read()) >= count, limit=10), written
    assert [json.loads(line)["target"] for line in written] == [
        origin.url(f"/{n}") for n in range(3)]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_line_of_every_worker_is_whole(proxy_process, origin, tmp_path, workers):
    """Many clients at once, long lines: after a graceful stop the file has exactly one
    valid JSON line per request, each request's own, none mixed with another process's,
    each with the process id of the worker that served it (not the master's)."""
    path = tmp_path / "access.log"
    proxy = proxy_process(f"workers = {workers}\naccess_log = {path}\nlog_format = json\n")
    pad = "x" * 3000  # lines of about 3 KB: a split or a mix would show
    sent: list[str] = []
    pids: set[int] = set()
    for round_ in range(6):  # bounded: until every worker served some
        urls = [[origin.url(f"/r{round_}/c{c}/n{n}/{pad}") for n in range(15)]
                for c in range(8)]
        jobs = [gevent.spawn(curl, "-x", proxy.url, *batch) for batch in urls]
        for job, batch in zip(jobs, urls, strict=True):
            assert job.get(timeout=60).stdout == b"hello\n" * len(batch)
            sent.extend(batch)
        pids = {json.loads(line)["worker"] for line in _lines(path, len(sent))}
        if len(pids) == workers:
            break
    assert len(pids) == workers
    assert proxy.stop() == 0
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    entries = [json.loads(line) for line in raw.decode().split("\n")[:-1]]
    assert sorted(entry["target"] for entry in entries) == sorted(sent)
    assert all(entry["status"] == 200 for entry in entries)
    if workers == 1:
        assert pids == {proxy.process.pid}
    else:
        assert proxy.process.pid not in pids


# -- the formats, byte for byte as they were ---------------------------------------------------


@pytest.fixture(scope="module")
def baseline():
    """bench/access_log.py, whose BASELINE is the formatters as they were before issue 19."""
    spec = importlib.util.spec_from_file_location("bench_access_log", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Strings a client or a plugin could put in a field: empty, spaces, quotes, backslashes,
#: controls, DEL, Latin-1, other planes, a lone surrogate, percent signs, long ones.
TEXTS = ["", "-", "alice", "al ice", 'q"uote', "back\\slash", "tab\tx", "nul\x00", "del\x7f",
         "\x80\xff", "ü", "Ж", "\u2028line", "\U0001F600", "\ud800", "100%25", "a" * 3000,
         "http://example.com/p?q=1&r=%20", "example.com:443", "[::1]:8080"]
SECONDS = [0.0, 0.1 + 0.2, 1e-7, 0.0005, 0.00049999, 2.5e-4, 123.4567, 86400.0001, 1e-3,
           3.0, 0.0015, 0.0025, 59.9999999]


def _some(rng, values):
    return values[rng.randrange(len(values))]


def _case(rng):
    """A random context and record, every field drawn from its edge cases."""
    tls = None
    if rng.random() < 0.3:
        tls = TLSInfo(_some(rng, ["TLSv1.3", "TLSv1.2"]), _some(rng, TEXTS),
                      alpn=_some(rng, [None, "h2", "http/1.1"]),
                      server_name=_some(rng, [None, *TEXTS]),
                      client_subject=_some(rng, [None, "CN=svc-a,O=Example", "CN=ü"]))
    ctx = Context(client_addr=_some(rng, [("127.0.0.1", 1), ("::1", 65535),
                                          ("2001:db8::1", 5000)]),
                  server_addr=("127.0.0.1", 3128), config=None,
                  conn_id=_some(rng, ["c1", "w1c22", "c\u00e9"]),
                  user=_some(rng, [None, *TEXTS]), tls=tls)
    request = None
    if rng.random() < 0.7:
        headers = Headers([(name, _some(rng, TEXTS)) for name in ("Referer", "User-Agent")
                           if rng.random() < 0.7])
        request = Request("GET", "http://a/", "HTTP/1.1", headers,
                          host=_some(rng, ["", "a"]), path=_some(rng, ["/", "/healthz"]))
    started = _some(rng, [time.time(), 0.0, 1e9 + 0.1 + 0.2, 1796649091.9515,
                          rng.uniform(0, 2e9), 1796649091.0005])
    timings = [None, *SECONDS, rng.random(), rng.random() * 10 ** rng.randint(-6, 5)]
    record = Record(
        ctx, method=_some(rng, ["GET", "CONNECT", "-", "GE T", "Ж", "POST"]),
        target=_some(rng, TEXTS), version=_some(rng, ["HTTP/1.1", "-", "HTTP/2", "HTTP/1.0"]),
        status=_some(rng, [0, 200, 204, 403, 407, 502, 999]),
        error=_some(rng, [None, "http_request_denied", "destination_ip_prohibited",
                          "http_request_error", "dns_timeout"]),
        upstream_addr=_some(rng, [None, ("127.0.0.1", 80), ("::1", 8080)]),
        bytes_in=_some(rng, [0, 1, 78, 2**63, 10**30]),
        bytes_out=_some(rng, [0, 853, 2**64 + 1]), started=started,
        duration=_some(rng, [*SECONDS, rng.random() * 100]),
        dns_time=_some(rng, timings), connect_time=_some(rng, timings),
        first_byte_time=_some(rng, [*timings, math.inf, math.nan]),
        close_reason=_some(rng, ["", "client", "upstream", "error"]),
        rule=_some(rng, [None, *TEXTS]), sni=_some(rng, [None, *TEXTS]), request=request,
        route=_some(rng, [None, Route("parent.test", 3128), Route("::1", 8080, "u", "p")]),
        routes_tried=_some(rng, [0, 1, 2, 7]),
        content_type=_some(rng, [None, "text/html; charset=utf-8", "text/plain\tx",
                                 " a b ", "ü/x", "", *TEXTS]))
    return ctx, record


def _cases():
    rng = random.Random(19)
    nothing = Context(client_addr=("127.0.0.1", 0), server_addr=("127.0.0.1", 0), config=None)
    yield nothing, Record(nothing)  # every optional field None, every other its default
    # Integers where floats are declared: json writes them as integers.
    yield nothing, Record(nothing, started=1796649091, duration=0, dns_time=1, connect_time=0)
    for _ in range(3000):
        yield _case(rng)


@pytest.mark.parametrize("name", ["geproxy", "squid", "combined"])
def test_the_text_formats_write_what_they_wrote(baseline, name):
    """The fast paths change no byte: the same line as the old formatter for thousands of
    records of every edge case (spaces, quotes, controls, non-ASCII in every text field)."""
    old, new = baseline.OLD_FORMATS[name], FORMATS[name]
    for ctx, record in _cases():
        assert new(ctx, record) == old(ctx, record), (ctx, record)


def test_the_json_format_is_what_json_dumps_writes(baseline):
    """The object put together as text is json.dumps' of the old dict, byte for byte: the
    keys in their order, ensure_ascii escapes, floats (0.1 + 0.2, 1e-7, inf, NaN) as json
    writes them after round(x, 3), huge integers, null for None, the tls object, the
    parent, and this process's id."""
    for ctx, record in _cases():
        expected = json.dumps(baseline.old_json_fields(ctx, record), separators=(",", ":"),
                              ensure_ascii=True)
        assert FORMATS["json"](ctx, record) == expected, (ctx, record)


def test_json_times_are_rounded_as_json_writes_them(baseline):
    """Times and durations over many magnitudes: the text of each rounded value."""
    rng = random.Random(3)
    ctx = Context(client_addr=("127.0.0.1", 0), server_addr=("127.0.0.1", 0), config=None)
    for _ in range(20000):
        value = rng.random() * 10 ** rng.randint(-9, 9)
        record = Record(ctx, started=value * 1000, duration=value, dns_time=-value)
        line = FORMATS["json"](ctx, record)
        assert line == json.dumps(baseline.old_json_fields(ctx, record),
                                  separators=(",", ":")), value
