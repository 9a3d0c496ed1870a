"""``workers = 2``: one proxy made of a master and its workers.

The master holds the configuration every worker runs (a restart never reads the file), no
second instance may join its ports, a worker that cannot start stops the start, a crash loop
ends the master, the admin listener sees every worker, a reload is all or nothing and may
change the number of workers, and log lines name their process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import requests

from geproxy.testing import curl, echo, kit_ini, open_tunnel, wait_until

ALLOW = "[acl]\nconnect_ports = 1-65535\nrules = allow src 127.0.0.1\n"
DENY = "[acl]\nconnect_ports = 1-65535\nrules = closed: deny method CONNECT\n"



def _worker_pids(proxy) -> dict[int, int]:
    """Worker number -> pid, the latest start of each, from the master's log."""
    pids = {}
    for line in proxy.log:
        found = re.search(r"worker (\d+) started, pid (\d+)", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def _count(proxy, text: str) -> int:
    return sum(text in line for line in proxy.log)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"  # not a zombie
    except FileNotFoundError:
        return False


def _admin(proxy) -> str:
    assert wait_until(lambda: _count(proxy, "admin listener on") == 1)
    line = next(line for line in proxy.log if "admin listener on" in line)
    return "http://" + re.search(r"admin listener on (\S+)", line).group(1)


def _connect(proxy, target: str) -> socket.socket:
    """A tunnel through the proxy, established."""
    sock, head = open_tunnel(proxy, target)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


def _connect_status(proxy, target: str) -> int:
    """The status a new CONNECT gets (a refused one with nothing after it may stay open)."""
    sock, head = open_tunnel(proxy, target)
    sock.close()
    return int(head.split()[1])


def _serving(proxy, count: int = 2) -> None:
    """Wait until ``count`` workers were said to serve, by the master."""
    assert wait_until(lambda: _count(proxy, ") serves") >= count), proxy.log[-5:]


def _restart(proxy, index: int) -> None:
    """SIGKILL worker ``index`` and wait until its successor serves."""
    _serving(proxy)
    before = _worker_pids(proxy)[index]
    serving = _count(proxy, ") serves")
    os.kill(before, signal.SIGKILL)
    assert wait_until(lambda: _worker_pids(proxy)[index] != before), proxy.log[-5:]
    _serving(proxy, serving + 1)


def _run(ini_path, limit: float = 30.0) -> subprocess.CompletedProcess:
    """geproxy run to its end (one that cannot start)."""
    return subprocess.run([sys.executable, "-m", "geproxy", "--config", str(ini_path)],
                          capture_output=True, timeout=limit, check=False)


def test_two_workers_share_the_port_and_each_line_names_its_process(proxy_process, origin,
                                                                    tmp_path):
    log = tmp_path / "access.log"
    proxy = proxy_process(f"workers = 2\naccess_log = {log}\nlog_format = json\n")
    _serving(proxy)
    for _ in range(40):  # new connections each: the kernel spreads them over the workers
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 40)
    served_by = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
    assert served_by == set(_worker_pids(proxy).values())
    workers = list(_worker_pids(proxy).values())
    assert proxy.stop() == 0  # SIGTERM to the master: passed on, drained, exit 0
    assert not any(_alive(pid) for pid in workers)
    stamped = [line for line in proxy.log if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert stamped and all(re.match(r"\S+ \S+ [A-Z]+ (master|worker [01]) ", line)
                           for line in stamped), stamped
    assert _count(proxy, "exited with status 0") == 2


def test_a_restart_runs_the_configuration_in_force_not_the_edited_file(proxy_process,
                                                                       raw_origin):
    server = raw_origin(echo)
    target = f"127.0.0.1:{server.port}"
    proxy = proxy_process("workers = 2\n" + ALLOW)
    with open(proxy.config_path, "w", encoding="utf-8") as handle:
        handle.write(kit_ini("workers = 2\n" + DENY, access_log="-"))  # not reloaded
    _restart(proxy, 0)
    _restart(proxy, 1)
    assert [_connect_status(proxy, target) for _ in range(8)] == [200] * 8


def test_a_restart_after_a_refused_reload_serves(proxy_process, raw_origin):
    server = raw_origin(echo)
    target = f"127.0.0.1:{server.port}"
    proxy = proxy_process("workers = 2\nadmin_listen = 127.0.0.1:0\n" + ALLOW)
    admin = _admin(proxy)
    with open(proxy.config_path, "a", encoding="utf-8") as handle:
        handle.write("\n[auth]\ncache_size = many\n")
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _count(proxy, "reload refused") == 1)
    _restart(proxy, 0)
    assert _count(proxy, "worker 0 started") == 2  # started once again, not in a loop
    assert [_connect_status(proxy, target) for _ in range(4)] == [200] * 4
    text = requests.get(admin + "/metrics", timeout=10).text
    assert re.search(r"^geproxy_workers_alive 2\.0$", text, re.M), text


def test_files_the_configuration_names_are_read_once_for_every_worker(proxy_process,
                                                                      origin, tls_files,
                                                                      tmp_path):
    import shutil

    from passlib.hash import bcrypt

    cert, users = tmp_path / "proxy.pem", tmp_path / "users"
    shutil.copy(tls_files.certificate, cert)
    users.write_text("alice:" + bcrypt.using(ident="2y", rounds=4).hash("pw") + "\n")
    proxy = proxy_process("workers = 2\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n"
                          f"[tls]\ncertificate = {cert}\n[auth]\nhtpasswd = {users}\n")
    cert.write_text("broken since\n")  # a restarted worker never reads it
    users.write_text("broken since\n")  # nor this: it keeps the users of the start
    _restart(proxy, 0)
    _restart(proxy, 1)
    url = f"https://{proxy.tls_address[0]}:{proxy.tls_address[1]}"
    for _ in range(4):
        out = curl("-x", url, "--proxy-cacert", tls_files.ca_file, "--proxy-user",
                   "alice:pw", origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr


@pytest.mark.parametrize("first,second", [(2, 2), (2, 1), (1, 2)])
def test_a_second_instance_on_a_served_address_fails_to_start(proxy_process, tmp_path,
                                                               first, second):
    proxy = proxy_process(f"workers = {first}\n")
    host, port = proxy.address
    path = tmp_path / "second.ini"
    path.write_text(kit_ini(f"workers = {second}\nlisten = {host}:{port}\n"))
    out = _run(path)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen: Address already in use: {host}:{port}" in out.stderr.decode()


def test_a_busy_admin_port_stops_the_start_of_workers(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        path = tmp_path / "w.ini"
        path.write_text(kit_ini(f"workers = 2\nadmin_listen = 127.0.0.1:{port}\n"))
        out = _run(path)
    finally:
        taken.close()
    assert out.returncode == 2
    errors = out.stderr.decode()
    assert f"cannot listen: Address already in use: 127.0.0.1:{port}" in errors
    assert "worker 0 started" not in errors  # refused before any fork


@pytest.mark.parametrize("ini", [
    "[tls]\ncertificate = /nonexistent/proxy.pem\n",  # the TLS files
    "[dnscache]\nmax_ttl = soon\n",  # a plugin's configuration
], ids=["tls-files", "plugin"])
def test_a_configuration_that_cannot_start_stops_the_master(tmp_path, ini):
    path = tmp_path / "w.ini"
    listen = "listen = 127.0.0.1:0, tls://127.0.0.1:0\n" if "[tls]" in ini else ""
    path.write_text(kit_ini("workers = 2\n" + listen + ini))
    out = _run(path)
    assert out.returncode == 2
    assert "geproxy: " in out.stderr.decode() and "started" not in out.stderr.decode()


def test_a_crash_loop_stops_the_master(proxy_process):
    proxy = proxy_process("workers = 2\n")
    _serving(proxy)
    for death in range(1, 6):  # MAX_DEATHS within DEATH_WINDOW
        pid = _worker_pids(proxy)[0]
        os.kill(pid, signal.SIGKILL)
        if death < 5:
            assert wait_until(lambda pid=pid: _worker_pids(proxy)[0] != pid), proxy.log[-4:]
            assert wait_until(lambda: _alive(_worker_pids(proxy)[0]))
    assert proxy.process.wait(timeout=30) == 1
    assert _count(proxy, "killed by SIGKILL; starting it again in") == 4
    pauses = [float(re.search(r"again in ([0-9.]+)s", line).group(1))
              for line in proxy.log if "starting it again in" in line]
    assert pauses == sorted(pauses) and pauses[0] < pauses[-1]  # a growing pause
    assert _count(proxy, "5 deaths within 60s; stopping") == 1


def test_a_stop_during_a_restart_pause_starts_no_worker(proxy_process):
    proxy = proxy_process("workers = 2\n")
    _serving(proxy)
    pid = _worker_pids(proxy)[0]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _worker_pids(proxy)[0] != pid)
    pid = _worker_pids(proxy)[0]
    os.kill(pid, signal.SIGKILL)  # the second death waits for its restart
    assert wait_until(lambda: _count(proxy, "starting it again in 1s") == 1), proxy.log[-3:]
    assert proxy.stop() == 0
    stopping = next(i for i, line in enumerate(proxy.log) if "stopping" in line)
    assert not [line for line in proxy.log[stopping:] if "started, pid" in line]


def _tunnels_on_both_workers(proxy, admin: str, target: str) -> list[socket.socket]:
    """Tunnels opened until each worker has one (bounded: 40 connections)."""
    tunnels = []
    for _ in range(40):
        tunnels.append(_connect(proxy, target))
        stats = requests.get(admin + "/debug/stats", timeout=10).json()
        if len(tunnels) >= 4 and all(w["tunnels"] for w in stats["workers"]):
            return tunnels
    raise AssertionError("the kernel sent 40 connections to one worker")


def test_the_admin_listener_sees_and_closes_every_workers_tunnels(proxy_process,
                                                                  raw_origin):
    server = raw_origin(echo)
    proxy = proxy_process("workers = 2\nadmin_listen = 127.0.0.1:0\n")
    admin = _admin(proxy)
    tunnels = _tunnels_on_both_workers(proxy, admin, f"127.0.0.1:{server.port}")
    try:
        listed = requests.get(admin + "/tunnels", timeout=10).json()
        assert len(listed) == len(tunnels)
        assert {entry["worker"] for entry in listed} == {0, 1}
        ids = [entry["id"] for entry in listed]
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(rf"w{entry['worker']}c[0-9]+", entry["id"])
                   for entry in listed), ids
        stats = requests.get(admin + "/debug/stats", timeout=10).json()
        assert stats["tunnels"] == len(tunnels) == sum(w["tunnels"] for w in stats["workers"])
        assert stats["pid"] == proxy.process.pid
        assert sorted(w["pid"] for w in stats["workers"]) == sorted(
            _worker_pids(proxy).values())
        # One tunnel of each worker closed through the master.
        for worker in (0, 1):
            victim = next(entry["id"] for entry in listed if entry["worker"] == worker)
            answer = requests.post(f"{admin}/tunnels/{victim}/close", timeout=10)
            assert answer.status_code == 200, answer.text
        assert wait_until(lambda: len(requests.get(admin + "/tunnels", timeout=10).json())
                         == len(tunnels) - 2)
        assert requests.post(f"{admin}/tunnels/w7c1/close", timeout=10).status_code == 404
    finally:
        for sock in tunnels:
            sock.close()


def test_detached_tunnels_explain_the_greenlets(proxy_process, raw_origin):
    server = raw_origin(echo)
    proxy = proxy_process("workers = 2\nadmin_listen = 127.0.0.1:0\n")
    admin = _admin(proxy)
    tunnel = _connect(proxy, f"127.0.0.1:{server.port}")
    try:
        stats = {}

        def detached() -> bool:
            stats.update(requests.get(admin + "/debug/stats", timeout=10).json())
            return stats["detached_tunnels"] == 1

        assert wait_until(detached)  # after DETACH_AFTER, no greenlet waits for it
        assert stats["tunnels"] == 1 and stats["connections"] == 1
        tunnel.sendall(b"still relayed")
        assert tunnel.recv(100) == b"still relayed"
    finally:
        tunnel.close()


def test_a_reload_changes_the_number_of_workers(proxy_process):
    proxy = proxy_process("workers = 2\nadmin_listen = 127.0.0.1:0\n")
    admin = _admin(proxy)
    path = proxy.config_path
    text = open(path, encoding="utf-8").read()

    def count() -> int:
        answer = requests.get(admin + "/debug/stats", timeout=10)
        assert answer.status_code == 200, answer.text
        return len(answer.json()["workers"])

    assert wait_until(lambda: count() == 2)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace("workers = 2", "workers = 3"))
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: count() == 3), proxy.log[-5:]
    assert _count(proxy, "workers 2 -> 3") == 1
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace("workers = 2", "workers = 1"))
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: count() == 1), proxy.log[-5:]
    assert wait_until(lambda: _count(proxy, "exited with status 0") == 2), proxy.log[-5:]
    assert curl("-x", proxy.url, f"{admin}/healthz").returncode == 0
    assert proxy.stop() == 0


def test_one_process_refuses_a_reload_to_workers(proxy_process):
    proxy = proxy_process("workers = 1\n")
    path = proxy.config_path
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace("workers = 1", "workers = 2"))
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _count(proxy, "reload refused") == 1)
    line = next(line for line in proxy.log if "reload refused" in line)
    assert "workers = 2 needs a restart" in line


#: A plugin whose configure fails in the process whose pid its file names: a worker that
#: cannot load what its master loaded, whatever the reason.
FAULT = """
import os
from geproxy import ConfigError, hookimpl

class Fault:
    name = "fault"

    @hookimpl
    def add_options(self, registry):
        registry.section("fault").add("pid_file", "path", "", "")

    @hookimpl
    def configure(self, config):
        path = config.section("fault")["pid_file"]
        if os.path.exists(path) and open(path).read() == str(os.getpid()):
            raise ConfigError("fault injected", path=config.path, section="fault")
"""


def test_a_reload_is_all_or_nothing_across_workers(proxy_process, raw_origin, tmp_path,
                                                   monkeypatch):
    (tmp_path / "worker_fault.py").write_text(FAULT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    pid_file = tmp_path / "fail.pid"
    server = raw_origin(echo)
    target = f"127.0.0.1:{server.port}"
    common = f"workers = 2\nplugins = worker_fault:Fault\n[fault]\npid_file = {pid_file}\n"
    proxy = proxy_process(common + ALLOW)
    _serving(proxy)
    pid_file.write_text(str(_worker_pids(proxy)[1]))  # worker 1 will fail to load
    with open(proxy.config_path, "w", encoding="utf-8") as handle:
        handle.write(kit_ini(common + DENY, access_log="-"))
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _count(proxy, "reload refused") == 1), proxy.log[-5:]
    line = next(line for line in proxy.log if "reload refused" in line)
    assert "worker 1: " in line and "fault injected" in line
    assert _count(proxy, "reloaded") == 0
    assert [_connect_status(proxy, target) for _ in range(8)] == [200] * 8
    pid_file.unlink()  # the same file again, now loadable everywhere: every worker denies
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _count(proxy, "reloaded") == 3), proxy.log[-5:]  # and master
    assert [_connect_status(proxy, target) for _ in range(8)] == [403] * 8


def test_metrics_cover_every_worker(proxy_process, origin, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    log = tmp_path / "access.log"
    proxy = proxy_process(f"workers = 2\nadmin_listen = 127.0.0.1:0\naccess_log = {log}\n"
                          "log_format = json\n")
    admin = _admin(proxy)
    _serving(proxy)
    for _ in range(20):  # new connections: both workers serve some
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    out = curl(f"{admin}/metrics")
    assert out.returncode == 0, out.stderr
    counts = {}
    for family in text_string_to_metric_families(out.stdout.decode()):
        for sample in family.samples:
            if sample.name == "geproxy_requests_total":
                counts[(sample.labels["method"], sample.labels["status"])] = sample.value
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 20)
    workers = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
    assert len(workers) == 2  # both served some of the 20 ...
    assert counts[("GET", "200")] == 20  # ... and /metrics, served by the master, counts all


def test_workers_serve_a_tls_listener_and_reload_its_certificate(proxy_process, origin,
                                                                 tls_files, tmp_path):
    import shutil
    import ssl

    import trustme

    cert = tmp_path / "proxy.pem"
    shutil.copy(tls_files.certificate, cert)
    proxy = proxy_process("workers = 2\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n"
                          f"[tls]\ncertificate = {cert}\n")
    assert proxy.tls_address is not None
    _serving(proxy)
    url = f"https://{proxy.tls_address[0]}:{proxy.tls_address[1]}"
    for _ in range(10):
        out = curl("-x", url, "--proxy-cacert", tls_files.ca_file, origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    renewed = trustme.CA(organization_name="renewed")
    renewed.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    renewed_ca = tmp_path / "renewed.pem"
    renewed.cert_pem.write_to_path(str(renewed_ca))
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _count(proxy, "reloaded") == 3)  # the master and each worker
    context = ssl.create_default_context(cafile=str(renewed_ca))
    for _ in range(6):  # whichever worker the kernel picks has the new certificate
        with socket.create_connection(proxy.tls_address, timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                assert dict(x[0] for x in sock.getpeercert()["issuer"])[
                    "organizationName"] == "renewed"
    assert proxy.stop() == 0


def _revoking(port: int) -> str:
    return ("workers = 2\n[acl]\nconnect_ports = 1-65535\n"
            f"rules =\n    revoked: deny port {port}\n    allow all\n")


def _reload(proxy, text: str) -> None:
    """Put ``text`` in force in every worker, and wait until all say so."""
    reloaded = _count(proxy, "reloaded")
    with open(proxy.config_path, "w", encoding="utf-8") as handle:
        handle.write(kit_ini(text, access_log="-"))
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _count(proxy, "reloaded") == reloaded + 3), proxy.log[-5:]


def test_workers_decide_the_next_request_of_a_kept_connection_by_the_reload(proxy_process,
                                                                           origin):
    from geproxy.testing import ResponseReader

    proxy = proxy_process("workers = 2\n" + ALLOW)
    _serving(proxy)
    get = (f"GET {origin.url('/')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
           ).encode()
    with socket.create_connection(proxy.address, timeout=10) as sock:
        answers = ResponseReader(sock)
        sock.sendall(get)
        assert answers.read()[0].startswith(b"HTTP/1.1 200 ")
        _reload(proxy, _revoking(origin.port))
        sock.sendall(get)  # the same connection, to whichever worker accepted it
        head, _ = answers.read()
        assert head.startswith(b"HTTP/1.1 403 ") and b"error=http_request_denied" in head


def test_workers_recheck_their_open_tunnels_on_reload(proxy_process, raw_origin):
    revoked, kept = raw_origin(echo), raw_origin(echo)
    proxy = proxy_process("workers = 2\nadmin_listen = 127.0.0.1:0\n" + ALLOW)
    admin = _admin(proxy)
    doomed = _tunnels_on_both_workers(proxy, admin, f"127.0.0.1:{revoked.port}")
    spared = _connect(proxy, f"127.0.0.1:{kept.port}")
    try:
        _reload(proxy, "reload_tunnels = recheck\nadmin_listen = 127.0.0.1:0\n"
                + _revoking(revoked.port))
        for sock in doomed:  # each worker closed its own
            sock.settimeout(10)
            assert sock.recv(100) == b""
        spared.sendall(b"still here")
        assert spared.recv(100) == b"still here"
        assert _count(proxy, "closed by the reload") == len(doomed)
    finally:
        for sock in [*doomed, spared]:
            sock.close()


PROBE = """
import json
import os

from geproxy import hookimpl


class Probe:
    name = "workers_probe"

    def _note(self, config, **seen):
        seen["process"] = os.getpid()
        path = os.path.join(os.path.dirname(config.path), "probe.jsonl")
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(seen) + "\\n")

    @hookimpl
    def prepare_workers(self, config, workers, directory):
        self._note(config, hook="prepare_workers", workers=workers, directory=directory,
                   mode=os.stat(directory).st_mode & 0o777)

    @hookimpl
    def on_worker_exit(self, config, worker, pid):
        self._note(config, hook="on_worker_exit", worker=worker, pid=pid)
"""


def test_plugins_prepare_the_workers_and_hear_of_each_ones_end(proxy_process, tmp_path,
                                                               monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "geproxy_workers_probe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    proxy = proxy_process("workers = 2\nplugins = geproxy_workers_probe:Probe\n")
    notes = tmp_path / "probe.jsonl"

    def seen() -> list[dict]:
        return [json.loads(line) for line in notes.read_text().splitlines()]

    _serving(proxy)
    master = proxy.process.pid
    prepared, = seen()  # once, in the master, before the first fork
    assert prepared == {"hook": "prepare_workers", "workers": 2, "process": master,
                        "directory": prepared["directory"], "mode": 0o700}
    assert os.path.isdir(prepared["directory"])
    _restart(proxy, 0)
    killed = [pid for line in proxy.log
              for pid in re.findall(r"worker 0 started, pid (\d+)", line)][0]
    assert seen()[1:] == [{"hook": "on_worker_exit", "worker": 0, "pid": int(killed),
                           "process": master}]
    pids = _worker_pids(proxy)
    assert proxy.stop() == 0
    ended = sorted((note["worker"], note["pid"]) for note in seen()[2:])
    assert ended == sorted(pids.items())
    assert not os.path.exists(prepared["directory"])  # removed with the master
