"""``log_format = squid`` beside Debian's squid: the same requests through both proxies, and
the fields of their access-log lines compared, times and sizes aside.

squid runs in the foreground (``squid -N``) on a free loopback port with its configuration
in tmp_path. Its access log goes over TCP to a collector in the test (``access_log
tcp://``) and its cache log nowhere (its messages come on standard error, kept in tmp_path):
squid started as root must drop to another user (``nobody`` here), who could write no file
in tmp_path. Both proxies get their parent, a second geproxy, on loopback too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gevent
import gevent.pywsgi
import gevent.server
import pytest

from geproxy.testing import Proxy, curl, free_port, require_tool, stop_process

pytestmark = pytest.mark.timeout(60)

#: Where requests go: direct, through the parent, through a dead parent then the good one,
#: refused by policy.
DIRECT, VIA_PARENT, BLOCKED, FAILOVER = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"

SQUID_CONF = """\
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
access_log tcp://127.0.0.1:{log_port} squid
cache_log /dev/null
coredump_dir {dir}
{user}
shutdown_lifetime 0 seconds
pinger_enable off
dns_nameservers 127.0.0.1
cache deny all
acl blocked dst {blocked}
acl via_parent dst {via_parent}
acl failover dst {failover}
http_access deny blocked
http_access allow all
cache_peer 127.0.0.1 parent {parent} 0 no-query no-digest name=good
cache_peer 127.0.0.1 parent {dead} 0 no-query no-digest name=dead
cache_peer 127.0.0.1 parent {backup} 0 no-query no-digest name=backup
cache_peer_access good allow via_parent
cache_peer_access good deny all
cache_peer_access dead allow failover
cache_peer_access dead deny all
cache_peer_access backup allow failover
cache_peer_access backup deny all
never_direct allow via_parent
never_direct allow failover
"""

GEPROXY_INI = """\
[geproxy]
access_log = {log}
log_format = squid
via = child
[parents]
parents = {parents}
rules =
    parent {routed}
[acl]
connect_ports = 1-65535
rules =
    blocked: deny dst {blocked}
    allow all
"""


# -- the origins: the same answers on each loopback address -----------------------------------


def _origin_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """``/`` a page with a charset (Squid logs the type without it), ``/empty`` a 204 with
    no type at all, ``/big`` 256 MiB streamed (for a client that goes away in the middle:
    more than the socket buffers on the way hold, so a proxy cannot have sent it all before
    the client left; loopback receive buffers grow to 32 MiB here)."""
    path = environ["PATH_INFO"]
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    if path == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(256 * 2 ** 20))])
        return (b"x" * 2 ** 20 for _ in range(256))
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", "6")])
    return [b"hello\n"]


@pytest.fixture
def origins() -> Iterator[dict[str, int]]:
    """An origin on each address requests go to: address -> port."""
    servers = {host: gevent.pywsgi.WSGIServer((host, 0), _origin_app, log=None,
                                              error_log=None)
               for host in (DIRECT, VIA_PARENT, FAILOVER)}
    for server in servers.values():
        server.start()
    yield {host: server.address[1] for host, server in servers.items()}
    for server in servers.values():
        server.stop(timeout=1)


# -- squid -----------------------------------------------------------------------------------


@dataclass
class Squid:
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _LogCollector:
    """The receiving end of squid's ``access_log tcp://``: one line per transaction."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    def _handle(self, sock: socket.socket, _: Any) -> None:
        rest = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:  # squid's end at its stop
                return
            if not data:
                return
            *whole, rest = (rest + data).split(b"\n")
            self.lines.extend(line.decode() for line in whole)


class _DeadPeer:
    """A parent that squid's start-up probe finds up, and that is gone by the first request:
    squid then falls over to the next parent, as geproxy does from a parent it cannot
    reach."""

    def __init__(self) -> None:
        self.probed = gevent.event.Event()
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.address[1]

    def _handle(self, sock: socket.socket, _: Any) -> None:
        self.probed.set()

    def die(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def squid(tmp_path: Path) -> Iterator[Callable[..., Squid]]:
    """``squid(parent=PORT, dead=PEER, backup=PORT)`` runs squid with SQUID_CONF until the
    test ends."""
    binary = require_tool("squid")
    started: list[tuple[subprocess.Popen, _LogCollector]] = []

    def start(parent: int, dead: _DeadPeer, backup: int) -> Squid:
        server = Squid(free_port())
        collector = _LogCollector(server.lines)
        user = "cache_effective_user nobody" if os.geteuid() == 0 else ""
        conf = tmp_path / "squid.conf"
        conf.write_text(SQUID_CONF.format(
            port=server.port, dir=tmp_path, log_port=collector.server.address[1], user=user,
            blocked=BLOCKED, via_parent=VIA_PARENT, failover=FAILOVER, dead=dead.port,
            parent=parent, backup=backup))
        errors = tmp_path / "squid.err"
        with open(errors, "wb") as out:
            # -n: a service name of its own, so its shared memory is no other squid's.
            process = subprocess.Popen(
                [binary, "-N", "-d", "1", "-n", f"geproxytest{server.port}", "-f", str(conf)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        started.append((process, collector))
        deadline = time.monotonic() + 15
        # Ready once it says so: a probe connection would be a line of its own in its log.
        while b"Accepting HTTP Socket connections" not in errors.read_bytes():
            assert process.poll() is None, errors.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "squid did not start in time"
            gevent.sleep(0.05)
        assert dead.probed.wait(10), "squid did not probe its first parent"
        dead.die()
        return server

    yield start
    for process, collector in started:
        stop_process(process)
        collector.server.stop(timeout=1)


# -- the same requests through both -----------------------------------------------------------


@dataclass
class Case:
    """One request; ``differs`` maps a field to (squid's value, geproxy's) where the two
    proxies answer differently by design, or where squid's varies from run to run (None)."""

    name: str
    method: str
    url: str
    differs: dict[str, tuple[Optional[str], str]] = field(default_factory=dict)


FIELDS = ("time", "elapsed", "client", "result", "bytes", "method", "url", "user",
          "hierarchy", "type")
COMPARED = ("client", "result", "method", "url", "user", "hierarchy", "type")


def _cases(ports: dict[str, int], closed: int) -> list[Case]:
    direct, routed, failover = (ports[DIRECT], ports[VIA_PARENT], ports[FAILOVER])
    # Each proxy answers its own errors with its own page (Squid's is text/html), and a
    # refused connect with its own status (Squid 503, geproxy 502 connection_refused);
    # Squid names the address it tried, geproxy logs no upstream when none was connected.
    own_page = {"type": ("text/html", "text/plain")}
    refused = {"hierarchy": (f"HIER_DIRECT/{DIRECT}", "HIER_NONE/-")}
    return [
        Case("direct GET", "GET", f"http://{DIRECT}:{direct}/"),
        Case("direct CONNECT", "CONNECT", f"{DIRECT}:{direct}"),
        Case("no content type", "GET", f"http://{DIRECT}:{direct}/empty"),
        Case("GET through the parent", "GET", f"http://{VIA_PARENT}:{routed}/"),
        Case("CONNECT through the parent", "CONNECT", f"{VIA_PARENT}:{routed}"),
        Case("GET through the second parent", "GET", f"http://{FAILOVER}:{failover}/"),
        Case("GET refused by policy", "GET", f"http://{BLOCKED}:{direct}/", own_page),
        Case("CONNECT refused by policy", "CONNECT", f"{BLOCKED}:{direct}", own_page),
        Case("GET to a closed port", "GET", f"http://{DIRECT}:{closed}/",
             {"result": ("TCP_MISS/503", "TCP_MISS/502"), **own_page, **refused}),
        # Squid closes such a tunnel without an answer; geproxy sends its 502.
        Case("CONNECT to a closed port", "CONNECT", f"{DIRECT}:{closed}",
             {"result": ("NONE_NONE/503", "NONE_NONE/502"), "type": ("-", "text/plain"),
              **refused}),
        # Squid 5.7 tags it _ABORTED only when it notices the close before its last write
        # of the moment, which a loaded machine turns either way (seen: 1.5 MB sent of
        # 256 MiB, logged TCP_MISS/200); geproxy always tells the client's leaving.
        Case("client gone in the middle", "GET", f"http://{DIRECT}:{direct}/big",
             {"result": (None, "TCP_MISS_ABORTED/200")}),
    ]


def _abandon_download(proxy_url: str, url: str) -> None:
    """Read an answer's head and close with its body unread: the client went away."""
    host, _, port = proxy_url.rpartition("/")[2].partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(65536)
            assert piece, "closed before the head"
            head += piece
        assert head.startswith(b"HTTP/1.1 200 ")


def _send(proxy_url: str, case: Case) -> None:
    if case.name == "client gone in the middle":
        _abandon_download(proxy_url, case.url)
        return
    if case.method == "CONNECT":
        curl("-s", "-o", "/dev/null", "-p", "-x", proxy_url, f"http://{case.url}/")
    else:
        curl("-s", "-o", "/dev/null", "-x", proxy_url, case.url)


def _wait_lines(read: Callable[[], list[str]], count: int) -> list[str]:
    deadline = time.monotonic() + 15
    lines = read()
    while len(lines) < count:
        assert time.monotonic() < deadline, f"{len(lines)} lines, expected {count}: {lines}"
        gevent.sleep(0.02)
        lines = read()
    return lines


def _by_request(lines: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    out = {}
    for line in lines:
        assert len(line.split()) == len(FIELDS), line
        values = dict(zip(FIELDS, line.split(), strict=True))
        out[(values["method"], values["url"])] = values
    return out


def test_squid_lines_match_what_squid_logs(squid, proxy_factory: Callable[..., Proxy],
                                           origins: dict[str, int], tmp_path: Path) -> None:
    parent = proxy_factory()
    # The failover goes to a parent of its own: Squid logs a request on a persistent
    # connection with the hierarchy code of the request that opened it.
    backup = proxy_factory()
    dead = _DeadPeer()
    log = tmp_path / "geproxy.serve.log"
    blocked = {"blocked": BLOCKED}
    geproxy = proxy_factory(GEPROXY_INI.format(
        log=log, parents=f"http://127.0.0.1:{parent.port}", routed=VIA_PARENT, **blocked))
    # The failover: a parent that cannot be reached, then the good one.
    fallback = proxy_factory(GEPROXY_INI.format(
        log=tmp_path / "fallback.log", routed=FAILOVER, **blocked,
        parents=f"http://127.0.0.1:{dead.port} http://127.0.0.1:{backup.port}"))
    reference = squid(parent=parent.port, dead=dead, backup=backup.port)
    cases = _cases(origins, closed=free_port())
    for case in cases:
        _send(reference.url, case)
        _send((fallback if FAILOVER in case.url else geproxy).url, case)

    theirs = _by_request(_wait_lines(lambda: reference.lines, len(cases)))

    def ours_read() -> list[str]:
        return [line for path in (log, tmp_path / "fallback.log") if path.exists()
                for line in path.read_text().splitlines()]

    ours = _by_request(_wait_lines(ours_read, len(cases)))
    for case in cases:
        squid_line, our_line = theirs[(case.method, case.url)], ours[(case.method, case.url)]
        for name in COMPARED:
            expected = squid_line[name]
            if name in case.differs:
                squid_value, expected = case.differs[name]
                assert squid_value is None or squid_line[name] == squid_value, (
                    case.name, name, squid_line)
            assert our_line[name] == expected, (case.name, name, our_line, squid_line)
    _replay_squids_own_log(reference.lines, len(cases), tmp_path)


def _replay_squids_own_log(lines: list[str], count: int, tmp_path: Path) -> None:
    """``geproxy explain --replay`` reads Squid's own log: under geproxy rules that say what
    squid's ``http_access`` said, no verdict changes; under rules that refuse tunnels, the
    tunnels squid let through (its CONNECT refused by policy aside) are the changes."""
    log = tmp_path / "squid.access.log"
    log.write_text("\n".join(lines[:count]) + "\n")
    same = tmp_path / "same.ini"
    same.write_text(f"[geproxy]\naccess_log = off\n[acl]\nconnect_ports = 1-65535\n"
                    f"rules =\n    blocked: deny dst {BLOCKED}\n    allow all\n")
    done = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config", str(same),
                           "--replay", str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        f"replayed    {count} requests of {log} (squid): {count} unchanged, 0 allowed -> "
        "refused, 0 refused -> allowed, 0 skipped, 0 undecidable")
    tunnels = tmp_path / "tunnels.ini"
    tunnels.write_text("[geproxy]\naccess_log = off\n[acl]\nconnect_ports = 1-65535\n"
                       "rules =\n    tunnels: deny method CONNECT\n    allow all\n")
    done = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config",
                           str(tunnels), "--replay", str(log)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    changed = [line.split(": ")[2].split(",")[0] for line in done.stdout.splitlines()
               if "allowed -> refused: " in line]
    assert sorted(changed) == sorted(
        f"127.0.0.1 - CONNECT {line.split()[6]}" for line in lines[:count]
        if line.split()[5] == "CONNECT" and not line.split()[3].startswith("TCP_DENIED"))
    # The CONNECT squid refused by policy is refused now too; its GET twin may go through
    # now, and whether squid's 403 was its policy's or a destination guard's, its line
    # does not say.
    assert "1 undecidable" in done.stdout and "squid-format TCP_DENIED/403" in done.stdout
