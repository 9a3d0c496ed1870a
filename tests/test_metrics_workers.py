"""/metrics with ``workers = 1`` and ``workers = 2``: the same samples, bytes counted as they
flow, reloads counted once, counters that outlive a reload, and each worker's process
figures."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import gevent
import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from geproxy.testing import curl, echo, open_tunnel, wait_for_lines, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]



def _start(proxy_process, workers: int, ini: str = ""):
    proxy = proxy_process(f"workers = {workers}\nadmin_listen = 127.0.0.1:0\n" + ini)
    assert wait_until(lambda: any("admin listener on" in line for line in proxy.log))
    line = next(line for line in proxy.log if "admin listener on" in line)
    proxy.admin = "http://" + re.search(r"admin listener on (\S+)", line).group(1)
    if workers > 1:
        assert wait_until(lambda: sum(") serves" in line for line in proxy.log) >= workers)
    return proxy


def _samples(proxy) -> Samples:
    answer = requests.get(proxy.admin + "/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    out = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(proxy, name: str, **labels: str) -> float:
    return _samples(proxy).get((name, tuple(sorted(labels.items()))), 0.0)


def _traffic(proxy, origin, tls_files, server) -> None:
    """The same requests, each on a connection of its own."""
    for path in ("/", "/status/404"):
        out = curl("-x", proxy.url, origin.url(path))
        assert out.returncode == 0, out.stderr
    url = f"https://{proxy.tls_address[0]}:{proxy.tls_address[1]}"
    out = curl("-x", url, "--proxy-cacert", tls_files.ca_file, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"x" * 1000)
        _echoed(sock, 1000)


def _echoed(sock: socket.socket, size: int) -> None:
    """Read ``size`` bytes back from an echo tunnel; a close before fails the test."""
    while size > 0:
        piece = sock.recv(65536)
        assert piece, f"closed with {size} bytes to come"
        size -= len(piece)


#: Samples that differ between two runs of the same traffic, or by design with the number
#: of workers: times, the process figures (labelled by worker), the workers alive, and how
#: many upstream connections were opened (each worker pools its own).
VARYING = re.compile(r"geproxy_(process_|workers_alive|reload_last|resolve_seconds|"
                     r"connect_seconds)")


def test_the_same_samples_whatever_the_number_of_workers(proxy_process, origin, tls_files,
                                                         raw_origin):
    server = raw_origin(echo)
    found = {}
    for workers in (1, 2):
        proxy = _start(proxy_process, workers, "listen = 127.0.0.1:0, tls://127.0.0.1:0\n"
                       f"[tls]\ncertificate = {tls_files.certificate}\n")
        _traffic(proxy, origin, tls_files, server)
        # Each request is counted when its record is made, after curl has its answer.
        assert wait_until(lambda proxy=proxy: sum(
            v for (name, _), v in _samples(proxy).items()
            if name == "geproxy_requests_total") == 4)
        assert wait_until(lambda proxy=proxy: _value(proxy, "geproxy_connections_open") == 0)
        samples = _samples(proxy)
        assert not [key for key in samples if key[0].endswith("_created")]
        found[workers] = {key: value for key, value in samples.items()
                          if not VARYING.match(key[0])}
        assert samples[("geproxy_workers_alive", ())] == workers
        assert {dict(labels)["worker"] for name, labels in samples
                if name == "geproxy_process_open_fds"} == {str(n) for n in range(workers)}
        proxy.stop()
    assert found[1] == found[2]
    assert found[1][("geproxy_tls_handshakes_total", (("result", "ok"),))] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_bytes_are_counted_while_they_flow(proxy_process, raw_origin, origin, workers):
    server = raw_origin(echo)
    proxy = _start(proxy_process, workers)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        payload = b"y" * 200_000
        sock.sendall(payload)
        _echoed(sock, len(payload))
        # The tunnel is still open: its bytes show within about a second.
        assert wait_until(lambda: _value(proxy, "geproxy_tunnel_bytes_total",
                                        direction="up") >= len(payload), 10)
        assert _value(proxy, "geproxy_tunnel_bytes_total", direction="down") >= len(payload)
        assert _value(proxy, "geproxy_requests_total", method="CONNECT", status="200") == 0
    finally:
        sock.close()
    out = curl("-x", proxy.url, origin.url("/bytes/50000"))
    assert out.returncode == 0 and len(out.stdout) == 50_000
    assert wait_until(lambda: _value(proxy, "geproxy_http_bytes_total",
                                    direction="down") >= 50_000)
    assert _value(proxy, "geproxy_http_bytes_total", direction="up") > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_are_counted_once_and_counters_outlive_them(proxy_process, origin,
                                                           workers):
    proxy = _start(proxy_process, workers)
    for _ in range(3):
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert wait_until(lambda: _value(proxy, "geproxy_requests_total", method="GET",
                                    status="200") == 3)
    started = _value(proxy, "geproxy_reload_last_success_timestamp_seconds")
    assert 0 < started <= time.time()
    path = proxy.config_path
    text = open(path, encoding="utf-8").read()
    gevent.sleep(0.01)
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _value(proxy, "geproxy_reloads_total", outcome="ok") == 1)
    assert _value(proxy, "geproxy_reload_last_success_timestamp_seconds") > started
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n[auth]\ncache_size = many\n")
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _value(proxy, "geproxy_reloads_total", outcome="refused") == 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _value(proxy, "geproxy_reloads_total", outcome="ok") == 2)
    assert _value(proxy, "geproxy_reloads_total", outcome="refused") == 1
    # Counters go on from where they were: Prometheus counters never go back.
    assert _value(proxy, "geproxy_requests_total", method="GET", status="200") == 3
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert wait_until(lambda: _value(proxy, "geproxy_requests_total", method="GET",
                                    status="200") == 4)


def test_each_worker_has_its_process_figures(proxy_process):
    proxy = _start(proxy_process, 2)
    samples = _samples(proxy)
    for worker in ("0", "1"):
        labels = (("worker", worker),)
        assert samples[("geproxy_process_resident_memory_bytes", labels)] > 1_000_000
        assert samples[("geproxy_process_open_fds", labels)] > 3
        assert samples[("geproxy_process_cpu_seconds_total", labels)] >= 0
    first = samples[("geproxy_process_start_time_seconds", (("worker", "0"),))]
    assert abs(first - time.time()) < 600
    pid = max(int(m.group(1)) for line in proxy.log
              for m in [re.search(r"worker 0 started, pid (\d+)", line)] if m)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: sum(") serves" in line for line in proxy.log) == 3)
    assert wait_until(lambda: _value(proxy, "geproxy_process_start_time_seconds",
                                    worker="0") > first)
    assert _value(proxy, "geproxy_workers_alive") == 2


def test_a_worker_serves_every_workers_metrics_on_the_proxy_port(proxy_process, origin):
    proxy = _start(proxy_process, 2, "local_paths = /healthz /metrics\n")
    for _ in range(10):  # new connections: both workers count some
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert wait_until(lambda: _value(proxy, "geproxy_requests_total", method="GET",
                                    status="200") == 10)
    for scrape in range(4):  # whichever worker answers, it gives the master's sum (each
        assert wait_until(lambda scrape=scrape: _value(  # scrape before it counts too)
            proxy, "geproxy_requests_total", method="GET", status="200") == 10 + scrape)
        out = curl(f"{proxy.url}/metrics")
        assert out.returncode == 0, out.stderr
        text = out.stdout.decode()
        assert re.search(rf'^geproxy_requests_total\{{method="GET",status="200"\}} '
                         rf'{10 + scrape}\.0$', text, re.M), text[:2000]
        assert re.search(r"^geproxy_workers_alive 2\.0$", text, re.M)


def test_a_dead_workers_open_connections_stop_counting(proxy_process, raw_origin):
    """The live gauges of a worker killed with a tunnel open go with it (the metrics
    plugin's on_worker_exit), while its counters stay."""
    server = raw_origin(echo)
    proxy = _start(proxy_process, 2)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert wait_until(lambda: _value(proxy, "geproxy_requests_in_flight") == 1)
        assert _value(proxy, "geproxy_connections_open") == 1
        tunnels = requests.get(proxy.admin + "/tunnels", timeout=10).json()
        worker = re.match(r"w([0-9]+)c", tunnels[0]["id"]).group(1)
        pid = max(int(m.group(1)) for line in proxy.log
                  for m in [re.search(rf"worker {worker} started, pid (\d+)", line)] if m)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _value(proxy, "geproxy_requests_in_flight") == 0)
    assert _value(proxy, "geproxy_connections_open") == 0
    assert _value(proxy, "geproxy_connections_total") == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_auth_outcomes_are_counted_across_workers(proxy_process, origin, tmp_path, workers):
    """geproxy_auth_total sums every worker's checks. Each worker remembers passwords on
    its own, so a good password is checked ("ok") once per worker that saw it and "cached"
    after; a wrong one is "failed" wherever it lands."""
    from passlib.hash import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.using(ident='2y', rounds=4).hash('alice-pw')}\n")
    proxy = _start(proxy_process, workers, f"[auth]\nhtpasswd = {htpasswd}\n")
    for password, status in [("alice-pw", b"200")] * 6 + [("wrong", b"407")] * 3:
        out = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url,
                   "--proxy-user", f"alice:{password}", origin.url("/"))
        assert out.stdout == status, out.stderr

    def counted() -> dict[str, float]:
        return {dict(labels)["result"]: value for (name, labels), value
                in _samples(proxy).items() if name == "geproxy_auth_total"
                and dict(labels)["scheme"] == "basic"}

    assert wait_until(lambda: sum(counted().values()) == 9)
    found = counted()
    assert found["failed"] == 3
    assert found["ok"] + found.get("cached", 0) == 6
    assert 1 <= found["ok"] <= workers


# -- counted in plain integers, flushed: before a scrape, every second, at a reload ----------


def _logged(path: Path, ini: str = "") -> str:
    """``ini`` with a JSON access log at ``path``: its line for a request is written just
    before the metrics plugin counts the request, in the same hook call that never yields,
    so a scrape that follows the line (served by another greenlet) must count it."""
    return f"access_log = {path}\nlog_format = json\n" + ini


def _records(path, count: int) -> list[dict]:
    return [json.loads(line) for line in wait_for_lines(path, count)]


def _requests_total(samples: Samples) -> dict[tuple[str, str], float]:
    return {(dict(labels)["method"], dict(labels)["status"]): value
            for (name, labels), value in samples.items() if name == "geproxy_requests_total"}


def _files(directory) -> Samples:
    """The figures in a master's multiprocess files, read as the master reads them (not
    through /metrics, which would ask every worker to flush first)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() for sample in family.samples}


def _metrics_directory(tmp: Path) -> Path:
    """The master's multiprocess directory: its temp dir is inside ``tmp`` (TMPDIR)."""
    found = list(tmp.glob("geproxy-workers-*/metrics"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_scrape_right_after_the_requests_is_exact(proxy_process, origin, raw_origin,
                                                    tmp_path, workers):
    """Every counter after known traffic, from ONE scrape as soon as the requests' records
    are written (no polling of /metrics): the scrape flushes every process's pending counts
    first. Bytes and upstream timings are checked against the access log's own figures."""
    server = raw_origin(echo)
    log_path = tmp_path / "access.log"
    proxy = _start(proxy_process, workers, _logged(
        log_path, "[acl]\nconnect_ports = 1-65535\nrules =\n"
        "    no-port-1: deny dst 127.0.0.1 port 1\n    allow all\n"))
    for _ in range(6):  # connections of their own: both workers serve some
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    out = curl("-x", proxy.url, origin.url("/"), origin.url("/status/404"), origin.url("/"))
    assert out.returncode == 0, out.stderr  # three requests on one kept-alive connection
    assert b"403" in curl("-x", proxy.url, "http://127.0.0.1:1/").stdout
    assert curl("-X", "PROPFIND", "-x", proxy.url, origin.url("/")).returncode == 0
    sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"x" * 1000)
        _echoed(sock, 1000)
    records = _records(log_path, 12)

    samples = _samples(proxy)
    assert _requests_total(samples) == {("GET", "200"): 8, ("GET", "404"): 1,
                                        ("GET", "403"): 1, ("OTHER", "200"): 1,
                                        ("CONNECT", "200"): 1}
    assert samples[("geproxy_connections_total", ())] == 10
    assert samples[("geproxy_requests_in_flight", ())] == 0
    assert samples[("geproxy_errors_total", (("error", "http_request_denied"),))] == 1
    assert samples[("geproxy_acl_denials_total", (("rule", "no-port-1"),))] == 1
    for direction, field in (("up", "bytes_in"), ("down", "bytes_out")):
        labels = (("direction", direction),)
        assert samples[("geproxy_http_bytes_total", labels)] == sum(
            r[field] for r in records if r["method"] != "CONNECT")
        assert samples[("geproxy_tunnel_bytes_total", labels)] == sum(
            r[field] for r in records if r["method"] == "CONNECT")
    assert samples[("geproxy_connect_seconds_count", ())] == sum(
        r["connect_ms"] is not None for r in records)
    assert samples[("geproxy_resolve_seconds_count", ())] == sum(
        r["dns_ms"] is not None for r in records)
    assert wait_until(lambda: _value(proxy, "geproxy_connections_open") == 0)


def _six_requests_flushed(proxy_process, origin, tmp_path, monkeypatch):
    """Two workers whose multiprocess directory is found under tmp_path (TMPDIR), six
    requests through them, and the master's files counting all six (each worker flushes
    every second: a bounded wait, no scrape). Returns the proxy and the directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # where the master makes its directory
    log_path = tmp_path / "access.log"
    proxy = _start(proxy_process, 2, _logged(log_path))
    directory = _metrics_directory(tmp)
    for _ in range(6):
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    _records(log_path, 6)
    key = ("geproxy_requests_total", (("method", "GET"), ("status", "200")))
    assert wait_until(lambda: _files(directory).get(key) == 6, 10)
    return proxy, directory


def test_a_workers_counts_reach_the_files_each_second_without_a_scrape(
        proxy_process, origin, tmp_path, monkeypatch):
    """The periodic flush: the master's files, read directly (no /metrics, no flush asked),
    come to count every request within a bounded wait."""
    _, directory = _six_requests_flushed(proxy_process, origin, tmp_path, monkeypatch)
    assert _files(directory)[("geproxy_connections_total", ())] == 6


def test_a_stopped_or_killed_worker_leaves_its_flushed_counts(proxy_process, origin,
                                                              tmp_path, monkeypatch):
    """A worker that does not answer the master's flush (stopped: SIGSTOP) shows with what
    it last flushed, with a warning, and /metrics still answers; one killed by SIGKILL
    loses nothing it flushed (its counters stay in the files), and the counting goes on."""
    proxy, directory = _six_requests_flushed(proxy_process, origin, tmp_path, monkeypatch)
    key = ("geproxy_requests_total", (("method", "GET"), ("status", "200")))
    pids = {int(m.group(2)): int(m.group(1)) for line in proxy.log
            for m in [re.search(r"worker (\d) started, pid (\d+)", line)] if m}
    os.kill(max(pids), signal.SIGSTOP)
    try:
        assert _samples(proxy)[key] == 6
        assert wait_until(lambda: any("did not flush its figures" in line
                                      for line in proxy.log))
    finally:
        os.kill(max(pids), signal.SIGCONT)
    os.kill(min(pids), signal.SIGKILL)
    assert wait_until(lambda: sum(") serves" in line for line in proxy.log) == 3)
    assert _samples(proxy)[key] == 6
    for _ in range(2):
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    _records(tmp_path / "access.log", 8)
    assert _samples(proxy)[key] == 8


@pytest.mark.parametrize("workers", [1, 2])
def test_counts_pending_at_a_reload_are_kept(proxy_process, origin, tmp_path, workers):
    """Requests counted just before a reload (not flushed yet), and on a connection of the
    old configuration after it, all show in one scrape after it: the pending counts belong
    to the figures that every configuration of the server shares."""
    log_path = tmp_path / "access.log"
    proxy = _start(proxy_process, workers, _logged(log_path))
    held = socket.create_connection(proxy.address, timeout=10)
    with held:
        request = (f"GET {origin.url('/')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                   "\r\n").encode()
        held.sendall(request)
        assert _answered(held)
        for _ in range(3):
            assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
        _records(log_path, 4)
        proxy.process.send_signal(signal.SIGHUP)
        # The master and every worker put the new configuration in force.
        assert wait_until(lambda: sum("reloaded " in line for line in proxy.log)
                          == (workers + 1 if workers > 1 else 1))
        held.sendall(request)  # served by the configuration it started with
        assert _answered(held)
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    _records(log_path, 6)
    samples = _samples(proxy)
    assert _requests_total(samples) == {("GET", "200"): 6}
    assert samples[("geproxy_connections_total", ())] == 5
    assert samples[("geproxy_reloads_total", (("outcome", "ok"),))] == 1


def _answered(sock: socket.socket) -> bool:
    """Read one ``hello`` answer (the origin's ``/``) from a kept-alive connection."""
    data = b""
    while not data.endswith(b"\r\n\r\nhello\n"):
        piece = sock.recv(65536)
        if not piece:
            return False
        data += piece
    return data.startswith(b"HTTP/1.1 200 ")
