"""Clients and checks for tests: curl, raw exchanges, and the leak counters."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any, Callable, Optional

import gevent

# -- clients -------------------------------------------------------------------------------


def curl(*args: str, timeout: float = 60, input: Optional[bytes] = None
         ) -> subprocess.CompletedProcess:
    """Run curl (quiet, no config files, no proxy from the environment) and capture."""
    cmd = ["curl", "-q", "--silent", "--show-error", "--noproxy", "", *args]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(cmd, capture_output=True, timeout=timeout, input=input, env=env)


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read until EOF or a reset; ``timeout`` seconds of silence raise socket.timeout."""
    data = b""
    sock.settimeout(timeout)
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


class ResponseReader:
    """Answers read one by one from a client socket on a kept connection: ``read()`` gives
    the next answer's head and body (by its Content-Length, or chunked, decoded; none means
    an empty body), and bytes past it wait for the next ``read()``, so pipelined answers are
    read as they came. An answer cut by a close fails the test (AssertionError); every wait
    is bounded by ``timeout`` seconds (socket.timeout)."""

    def __init__(self, sock: socket.socket, timeout: float = 10) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = b""

    def _more(self, what: str) -> None:
        self.sock.settimeout(self.timeout)
        piece = self.sock.recv(65536)
        assert piece, f"the proxy closed in the middle of {what}: {self.buf[:200]!r}"
        self.buf += piece

    def read(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more("a head")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        fields = [line.lower() for line in head.split(b"\r\n")[1:]]
        if any(line.startswith(b"transfer-encoding:") and line.endswith(b"chunked")
               for line in fields):
            return head, self._chunked()
        length = next((int(line.split(b":", 1)[1]) for line in fields
                       if line.startswith(b"content-length:")), 0)
        while len(self.buf) < length:
            self._more("a body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return head, body

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                self._more("a chunk")
            line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:  # trailers (none from geproxy), then the empty line
                while b"\r\n" not in self.buf:
                    self._more("the last chunk")
                self.buf = self.buf.partition(b"\r\n")[2]
                return body
            while len(self.buf) < size + 2:
                self._more("a chunk")
            body, self.buf = body + self.buf[:size], self.buf[size + 2:]


def open_tunnel(proxy: Any, target: str, extra: bytes = b"",
                timeout: float = 10) -> tuple[socket.socket, bytes]:
    """Send ``CONNECT target`` (and ``extra`` bytes right after the head) to ``proxy`` (a
    kit Proxy, or an address); returns the socket and what came back up to the end of the
    answer's head, or less if the proxy closed first."""
    address = proxy.address if hasattr(proxy, "address") else proxy
    sock = socket.create_connection(address, timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + extra)
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(65536)
        if not piece:
            break
        head += piece
    return sock, head


def echo(sock: socket.socket) -> None:
    """A RawOrigin handler that echoes every byte until the client's EOF."""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def exchange(address: tuple[str, int], data: bytes, timeout: float = 10,
             until_close: bool = True) -> bytes:
    """Send raw bytes to the proxy and read until it closes (or ``timeout``)."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not piece:
                break
            out += piece
            if not until_close and b"\r\n\r\n" in out:
                break
        return out
    finally:
        sock.close()


# -- leak accounting -----------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_greenlets() -> int:
    """Spawned greenlets still alive (the hub, gevent's own thread-pool workers, which
    come and go with load, and a proxy's greenlets parked for its next connections, which
    it lets go within two seconds of its last, are not counted)."""
    import gc

    from ..serve.handlers import is_parked

    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, gevent.Greenlet) and not obj.dead
               and obj is not gevent.getcurrent() and not is_parked(obj))


def settle(baseline_fds: int, baseline_greenlets: int, limit: float = 5.0) -> tuple[int, int]:
    """Wait (bounded) for descriptors and greenlets to come back to the baseline."""
    deadline = time.monotonic() + limit
    fds, greenlets = open_fds(), live_greenlets()
    while (fds > baseline_fds or greenlets > baseline_greenlets) and (
            time.monotonic() < deadline):
        gevent.sleep(0.02)
        fds, greenlets = open_fds(), live_greenlets()
    return fds, greenlets


def wait_until(predicate: Callable[[], Any], limit: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds, for ``limit`` seconds at the most (every wait of a
    test is bounded); whether it held. For what a test cannot be told of: a process's log
    line, a figure on an admin page."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        gevent.sleep(0.02)
    return True


def head_field(head: bytes, name: bytes) -> Optional[bytes]:
    """The first value of field ``name`` (lower case) in an answer's ``head``, stripped; None
    when it has none."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def free_port() -> int:
    """A loopback port free a moment ago (bound to port 0, read, closed), for a tool that
    cannot listen on port 0 and tell its port (squid, haproxy, tinyproxy). Another process
    may take it in between: start the tool at once, and fail clearly when it cannot bind."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: "subprocess.Popen[Any]", timeout: float = 10.0) -> int:
    """Stop a process the test started, by its PID: SIGTERM, then SIGKILL if it is still
    there after ``timeout`` seconds; its exit status."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=5)


def require_tool(tool: str) -> str:
    """The path of a command a test needs; skips the test when it is missing, or fails it
    when ``GEPROXY_REQUIRE_TOOLS`` is set (CI, where every tool must be there)."""
    import shutil

    import pytest

    path = shutil.which(tool)
    if path is None:
        if os.environ.get("GEPROXY_REQUIRE_TOOLS"):
            pytest.fail(f"{tool} is required here but not installed")
        pytest.skip(f"{tool} is not installed")
    return path
