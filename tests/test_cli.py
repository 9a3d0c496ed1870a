"""The ``geproxy`` command, run as a real process: exit codes, one-line errors, logging,
serving, and graceful stop on SIGTERM.

Every process is waited for and its pipes closed (the leak check counts descriptors), every
wait is bounded, and all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

import gevent
import pytest

from geproxy import __version__
from geproxy.testing import Origin, curl, kit_ini, recv_all, require_tool

pytestmark = pytest.mark.timeout(30)

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "geproxy.ini"
START_TIMEOUT = 10.0


def _env(pythonpath: Optional[Path] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath),
                                                          env.get("PYTHONPATH")]))
    return env


def run_geproxy(*args: str, timeout: float = 20,
                pythonpath: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run ``python -m geproxy ARGS`` to completion and capture its output as text."""
    return subprocess.run([sys.executable, "-m", "geproxy", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(pythonpath))


def write_ini(tmp_path: Path, text: str, name: str = "geproxy.ini") -> str:
    path = tmp_path / name
    text = textwrap.dedent(text)
    if text.startswith("[geproxy]"):  # a configuration, maybe with a bad value: the kit's
        text = kit_ini(text, access_log="-")  # sections let tunnels reach loopback origins
    path.write_text(text)
    return str(path)


class Running:
    """A ``geproxy`` process with its standard output and error as pipes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "geproxy", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=_env())
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.port = 0

    def read_until(self, stream: str, regex: str, timeout: float = START_TIMEOUT
                   ) -> re.Match[str]:
        """Read lines of ``stream`` ("stdout" or "stderr") until one matches ``regex``."""
        pipe: IO[bytes] = getattr(self.proc, stream)
        seen: list[str] = getattr(self, f"{stream}_lines")
        with gevent.Timeout(timeout, AssertionError(
                f"no {regex!r} on {stream} within {timeout}s; got {seen!r}")):
            while True:
                raw = pipe.readline()
                if not raw:
                    raise AssertionError(f"{stream} closed before {regex!r}; got {seen!r}")
                line = raw.decode("utf-8", "replace").rstrip("\n")
                seen.append(line)
                match = re.search(regex, line)
                if match:
                    return match

    def wait_listening(self) -> int:
        match = self.read_until("stderr", r"listening on 127\.0\.0\.1:(\d+)")
        self.port = int(match.group(1))
        return self.port

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def rest(self, stream: str) -> list[str]:
        """Every remaining line of ``stream``, once the process has exited."""
        assert self.proc.poll() is not None
        pipe: IO[bytes] = getattr(self.proc, stream)
        seen: list[str] = getattr(self, f"{stream}_lines")
        with gevent.Timeout(5, AssertionError(f"{stream} not at EOF after exit")):
            seen.extend(pipe.read().decode("utf-8", "replace").splitlines())
        return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def geproxy_process() -> Iterator[Callable[..., Running]]:
    """``geproxy_process(*args)`` starts ``python -m geproxy``; all are reaped at teardown."""
    started: list[Running] = []

    def start(*args: str) -> Running:
        running = Running(*args)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("geproxy: "), line
    for part in parts:
        assert part in line, (part, line)
    return line


def recv_head(sock: socket.socket, timeout: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def open_tunnel(port: int, origin_port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = recv_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert head.endswith(b"\r\n\r\n"), head  # nothing after the head: the tunnel is clean
    return sock


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- one-shot commands ---------------------------------------------------------------------


def test_version() -> None:
    result = run_geproxy("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"geproxy {__version__}"


def test_check_config_sample() -> None:
    result = run_geproxy("check-config", "--config", str(SAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{SAMPLE}: ok"
    assert result.stderr == ""


def test_check_config_bad_value(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[geproxy]\nlisten = 127.0.0.1:0\nheader_timeout = soon\n")
    result = run_geproxy("check-config", "--config", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_line_error(result, path, "[geproxy] header_timeout", "soon")


@pytest.mark.parametrize("body, parts", [
    ("[geproxy]\nlisten = 127.0.0.1:0\nidle_timeout = forever\n",
     ["[geproxy] idle_timeout", "not a duration"]),
    ("[geproxy]\nlisten = 127.0.0.1:0\n\n[nosuch]\nkey = 1\n",
     ["[nosuch]", "unknown section"]),
    ("[geproxy]\nlisten = 127.0.0.1:0\nlisten_on = 127.0.0.1:0\n",
     ["[geproxy] listen_on", "unknown option"]),
    ("listen = 127.0.0.1:0\n", ["not a valid INI file"]),
    ("[geproxy]\nlisten = 127.0.0.1:0\nplugins = nosuchmodule\n",
     ["[geproxy] plugins", "nosuchmodule"]),
    ("[geproxy]\nlisten = 127.0.0.1:0\nplugins = json json\n",
     ["[geproxy] plugins", "json"]),
    ("[geproxy]\nlisten = 127.0.0.1:0\ndisable = nosuch\n", ["[geproxy] disable", "nosuch"]),
], ids=["bad-value", "unknown-section", "unknown-key", "not-ini", "no-plugin",
        "plugin-twice", "disable-unknown"])
def test_run_bad_config_exits_2(tmp_path: Path, body: str, parts: list[str]) -> None:
    path = write_ini(tmp_path, body)
    result = run_geproxy("--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_line_error(result, path, *parts)


def test_run_missing_file_exits_2(tmp_path: Path) -> None:
    path = str(tmp_path / "nosuch.ini")
    result = run_geproxy("--config", path)
    assert result.returncode == 2
    assert_one_line_error(result, path, "cannot read")


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions hold: root's are dropped by setpriv
    (no CAP_DAC_OVERRIDE), so a read-only directory refuses root too."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return [require_tool("setpriv"), f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("where, reason", [
    ("missing/access.log", "no such directory {tmp}/missing"),
    (".", "is a directory"),
    ("file/access.log", "{tmp}/file is not a directory"),
    ("locked/access.log", "permission denied on directory {tmp}/locked"),
    ("locked/old.log", "permission denied"),
], ids=["no-directory", "a-directory", "under-a-file", "directory-locked", "file-locked"])
def test_check_config_says_why_the_access_log_cannot_be_written(
        tmp_path: Path, where: str, reason: str) -> None:
    """The one-line error names the access log's path and the reason it cannot be
    written; check-config exits 1 and creates nothing."""
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.log").write_text("")
    (locked / "old.log").chmod(0o444)
    locked.chmod(0o555)
    target = str(tmp_path / where) if where != "." else str(tmp_path)
    path = write_ini(tmp_path, f"[geproxy]\nlisten = 127.0.0.1:0\naccess_log = {target}\n")
    try:
        result = subprocess.run([*_without_root_powers(), sys.executable, "-m", "geproxy",
                                 "check-config", "--config", path],
                                capture_output=True, text=True, timeout=20, env=_env())
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1
    assert_one_line_error(result, path, f"[geproxy] access_log: cannot write {target}: "
                          + reason.format(tmp=os.path.realpath(tmp_path)))
    assert sorted(p.name for p in locked.iterdir()) == ["old.log"]
    assert not (tmp_path / "missing").exists()


def test_run_address_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = write_ini(tmp_path, f"[geproxy]\nlisten = 127.0.0.1:{port}\naccess_log = off\n")
        result = run_geproxy("--config", path)
    assert result.returncode == 2
    assert_one_line_error(result, "cannot listen: ", str(port))


def test_unknown_log_level_is_a_usage_error() -> None:
    result = run_geproxy("--log-level", "loud", "check-config", "--config", str(SAMPLE))
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


#: Parents on loopback: the default [destinations] prohibits them; [::1] given in brackets.
LOOPBACK_PARENTS = ("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n"
                    "[parents]\nparents = http://egress:s3cret@127.0.0.1:3128 "
                    "http://[::1]:3129 http://10.40.0.9:3128\n[destinations]\n")


@pytest.mark.parametrize("allow, warned", [
    ("", ["127.0.0.1:3128", "[::1]:3129", "10.40.0.9:3128"]),
    ("allow = 10.40.0.9 ::1\n", ["127.0.0.1:3128"]),
    ("allow = 127.0.0.1 ::1 10.40.0.0/24\n", []),
])
def test_check_config_warns_of_a_parent_the_guard_prohibits(tmp_path: Path, allow: str,
                                                           warned: list[str]) -> None:
    """Valid, so exit 0; but each parent every request through which would get 502 is
    named in a warning (never with its credentials)."""
    path = tmp_path / "geproxy.ini"
    path.write_text(LOOPBACK_PARENTS + allow)
    result = run_geproxy("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok"
    lines = result.stderr.splitlines()
    assert len(lines) == len(warned), result.stderr
    for line, parent in zip(lines, warned, strict=True):
        assert " WARNING " in line and f"{path}: parent proxy {parent} is prohibited" in line
        assert "502" in line and "[destinations]" in line, line
    assert "s3cret" not in result.stderr


def test_the_start_warns_of_a_parent_the_guard_prohibits(
        tmp_path: Path, geproxy_process: Callable[..., Running]) -> None:
    path = tmp_path / "geproxy.ini"
    path.write_text(LOOPBACK_PARENTS + "allow = ::1 10.40.0.9\n")
    proxy = geproxy_process("--config", str(path))
    line = proxy.read_until("stderr", r"parent proxy .* is prohibited").string
    assert "127.0.0.1:3128" in line and " WARNING " in line, line
    proxy.wait_listening()  # a warning, not a refusal to start
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0


PROBE = '''
import logging

from geproxy import hookimpl

log = logging.getLogger("probe")


@hookimpl
def configure(config):
    log.debug("probe-debug")
    log.info("probe-info")
'''


@pytest.mark.parametrize("args, debug, info", [
    ([], False, True),
    (["-v"], True, True),
    (["check-config", "-v"], True, True),
    (["--log-level", "debug"], True, True),
    (["check-config", "--log-level", "debug"], True, True),
    (["--log-level", "warning"], False, False),
])
def test_log_level_options(tmp_path: Path, args: list[str], debug: bool, info: bool) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "geproxy_probe.py").write_text(PROBE)
    path = write_ini(tmp_path, "[geproxy]\nlisten = 127.0.0.1:0\nplugins = geproxy_probe\n")
    if "check-config" not in args:
        args = [*args, "check-config"]
    result = run_geproxy(*args, "--config", path, pythonpath=site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok"
    assert ("DEBUG probe: probe-debug" in result.stderr) is debug, result.stderr
    assert ("INFO probe: probe-info" in result.stderr) is info, result.stderr


# -- a running proxy -----------------------------------------------------------------------


def test_serves_and_logs_access(tmp_path: Path, origin: Origin,
                                geproxy_process: Callable[..., Running]) -> None:
    require_tool("curl")
    path = write_ini(tmp_path, "[geproxy]\nlisten = 127.0.0.1:0\naccess_log = -\n")
    proxy = geproxy_process("--config", path)
    port = proxy.wait_listening()
    result = curl("-x", f"http://127.0.0.1:{port}", origin.url("/"), timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello\n"
    assert [seen.path for seen in origin.seen] == ["/"]
    line = proxy.read_until("stdout", r" GET ").string
    fields = line.split()
    assert fields[2:6] == ["127.0.0.1", "GET", origin.url("/"), "200"], line
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0


def test_sigterm_drains_open_tunnel(tmp_path: Path, origin: Origin,
                                    geproxy_process: Callable[..., Running]) -> None:
    path = write_ini(tmp_path, """\
        [geproxy]
        listen = 127.0.0.1:0
        access_log = -
        graceful_timeout = 20s
        """)
    proxy = geproxy_process("--config", path)
    port = proxy.wait_listening()
    with open_tunnel(port, origin.port) as tunnel:
        proxy.proc.send_signal(signal.SIGTERM)
        match = proxy.read_until("stderr", r"stopping: (\d+) connections busy")
        assert match.group(1) == "1"
        assert_refused(port)
        assert proxy.proc.poll() is None  # still draining

        tunnel.sendall(f"GET /bytes/100000 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                       "Connection: close\r\n\r\n".encode())
        response = recv_all(tunnel)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"Content-Length: 100000" in head
        assert len(body) == 100000
    assert proxy.wait(timeout=10) == 0  # once the tunnel closed, not at graceful_timeout
    assert any(f" CONNECT 127.0.0.1:{origin.port} 200 " in line
               for line in proxy.rest("stdout")), proxy.stdout_lines
    stderr = proxy.rest("stderr")
    assert not any("graceful_timeout over" in line for line in stderr), stderr
    assert not any("Traceback" in line for line in stderr), stderr


def test_sigterm_cuts_tunnel_after_graceful_timeout(
        tmp_path: Path, origin: Origin, geproxy_process: Callable[..., Running]) -> None:
    path = write_ini(tmp_path, """\
        [geproxy]
        listen = 127.0.0.1:0
        access_log = off
        graceful_timeout = 1s
        """)
    proxy = geproxy_process("--config", path)
    port = proxy.wait_listening()
    with open_tunnel(port, origin.port) as tunnel:
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.read_until("stderr", r"stopping: 1 connections busy")
        assert_refused(port)
        # The tunnel stays open from this side; the proxy must cut it.
        assert recv_all(tunnel, timeout=10) == b""
        assert proxy.wait(timeout=10) == 0
    stderr = proxy.rest("stderr")
    assert any("graceful_timeout over: closing 1 connections" in line for line in stderr), (
        stderr)
    assert not any("Traceback" in line for line in stderr), stderr
