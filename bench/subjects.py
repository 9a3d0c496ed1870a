"""What the bench measures: no proxy (direct), geproxy, tinyproxy and squid.

Each proxy runs in the foreground from a config generated into its own work dir, listens on
a free port of 127.0.0.1, allows CONNECT to any port of 127.0.0.1, and logs nothing per
request.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import procs

REPO = Path(__file__).resolve().parent.parent
TINYPROXY = "/usr/bin/tinyproxy"
SQUID = "/usr/sbin/squid"
SQUID_USERS = ("proxy", "nobody")  # Debian's compiled-in user first


@dataclass(frozen=True)
class Subject:
    name: str
    missing: Callable[[], str | None]  # why it cannot run here, or None
    version: Callable[[], str]
    start: Callable[[Path], procs.Server] | None  # None: no proxy, clients go direct


def geproxy_config(port: int) -> str:
    """The bench's whole geproxy config: the one place to add or change a section.

    The CONNECT measures tunnel to the origin's port on 127.0.0.1, so a policy section that
    restricts CONNECT ports or loopback destinations must let those through here.
    """
    return (
        "[geproxy]\n"
        f"listen = 127.0.0.1:{port}\n"
        "max_connections = 20000\n"
        "idle_timeout = 5m\n"
        "access_log = off\n"
        "\n[acl]\n"
        "connect_ports = 1-65535\n"
        "\n[destinations]\n"
        "allow = 127.0.0.0/8\n"
    )


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


def _start_geproxy(workdir: Path) -> procs.Server:
    port = procs.free_port()
    conf = workdir / "geproxy.ini"
    conf.write_text(geproxy_config(port))
    command = [*_geproxy_command(), "--config", str(conf)]
    return procs.start_server("geproxy", command, port, workdir)


def _tinyproxy_config(port: int, workdir: Path) -> str:
    # No ConnectPort line: CONNECT to any port. No Allow line: any client (it listens on
    # loopback only). No User line: as root it keeps running as root, which works here.
    return (
        f"Port {port}\n"
        "Listen 127.0.0.1\n"
        "Timeout 600\n"
        "MaxClients 20000\n"
        f'LogFile "{workdir}/tinyproxy.log"\n'
        "LogLevel Critical\n"
        f'PidFile "{workdir}/tinyproxy.pid"\n'
    )


def _start_tinyproxy(workdir: Path) -> procs.Server:
    port = procs.free_port()
    conf = workdir / "tinyproxy.conf"
    conf.write_text(_tinyproxy_config(port, workdir))
    return procs.start_server("tinyproxy", [TINYPROXY, "-d", "-c", str(conf)], port, workdir)


def _squid_user() -> str | None:
    """Squid refuses to run as root: as root, name the user it switches to."""
    if os.geteuid() != 0:
        return None
    for name in SQUID_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise procs.StartError(f"running as root and none of the users {SQUID_USERS} exists")


def _squid_config(port: int, workdir: Path, user: str | None) -> str:
    lines = [
        f"http_port 127.0.0.1:{port}",
        "http_access allow all",  # no Safe_ports/SSL_ports rules: CONNECT to any port
        "cache deny all",
        "cache_mem 0 MB",
        "access_log none",
        "cache_store_log none",
        f"cache_log {workdir}/cache.log",
        f"pid_filename {workdir}/squid.pid",
        f"coredump_dir {workdir}",
        "pinger_enable off",  # no ICMP prober
        "icp_port 0",
        "htcp_port 0",
        "dns_nameservers 127.0.0.1",  # targets are IP literals; any lookup stays on loopback
        "visible_hostname bench",
        "shutdown_lifetime 0 seconds",
        f"max_filedescriptors {procs.WANTED_NOFILE}",
    ]
    if user:
        lines.append(f"cache_effective_user {user}")
    return "\n".join(lines) + "\n"


def _start_squid(workdir: Path) -> procs.Server:
    user = _squid_user()
    if user:
        # Squid writes its cache.log there after switching user; the dirs above must let
        # it through (the bench's temp dir is made 0755 for that).
        entry = pwd.getpwnam(user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    port = procs.free_port()
    conf = workdir / "squid.conf"
    conf.write_text(_squid_config(port, workdir, user))
    # A service name of our own keeps its shared-memory segments (/dev/shm/NAME-*.shm)
    # apart from any other squid's; the bench removes them after the stop.
    service = f"geproxybench{os.getpid()}"
    return procs.start_server(
        "squid", [SQUID, "-N", "-n", service, "-f", str(conf)], port, workdir,
        leftovers=(f"/dev/shm/{service}-*.shm",),
    )


def _missing_binary(path: str) -> Callable[[], str | None]:
    return lambda: None if Path(path).exists() else f"not installed ({path})"


def _binary_version(argv: list[str], prefix: str, name: str) -> Callable[[], str]:
    def version() -> str:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        first = (out.stdout or out.stderr).strip().splitlines()[0]
        return f"{name} {first.removeprefix(prefix).strip()}"
    return version


SUBJECTS: tuple[Subject, ...] = (
    Subject("direct", lambda: None, lambda: "no proxy", None),
    Subject("geproxy", _geproxy_missing, _geproxy_version, _start_geproxy),
    Subject("tinyproxy", _missing_binary(TINYPROXY),
            _binary_version([TINYPROXY, "-v"], "tinyproxy", "tinyproxy"), _start_tinyproxy),
    Subject("squid", _missing_binary(SQUID),
            _binary_version([SQUID, "-v"], "Squid Cache: Version", "squid"), _start_squid),
)


def by_names(names: list[str]) -> list[Subject]:
    """The subjects named, in the order given; SystemExit on an unknown name."""
    known = {subject.name: subject for subject in SUBJECTS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"bench: unknown subject(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return [known[name] for name in names]
