"""``workers = 2``: a master, two workers on one port, restarts, and signals passed on."""

from __future__ import annotations

import json
import os
import re
import signal

import gevent

from geproxy.testing import curl


def _wait_for(predicate, limit: float = 15.0) -> bool:
    """Poll ``predicate`` (bounded: ``limit`` seconds)."""
    for _ in range(int(limit / 0.02)):
        if predicate():
            return True
        gevent.sleep(0.02)
    return predicate()


def _worker_pids(proxy) -> dict[int, int]:
    """Worker index -> pid, the latest start of each, from the master's log."""
    pids = {}
    for line in proxy.log:
        found = re.search(r"worker (\d+) started, pid (\d+)", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split()[2] != "Z"  # a zombie is not alive
    except FileNotFoundError:
        return False


def test_two_workers_share_the_port_and_the_master_restarts_one(proxy_process, origin,
                                                                  tmp_path):
    log = tmp_path / "access.log"
    proxy = proxy_process(f"workers = 2\naccess_log = {log}\nlog_format = json\n")
    assert _wait_for(lambda: len(_worker_pids(proxy)) == 2)
    for _ in range(40):  # new connections each: the kernel spreads them over the workers
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 40)
    served_by = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
    assert served_by == set(_worker_pids(proxy).values())

    first = _worker_pids(proxy)[0]
    os.kill(first, signal.SIGKILL)
    assert _wait_for(lambda: _worker_pids(proxy)[0] != first)
    assert any("died" in line for line in proxy.log)
    assert _wait_for(lambda: sum("listening on" in line for line in proxy.log) == 3)
    for _ in range(5):
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"

    # SIGHUP to the master reloads every worker.
    proxy.process.send_signal(signal.SIGHUP)
    reloaded = lambda: sum("reloaded" in line for line in proxy.log) == 2  # noqa: E731
    assert _wait_for(reloaded), "".join(proxy.log[-12:])

    workers = list(_worker_pids(proxy).values())
    assert proxy.stop() == 0  # SIGTERM to the master: passed on, drained, exit 0
    assert not any(_alive(pid) for pid in workers)


def test_metrics_cover_every_worker(proxy_process, origin, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    log = tmp_path / "access.log"
    proxy = proxy_process(f"workers = 2\nadmin_listen = 127.0.0.1:0\naccess_log = {log}\n"
                          "log_format = json\n")
    assert _wait_for(lambda: any("admin listener on" in line for line in proxy.log))
    admin = next(re.search(r"admin listener on (\S+)", line).group(1)
                 for line in proxy.log if "admin listener on" in line)
    assert _wait_for(lambda: sum("listening on" in line for line in proxy.log) == 2)
    for _ in range(20):  # new connections: both workers serve some
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    out = curl(f"http://{admin}/metrics")
    assert out.returncode == 0, out.stderr
    counts = {}
    for family in text_string_to_metric_families(out.stdout.decode()):
        for sample in family.samples:
            if sample.name == "geproxy_requests_total":
                counts[(sample.labels["method"], sample.labels["status"])] = sample.value
    assert _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 20)
    workers = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
    assert len(workers) == 2  # both served some of the 20 ...
    assert counts[("GET", "200")] == 20  # ... and /metrics, served by one, counts them all


def test_workers_serve_a_tls_listener_and_reload_its_certificate(proxy_process, origin,
                                                                 tls_files, tmp_path):
    import shutil
    import socket
    import ssl

    import trustme

    cert = tmp_path / "proxy.pem"
    shutil.copy(tls_files.certificate, cert)
    proxy = proxy_process("workers = 2\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n"
                          f"[tls]\ncertificate = {cert}\n")
    assert proxy.tls_address is not None
    assert _wait_for(lambda: len(_worker_pids(proxy)) == 2)
    url = f"https://{proxy.tls_address[0]}:{proxy.tls_address[1]}"
    for _ in range(10):
        out = curl("-x", url, "--proxy-cacert", tls_files.ca_file, origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    renewed = trustme.CA(organization_name="renewed")
    renewed.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    renewed_ca = tmp_path / "renewed.pem"
    renewed.cert_pem.write_to_path(str(renewed_ca))
    proxy.process.send_signal(signal.SIGHUP)
    assert _wait_for(lambda: sum("reloaded" in line for line in proxy.log) == 2)
    context = ssl.create_default_context(cafile=str(renewed_ca))
    for _ in range(6):  # whichever worker the kernel picks has the new certificate
        with socket.create_connection(proxy.tls_address, timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                assert dict(x[0] for x in sock.getpeercert()["issuer"])[
                    "organizationName"] == "renewed"
    assert proxy.stop() == 0
