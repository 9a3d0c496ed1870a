"""Processes the bench starts: free ports, readiness, stopping by PID, /proc readings.

Every wait here is bounded in attempts and in time; nothing sleeps to wait for readiness
without checking.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_TIMEOUT = 20.0
READY_ATTEMPTS = 400
STOP_TIMEOUT = 10.0
WANTED_NOFILE = 65536


class StartError(Exception):
    """A server did not come up; the message says why, for the results table."""


@dataclass
class Server:
    """A running child process listening on 127.0.0.1:port."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    leftovers: tuple[str, ...] = ()  # glob patterns of files it leaves behind when stopped
    tls_port: int = 0  # its TLS listener on 127.0.0.1, 0 for none

    @property
    def pid(self) -> int:
        return self.process.pid


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_NOFILE, max(hard, WANTED_NOFILE)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: the hard limit is as far as we go
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    name: str, argv: list[str], port: int, workdir: Path, leftovers: tuple[str, ...] = (),
) -> Server:
    """Start argv with its output in workdir/NAME.log and wait until it accepts on port.

    The child gets its own session, so a Ctrl-C reaches only the bench, which then stops
    it by PID like any other child.
    """
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=workdir, start_new_session=True,
        )
    server = Server(name, port, process, log, leftovers)
    try:
        wait_port(server)
    except StartError:
        stop_server(server)
        raise
    return server


def wait_tls_port(server: Server, tls_port: int) -> Server:
    """The server, with its TLS listener on tls_port, once that port accepts too; the
    server is stopped and StartError raised if it does not."""
    with_tls = dataclasses.replace(server, tls_port=tls_port)
    try:
        wait_port(dataclasses.replace(server, port=tls_port))
    except StartError:
        stop_server(server)
        raise
    return with_tls


def wait_port(server: Server) -> None:
    """Return once 127.0.0.1:port accepts; StartError if the process exits or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT
    for _ in range(READY_ATTEMPTS):
        code = server.process.poll()
        if code is not None:
            raise StartError(f"exited with code {code}: {last_line(server.log)}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.2):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise StartError(f"not listening on port {server.port} after {READY_TIMEOUT:.0f} s")


def last_line(log: Path) -> str:
    """The last non-empty line of a log, shortened for a table cell."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


def stop(process: subprocess.Popen[Any]) -> list[str]:
    """SIGTERM the process by its PID, SIGKILL it if it lingers, and reap it; then make sure
    every process it had started is gone too (squid's kids, proxy.py's acceptors, geproxy's
    workers): one that outlives it gets SIGKILL by its own PID. Returns notes on what had to
    be killed, for the table."""
    if process.poll() is not None:
        return []
    family = _identities(process_tree(process.pid)[1:])
    notes = []
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        notes.append(f"PID {process.pid} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killed")
    left = _wait_gone(family, STOP_TIMEOUT)
    for pid, started in left:
        if _identity(pid) == (pid, started):
            os.kill(pid, signal.SIGKILL)
    if left:
        notes.append(f"{len(left)} process(es) started by PID {process.pid} outlived it "
                     f"by {STOP_TIMEOUT:.0f} s: killed ({', '.join(str(pid) for pid, _ in left)})")
    still = _wait_gone(left, STOP_TIMEOUT)
    if still:
        notes.append(f"still running after SIGKILL: {', '.join(str(pid) for pid, _ in still)}")
    return notes


def _identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time) of a live process, None once it ended (or is a zombie): the start
    time tells the same process from a later one that reuses its PID."""
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (pid, int(fields[19]))  # starttime, field 22


def _identities(pids: list[int]) -> list[tuple[int, int]]:
    return [found for found in map(_identity, pids) if found]


def _wait_gone(members: list[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    """Wait up to `timeout` for the processes to end; return those still there."""
    deadline = time.monotonic() + timeout
    left = members
    for _ in range(int(timeout / 0.05) + 1):
        left = [member for member in left if _identity(member[0]) == member]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return left


def stop_server(server: Server) -> list[str]:
    """Stop the server and its children by PID and remove what it leaves behind; return
    notes on anything that had to be killed."""
    notes = [f"{server.name}: {note}" for note in stop(server.process)]
    for pattern in server.leftovers:
        for path in glob.glob(pattern):
            os.remove(path)
    return notes


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is [0])."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a proxy that forks workers is measured whole)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError):  # the process ended while we looked
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of the process tree, from /proc/PID/status."""
    total = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, from /proc/PID/stat (all threads included)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of the process tree in seconds: user space and the kernel apart."""
    user = system = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        user, system = user + int(fields[11]), system + int(fields[12])  # fields 14, 15
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def build_c(source: Path, workdir: Path, libs: tuple[str, ...] = ()) -> Path:
    """Compile one C file with gcc -O2 into workdir, linked with `libs` (-lssl ...); return
    the binary."""
    if shutil.which("gcc") is None:
        raise SystemExit("bench: gcc is needed to build the load generator (apt-get install gcc)")
    binary = workdir / source.stem
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source), *libs], check=True,
                   timeout=120)
    return binary


def machine() -> str:
    """The machine a report was measured on: cores, kernel, Python."""
    return (f"{os.cpu_count()} cores, Linux {platform.release()}, Python "
            f"{platform.python_version()}")


def publish(text: str, kind: str, started: datetime.datetime, save: bool) -> None:
    """Print a report, and with ``save`` keep it as bench/results/KIND-YYYYmmdd-HHMMSS.md."""
    print(text)
    if save:
        saved = Path(__file__).resolve().parent / "results" / f"{kind}-{started:%Y%m%d-%H%M%S}.md"
        saved.write_text(text)
        print(f"saved {saved}", file=sys.stderr)
