"""What the bench measures: no proxy (direct), geproxy with one worker and with one per core,
and the other proxies (peers.py): tinyproxy, squid with 1 and 2 workers, privoxy, proxy.py
and pproxy.

Each proxy runs in the foreground from a config generated into its own work dir, listens on
a free port of 127.0.0.1, allows CONNECT to any port of 127.0.0.1, and logs nothing per
request.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import certs
import peers
import procs

REPO = Path(__file__).resolve().parent.parent
DIRECT, GEPROXY, PEER = "direct", "geproxy", "peer"  # the kinds of subject


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str  # DIRECT, GEPROXY or PEER: peers are what "best peer" is chosen from
    setup: str  # how it runs (processes, workers), for the report's header
    missing: Callable[[], str | None]  # why it cannot run here, or None
    version: Callable[[], str]
    start: Callable[[Path], procs.Server] | None  # None: no proxy, clients go direct
    #: Starts it with a TLS listener too (procs.Server.tls_port); None: none measured.
    start_tls: Callable[[Path, certs.TLSFiles], procs.Server] | None = None


#: geproxy's [tls] options in the TLS measures, besides the certificate. http2 on: the same
#: listener serves the HTTP/1.1 measures (the load generator offers no ALPN) and HTTP/2's;
#: max_streams 1000 lets one HTTP/2 connection carry the 1,000 tunnels of that measure.
GEPROXY_TLS_OPTIONS = {"http2": "on", "max_streams": "1000"}


#: The per-request policy of the audited configuration: a `dst` rule every request is checked
#: against (it matches none of the bench's), then the clients' rule.
AUDITED_RULES = ("blocked: deny dst .blocked.example.com 169.254.169.254",
                 "loopback: allow src 127.0.0.0/8")


def geproxy_config(port: int, workers: str | None = None, tls_port: int = 0,
                   tls: certs.TLSFiles | None = None, access_log: Path | None = None) -> str:
    """The bench's whole geproxy config: the one place to add or change a section.

    Every built-in plugin stays on, as in a deployment; installed plugins of others are off
    (``foreign_plugins``). The CONNECT measures tunnel to the
    origin's port on 127.0.0.1, so a policy section that restricts CONNECT ports or loopback
    destinations must let those through here. `workers` (1, auto) is left out when None,
    for callers that set it themselves (bench/soak.py). With `tls`, a TLS listener on
    `tls_port` serves beside the plain one.
    """
    listen = f"127.0.0.1:{port}" + (f", tls://127.0.0.1:{tls_port}" if tls else "")
    foreign = foreign_plugins()
    tls_section = "".join(
        ["\n[tls]\n", f"certificate = {tls.chain}\n",
         *(f"{key} = {value}\n" for key, value in GEPROXY_TLS_OPTIONS.items())]
    ) if tls else ""
    return (
        "[geproxy]\n"
        f"listen = {listen}\n"
        + (f"workers = {workers}\n" if workers else "")
        + (f"disable = {' '.join(foreign)}\n" if foreign else "")
        + "max_connections = 20000\n"
        "idle_timeout = 5m\n"
        + (f"access_log = {access_log}\nlog_format = json\n" if access_log
           else "access_log = off\n")
        + "\n[acl]\n"
        "connect_ports = 1-65535\n"
        + ("rules =\n" + "".join(f"    {rule}\n" for rule in AUDITED_RULES)
           if access_log else "")
        + "\n[destinations]\n"
        "allow = 127.0.0.0/8\n"
        + tls_section
    )


def foreign_plugins() -> list[str]:
    """Installed plugins that are not geproxy's own (the example in examples/, a developer's
    own): geproxy loads every one it finds, so the bench turns them off by name, to measure
    what a deployment of geproxy runs. Empty where geproxy is not installed."""
    try:
        from geproxy.policy.plugins import DEFAULT_PLUGINS
    except ImportError:
        return []
    own = {name for name, _ in DEFAULT_PLUGINS}
    return sorted({entry.name for entry in importlib.metadata.entry_points(group="geproxy")}
                  - own)


def _geproxy_command() -> list[str]:
    script = shutil.which("geproxy")
    return [script] if script else [sys.executable, "-m", "geproxy"]


def _geproxy_missing() -> str | None:
    if shutil.which("geproxy") or importlib.util.find_spec("geproxy"):
        return None
    return "not installed (pip install -e . in the repository)"


def _geproxy_version() -> str:
    try:
        version = importlib.metadata.version("geproxy")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    described = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, timeout=10,
    )
    if described.returncode == 0:
        return f"geproxy {version} ({described.stdout.strip()})"
    return f"geproxy {version}"


def _geproxy_start(workers: str, audited: bool = False) -> Callable[[Path], procs.Server]:
    def start(workdir: Path) -> procs.Server:
        port = procs.free_port()
        conf = workdir / "geproxy.ini"
        conf.write_text(geproxy_config(port, workers,
                                       access_log=workdir / "access.log" if audited else None))
        command = [*_geproxy_command(), "--config", str(conf)]
        return procs.start_server(f"geproxy-{workers}", command, port, workdir)
    return start


def _geproxy_start_tls(workers: str) -> Callable[[Path, certs.TLSFiles], procs.Server]:
    def start(workdir: Path, tls: certs.TLSFiles) -> procs.Server:
        port, tls_port = procs.free_port(), procs.free_port()
        conf = workdir / "geproxy.ini"
        conf.write_text(geproxy_config(port, workers, tls_port, tls))
        command = [*_geproxy_command(), "--config", str(conf)]
        server = procs.start_server(f"geproxy-{workers}", command, port, workdir)
        return procs.wait_tls_port(server, tls_port)
    return start


def _no_proxy() -> str | None:
    return None


def _fixed(text: str) -> Callable[[], str]:
    return lambda: text


def _binary_version(argv: list[str], prefix: str, name: str) -> Callable[[], str]:
    return lambda: peers.binary_version(argv, prefix, name)


SUBJECTS: tuple[Subject, ...] = (
    Subject(DIRECT, DIRECT, "no proxy: the load goes straight to the origin",
            _no_proxy, _fixed("no proxy"), None),
    Subject("geproxy-1", GEPROXY, "`workers = 1`: one process",
            _geproxy_missing, _geproxy_version, _geproxy_start("1"), _geproxy_start_tls("1")),
    Subject("geproxy-1-audited", GEPROXY,
            "`workers = 1`, every request logged as JSON to a file and checked by a `dst` rule",
            _geproxy_missing, _geproxy_version, _geproxy_start("1", audited=True)),
    Subject("geproxy-auto", GEPROXY,
            f"`workers = auto`: a master and {os.cpu_count()} workers on one SO_REUSEPORT port",
            _geproxy_missing, _geproxy_version, _geproxy_start("auto"),
            _geproxy_start_tls("auto")),
    Subject("tinyproxy", PEER, peers.TINYPROXY_SETUP,
            lambda: peers.missing_binary(peers.TINYPROXY, "tinyproxy"),
            _binary_version([peers.TINYPROXY, "-v"], "tinyproxy", "tinyproxy"),
            peers.start_tinyproxy),
    Subject("squid-1", PEER, peers.SQUID_1_SETUP,
            lambda: peers.missing_binary(peers.SQUID, "squid"),
            _binary_version([peers.SQUID, "-v"], "Squid Cache: Version", "squid"),
            lambda workdir: peers.start_squid(workdir, 1),
            lambda workdir, tls: peers.start_squid(workdir, 1, tls)),
    Subject("squid-2", PEER, peers.SQUID_2_SETUP,
            lambda: peers.missing_binary(peers.SQUID, "squid"),
            _binary_version([peers.SQUID, "-v"], "Squid Cache: Version", "squid"),
            lambda workdir: peers.start_squid(workdir, 2),
            lambda workdir, tls: peers.start_squid(workdir, 2, tls)),
    Subject("privoxy", PEER, peers.PRIVOXY_SETUP,
            lambda: peers.missing_binary(peers.PRIVOXY, "privoxy"),
            _binary_version([peers.PRIVOXY, "--version"], "Privoxy version", "privoxy"),
            peers.start_privoxy),
    Subject("proxy.py", PEER, peers.PROXYPY_SETUP,
            lambda: peers.missing_distribution("proxy.py"),
            lambda: peers.distribution_version("proxy.py"), peers.start_proxypy),
    Subject("pproxy", PEER, peers.PPROXY_SETUP,
            lambda: peers.missing_distribution("pproxy"),
            lambda: peers.distribution_version("pproxy", "uvloop"), peers.start_pproxy),
)
#: Every subject but the audited geproxy, which bench/floor.py measures (it adds its own
#: minutes to a run; name it in --subjects to have it in the table).
DEFAULT = ",".join(subject.name for subject in SUBJECTS if subject.name != "geproxy-1-audited")
#: Older names, still accepted (bench/soak.py asks for "geproxy").
ALIASES = {"geproxy": "geproxy-1", "squid": "squid-1"}


def by_names(names: list[str]) -> list[Subject]:
    """The subjects named, in the order given; SystemExit on an unknown name."""
    known = {subject.name: subject for subject in SUBJECTS}
    wanted = [ALIASES.get(name, name) for name in names]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"bench: unknown subject(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return [known[name] for name in dict.fromkeys(wanted)]
