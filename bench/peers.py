"""The other proxies the bench measures geproxy against: tinyproxy, squid (one process, and
SMP with 2 workers), privoxy, proxy.py and pproxy.

Each runs in the foreground from a config (or command line) generated for its own work dir,
listens on a free port of 127.0.0.1, allows CONNECT to any port of any loopback address, and
logs nothing per request. Each `start_*` returns a running procs.Server or raises
procs.StartError with the reason, which the table prints.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import resource
import subprocess
import sys
from pathlib import Path

import certs
import procs

TINYPROXY = "/usr/bin/tinyproxy"
SQUID = "/usr/sbin/squid"
SQUID_USERS = ("proxy", "nobody")  # Debian's compiled-in user first
SQUID_IPC_DIR = Path("/run/squid")  # Debian's squid puts its SMP sockets here (runstatedir)
PRIVOXY = "/usr/sbin/privoxy"
PRIVOXY_CONFDIR = Path("/etc/privoxy")  # only for its templates (error pages)
#: Idle tunnels stay open through the idle-RSS measure: timeouts well above its bound.
IDLE_SECONDS = 600


def _nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- tinyproxy -----------------------------------------------------------------------------

TINYPROXY_SETUP = "one process, a thread per client connection"


def _tinyproxy_config(port: int, workdir: Path) -> str:
    # No ConnectPort line: CONNECT to any port. No Allow line: any client (it listens on
    # loopback only). No User line: as root it keeps running as root, which works here.
    return (
        f"Port {port}\n"
        "Listen 127.0.0.1\n"
        f"Timeout {IDLE_SECONDS}\n"
        "MaxClients 20000\n"
        f'LogFile "{workdir}/tinyproxy.log"\n'
        "LogLevel Critical\n"
        f'PidFile "{workdir}/tinyproxy.pid"\n'
    )


def start_tinyproxy(workdir: Path) -> procs.Server:
    port = procs.free_port()
    conf = workdir / "tinyproxy.conf"
    conf.write_text(_tinyproxy_config(port, workdir))
    return procs.start_server("tinyproxy", [TINYPROXY, "-d", "-c", str(conf)], port, workdir)


# --- squid ---------------------------------------------------------------------------------

SQUID_1_SETUP = "`squid -N`: one process, no kids"
SQUID_2_SETUP = ("`workers 2`, `squid --foreground`: a master, a coordinator and 2 workers "
                 "sharing the port")


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


def _squid_config(port: int, workdir: Path, user: str | None, workers: int,
                  tls_port: int = 0, tls: certs.TLSFiles | None = None) -> str:
    lines = [
        f"http_port 127.0.0.1:{port}",
        *([f"https_port 127.0.0.1:{tls_port} tls-cert={tls.cert} tls-key={tls.key}"]
          if tls else []),
        f"workers {workers}",
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
        f"read_timeout {IDLE_SECONDS} seconds",
        f"max_filedescriptors {_nofile()}",
    ]
    if user:
        lines.append(f"cache_effective_user {user}")
    return "\n".join(lines) + "\n"


def _squid_ipc_dir(user: str | None) -> None:
    """SMP squid's kids (running as `user`) make their UNIX sockets in SQUID_IPC_DIR."""
    if user:
        entry = pwd.getpwnam(user)
        SQUID_IPC_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(SQUID_IPC_DIR, entry.pw_uid, entry.pw_gid)
    elif not os.access(SQUID_IPC_DIR, os.W_OK):
        raise procs.StartError(f"SMP needs {SQUID_IPC_DIR} writable by this user (run as root)")


def squid_tls_library() -> str:
    """The TLS library squid was built with (Debian's: GnuTLS), from `squid -v`; its
    https_port needs one."""
    out = subprocess.run([SQUID, "-v"], capture_output=True, text=True, timeout=10).stdout
    for option, name in (("--with-openssl", "OpenSSL"), ("--with-gnutls", "GnuTLS")):
        if option in out:
            return name
    return ""


def start_squid(workdir: Path, workers: int, tls: certs.TLSFiles | None = None) -> procs.Server:
    """squid with `workers`; with `tls`, an https_port too (StartError if squid has no TLS
    library)."""
    if tls and not squid_tls_library():
        raise procs.StartError("squid -v names no TLS library (--with-openssl or --with-gnutls)"
                               ": no https_port")
    user = _squid_user()
    if user:
        # Squid writes its cache.log there after switching user; the dirs above must let
        # it through (the bench's temp dir is made 0755 for that).
        entry = pwd.getpwnam(user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    if workers > 1:
        _squid_ipc_dir(user)
    port = procs.free_port()
    tls_port = procs.free_port() if tls else 0
    conf = workdir / "squid.conf"
    conf.write_text(_squid_config(port, workdir, user, workers, tls_port, tls))
    # A service name of our own keeps its shared-memory segments (/dev/shm/NAME-*.shm) and
    # SMP sockets (/run/squid/NAME-*.ipc) apart from any other squid's; they are removed
    # after the stop.
    service = f"geproxybench{os.getpid()}w{workers}"
    mode = ["--foreground"] if workers > 1 else ["-N"]
    server = procs.start_server(
        f"squid-{workers}", [SQUID, *mode, "-n", service, "-f", str(conf)], port, workdir,
        leftovers=(f"/dev/shm/{service}-*.shm", f"{SQUID_IPC_DIR}/{service}-*.ipc"),
    )
    return procs.wait_tls_port(server, tls_port) if tls else server


# --- privoxy -------------------------------------------------------------------------------

PRIVOXY_SETUP = "one process, a thread per client connection; no filters, no logging"


def _privoxy_config(port: int, workdir: Path) -> str:
    # No filterfile and one actions file that only allows CONNECT to every port: nothing
    # filters or blocks. No logfile: nothing is logged. Keep-alive on both sides.
    return (
        f"confdir {PRIVOXY_CONFDIR}\n"
        f"actionsfile {workdir}/bench.action\n"
        f"listen-address 127.0.0.1:{port}\n"
        "toggle 1\n"
        "enable-remote-toggle 0\n"
        "enable-remote-http-toggle 0\n"
        "enable-edit-actions 0\n"
        "accept-intercepted-requests 0\n"
        f"keep-alive-timeout {IDLE_SECONDS}\n"
        "default-server-timeout 60\n"
        "tolerate-pipelining 1\n"
        f"socket-timeout {IDLE_SECONDS}\n"
        f"max-client-connections {_nofile() // 2 - 64}\n"
        "listen-backlog 4096\n"
    )


def start_privoxy(workdir: Path) -> procs.Server:
    port = procs.free_port()
    (workdir / "bench.action").write_text("{ +limit-connect{-} }\n/\n")  # CONNECT to any port
    conf = workdir / "privoxy.conf"
    conf.write_text(_privoxy_config(port, workdir))
    return procs.start_server("privoxy", [PRIVOXY, "--no-daemon", str(conf)], port, workdir)


# --- proxy.py ------------------------------------------------------------------------------

#: Threadless (asyncio) with an acceptor process per core, as proxy.py's README and its own
#: benchmark run it. Of its two threadless modes, "local" (each acceptor runs the
#: connections it accepts in a companion thread; its default since 2.4) made about 10% more
#: CONNECT cycles here for less CPU than "remote" (--local-executor 0 --num-workers 2, a
#: worker process per core besides the acceptors), which made more keep-alive requests, a
#: figure that does not count for proxy.py anyway (it sticks to the first host).
PROXYPY_ACCEPTORS = os.cpu_count() or 1
PROXYPY_SETUP = (f"threadless, `--num-acceptors {PROXYPY_ACCEPTORS} --local-executor 1`: "
                 f"{PROXYPY_ACCEPTORS} acceptor processes + the main one")


def start_proxypy(workdir: Path) -> procs.Server:
    port = procs.free_port()
    argv = [
        sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
        "--threadless", "--num-acceptors", str(PROXYPY_ACCEPTORS), "--local-executor", "1",
        "--backlog", "4096", "--open-file-limit", str(_nofile()),
        "--timeout", str(IDLE_SECONDS), "--log-level", "ERROR",
        "--log-file", str(workdir / "proxy.py.log"), "--pid-file", str(workdir / "proxy.pid"),
    ]
    return procs.start_server("proxy.py", argv, port, workdir)


# --- pproxy --------------------------------------------------------------------------------

PPROXY_SETUP = "one process, asyncio on uvloop when installed; no -v: nothing logged"


def start_pproxy(workdir: Path) -> procs.Server:
    port = procs.free_port()
    argv = [sys.executable, "-m", "pproxy", "-l", f"http://127.0.0.1:{port}"]
    return procs.start_server("pproxy", argv, port, workdir)


# --- what is installed ---------------------------------------------------------------------

def missing_binary(path: str, package: str) -> str | None:
    return None if Path(path).exists() else f"not installed (apt-get install {package})"


def missing_distribution(name: str) -> str | None:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed (pip install -r bench/requirements.txt)"
    return None


def distribution_version(name: str, *extras: str) -> str:
    """`name VERSION`, plus `(with EXTRA VERSION)` for each extra that is installed."""
    text = f"{name} {importlib.metadata.version(name)}"
    for extra in extras:
        try:
            text += f" (with {extra} {importlib.metadata.version(extra)})"
        except importlib.metadata.PackageNotFoundError:
            text += f" (without {extra})"
    return text


def binary_version(argv: list[str], prefix: str, name: str) -> str:
    """`name` and the first word after `prefix` on the first line that argv prints."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    lines = (out.stdout or out.stderr).strip().splitlines()
    words = lines[0].removeprefix(prefix).split() if lines else []
    return f"{name} {words[0] if words else 'unknown version'}"
