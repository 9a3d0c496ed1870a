"""The test kit: a pytest plugin with a running proxy, real origins and plugin fakes.

Use it from a conftest.py whose first lines patch gevent in::

    from gevent import monkey; monkey.patch_all()
    pytest_plugins = ["geproxy.testing"]

Everything listens on loopback, on port 0. Names are resolved by :class:`StaticResolver`
(names ending in ``.test`` by default), never by the system resolver, so no test sends a
packet beyond loopback.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gevent
import gevent.pywsgi
import gevent.server
import pytest

from . import errors, hookimpl
from .models import Context, Record, Request, Response
from .server import ProxyServer, create_server

__all__ = [
    "Proxy",
    "Origin",
    "ProxyProcess",
    "RawOrigin",
    "StaticResolver",
    "HookRecorder",
    "pattern",
    "pattern_sha256",
    "wait_for_records",
    "open_fds",
    "recv_all",
    "live_greenlets",
]

# -- data ----------------------------------------------------------------------------------

# 2047 different digests: 65504 bytes with no shorter period, and not a power of two, so
# a relay that drops, repeats or reorders buffer-sized pieces changes the digest.
_BLOCK = b"".join(hashlib.sha256(b"geproxy %d" % i).digest() for i in range(2047))
_DOUBLE = _BLOCK * 2


def pattern(size: int, block: int = 64 * 1024) -> Iterator[bytes]:
    """The first ``size`` bytes of an endless repetition of a 65504-byte block, in pieces
    of at most ``block`` bytes; the bytes do not depend on the piece size."""
    sent = 0
    period = len(_BLOCK)
    while sent < size:
        start = sent % period
        piece = _DOUBLE[start: start + min(block, period, size - sent)]
        sent += len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


# -- plugins for tests ---------------------------------------------------------------------


class StaticResolver:
    """A ``resolve`` plugin answering from a mapping; unknown names are NXDOMAIN.

    IP literals pass through (``None``) to the system resolver, which answers them without
    any lookup; ``localhost`` too. Counts lookups per name in ``queries``.
    """

    name = "static_resolver"

    def __init__(self, names: Optional[dict[str, Sequence[str]]] = None) -> None:
        self.names: dict[str, list[str]] = {k: list(v) for k, v in (names or {}).items()}
        self.queries: dict[str, int] = {}

    def add(self, name: str, *addresses: str) -> None:
        self.names[name] = list(addresses)

    @hookimpl(tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
        if host == "localhost":
            return None
        self.queries[host] = self.queries.get(host, 0) + 1
        if host not in self.names:
            raise errors.DNSError(f"{host}: not in the test resolver", rcode="NXDOMAIN")
        return [(a, port, 0, 0) if ":" in a else (a, port) for a in self.names[host]]


class HookRecorder:
    """Records every hook call, in order, as ``(hook name, detail)``.

    Its implementations are wrappers, so it sees each call whatever the other plugins answer.
    """

    name = "hook_recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @hookimpl(wrapper=True, tryfirst=True)
    def on_connect(self, ctx: Context) -> Any:
        self.calls.append(("on_connect", ctx.client_addr[0]))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def on_request(self, ctx: Context, request: Request) -> Any:
        self.calls.append(("on_request", f"{request.method} {request.target}"))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def route(self, ctx: Context, request: Request) -> Any:
        self.calls.append(("route", request.host))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Any:
        self.calls.append(("resolve", f"{host}:{port}"))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def on_response(self, ctx: Context, request: Request, response: Response) -> Any:
        self.calls.append(("on_response", str(response.status)))
        return (yield)

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        self.calls.append(("on_close", f"{record.method} {record.status}"))


class RecordCollector:
    """Keeps every Record handed to ``on_close``."""

    name = "record_collector"

    def __init__(self) -> None:
        self.records: list[Record] = []

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        self.records.append(record)


# -- the proxy -----------------------------------------------------------------------------


@dataclass
class Proxy:
    """A running in-process proxy; ``url`` is what clients put in ``-x``."""

    server: ProxyServer
    resolver: StaticResolver
    records: RecordCollector

    @property
    def address(self) -> tuple[str, int]:
        return self.server.addresses[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=10)
        return sock


def start_proxy(tmp_path: Path, ini: str = "", plugins: Sequence[Any] = (),
                resolver: Optional[StaticResolver] = None) -> Proxy:
    """Start a proxy from ``ini`` (its ``[geproxy]`` section gets ``listen`` and
    ``access_log`` defaults for tests) with extra plugin objects."""
    text = ini if "[geproxy]" in ini else "[geproxy]\n" + ini
    head, sep, rest = text.partition("[geproxy]\n")
    defaults = ""
    if not re.search(r"^listen\s*=", rest, re.M):
        defaults += "listen = 127.0.0.1:0\n"
    if not re.search(r"^access_log\s*=", rest, re.M):
        defaults += "access_log = off\n"
    path = tmp_path / f"geproxy-{time.monotonic_ns()}.ini"
    path.write_text(head + sep + defaults + rest)
    resolver = resolver or StaticResolver()
    records = RecordCollector()
    server = create_server(str(path), objects=[resolver, records, *plugins],
                           entry_points=False)
    server.start()
    return Proxy(server, resolver, records)


def wait_for_records(proxy: Proxy, count: int, limit: float = 10.0) -> list[Record]:
    """The proxy's on_close records, once there are ``count`` of them (bounded wait)."""
    deadline = time.monotonic() + limit
    while len(proxy.records.records) < count and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(proxy.records.records) >= count, (
        f"{len(proxy.records.records)} records, expected {count}")
    return proxy.records.records


class ProxyProcess:
    """geproxy run as its users run it: ``python -m geproxy --config PATH``, in a process.

    The bound address is read from the "listening on" line it logs; the rest of its standard
    error is kept in ``log`` (bounded) while it runs.
    """

    def __init__(self, config_path: str, limit: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "geproxy", "--config", config_path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[str] = []
        self.address: Optional[tuple[str, int]] = None
        with gevent.Timeout(limit, AssertionError("geproxy did not start listening in time")):
            while self.address is None:
                line = self.process.stderr.readline().decode(errors="replace")  # type: ignore
                if not line:
                    raise AssertionError("geproxy exited: " + "".join(self.log[-20:]))
                self.log.append(line)
                found = re.search(r"listening on (\S+):(\d+)[;,]", line)
                if found:
                    self.address = (found.group(1).strip("[]"), int(found.group(2)))
        self._reader = gevent.spawn(self._drain)

    def _drain(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self.log.append(line.decode(errors="replace"))
            del self.log[:-1000]

    @property
    def url(self) -> str:
        assert self.address is not None
        return f"http://{self.address[0]}:{self.address[1]}"

    def status(self, field_name: str) -> int:
        """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise KeyError(field_name)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        self._reader.join(timeout=5)
        self._reader.kill()
        self.process.stderr.close()  # type: ignore[union-attr]
        return code


# -- origins -------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    remote_port: int
    body_len: int = 0


@dataclass
class Origin:
    """A real HTTP/1.1 origin (gevent.pywsgi), optionally over TLS.

    Paths: ``/`` hello; ``/echo`` the request as JSON; ``/bytes/N`` N pattern bytes with a
    Content-Length; ``/chunked/N`` the same, chunked; ``/sha256`` the body's length and
    digest; ``/status/N``; ``/sleep/SECONDS``. ``seen`` lists every request.
    """

    server: gevent.pywsgi.WSGIServer
    scheme: str = "http"
    seen: list[Seen] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.address[1]

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ["PATH_INFO"]
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        if environ.get("CONTENT_LENGTH"):
            headers["content-length"] = environ["CONTENT_LENGTH"]
        seen = Seen(environ["REQUEST_METHOD"], path, headers, int(environ["REMOTE_PORT"]))
        self.seen.append(seen)
        body_in = environ["wsgi.input"]
        digest = hashlib.sha256()
        while True:
            piece = body_in.read(65536)
            if not piece:
                break
            digest.update(piece)
            seen.body_len += len(piece)
        parts = path.strip("/").split("/")
        if parts[0] == "bytes" or parts[0] == "chunked":
            size = int(parts[1])
            fields = [("Content-Type", "application/octet-stream")]
            if parts[0] == "bytes":
                fields.append(("Content-Length", str(size)))
            start_response("200 OK", fields)
            return pattern(size)
        if parts[0] == "sha256":
            out = json.dumps({"length": seen.body_len, "sha256": digest.hexdigest()})
            return _reply(start_response, "200 OK", out.encode())
        if parts[0] == "echo":
            out = json.dumps({"method": seen.method, "path": path,
                              "query": environ.get("QUERY_STRING", ""), "headers": headers,
                              "body_length": seen.body_len, "sha256": digest.hexdigest()})
            return _reply(start_response, "200 OK", out.encode(), "application/json")
        if parts[0] == "status":
            return _reply(start_response, f"{int(parts[1])} Status", b"status\n")
        if parts[0] == "sleep":
            gevent.sleep(float(parts[1]))
            return _reply(start_response, "200 OK", b"slept\n")
        return _reply(start_response, "200 OK", b"hello\n")


def _reply(start_response: Callable[..., Any], status: str, body: bytes,
           ctype: str = "text/plain") -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def start_origin(ssl_context: Optional[ssl.SSLContext] = None) -> Origin:
    origin = Origin(server=None, scheme="https" if ssl_context else "http")  # type: ignore
    kwargs: dict[str, Any] = {"log": None, "error_log": None}
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context
    origin.server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), origin.app, **kwargs)
    origin.server.start()
    return origin


class RawOrigin:
    """A TCP server whose behaviour is a function of the accepted socket: for origins that
    misbehave in ways a real server library would not. ``accepted`` counts connections."""

    def __init__(self, handler: Callable[[socket.socket], None],
                 backlog: Optional[int] = None) -> None:
        self.accepted = 0
        self.received = b""

        def handle(sock: socket.socket, address: Any) -> None:
            self.accepted += 1
            try:
                handler(sock)
            except OSError:
                pass
            finally:
                sock.close()

        self.server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.address[1]

    def read_head(self, sock: socket.socket, limit: float = 10) -> bytes:
        """Read one request head from ``sock`` (for handlers); keeps what it read."""
        data = b""
        with gevent.Timeout(limit, False):
            while b"\r\n\r\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        self.received += data
        return data

    def stop(self) -> None:
        self.server.stop(timeout=1)


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
    """Spawned greenlets still alive (the hub and gevent's own thread-pool workers, which
    come and go with load, are not counted)."""
    import gc

    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, gevent.Greenlet) and not obj.dead
               and obj is not gevent.getcurrent())


def settle(baseline_fds: int, baseline_greenlets: int, limit: float = 5.0) -> tuple[int, int]:
    """Wait (bounded) for descriptors and greenlets to come back to the baseline."""
    deadline = time.monotonic() + limit
    fds, greenlets = open_fds(), live_greenlets()
    while (fds > baseline_fds or greenlets > baseline_greenlets) and (
            time.monotonic() < deadline):
        gevent.sleep(0.02)
        fds, greenlets = open_fds(), live_greenlets()
    return fds, greenlets


# -- pytest fixtures -----------------------------------------------------------------------


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fails the test if descriptors or greenlets are left behind once it tore down."""
    fds, greenlets = open_fds(), live_greenlets()
    yield
    after_fds, after_greenlets = settle(fds, greenlets)
    assert after_fds <= fds, f"descriptors leaked: {fds} before, {after_fds} after"
    assert after_greenlets <= greenlets, (
        f"greenlets leaked: {greenlets} before, {after_greenlets} after")


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """``proxy_factory(ini="", plugins=())`` starts a proxy; all are stopped at teardown."""
    started: list[Proxy] = []

    def factory(ini: str = "", plugins: Sequence[Any] = (),
                resolver: Optional[StaticResolver] = None) -> Proxy:
        proxy = start_proxy(tmp_path, ini, plugins, resolver)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.server.stop(timeout=2)


@pytest.fixture
def proxy(proxy_factory: Callable[..., Proxy]) -> Proxy:
    """A proxy with the default configuration; ``*.test`` names resolve to 127.0.0.1."""
    resolver = StaticResolver({"origin.test": ["127.0.0.1"], "localhost.test": ["127.0.0.1"]})
    return proxy_factory(resolver=resolver)


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[[str], ProxyProcess]]:
    """``proxy_process(ini)`` runs geproxy in its own process; stopped at teardown."""
    started: list[ProxyProcess] = []

    def factory(ini: str = "") -> ProxyProcess:
        path = tmp_path / f"process-{len(started)}.ini"
        text = ini if "[geproxy]" in ini else "[geproxy]\n" + ini
        if not re.search(r"^listen\s*=", text, re.M):
            text = text.replace("[geproxy]\n", "[geproxy]\nlisten = 127.0.0.1:0\n", 1)
        path.write_text(text)
        started.append(ProxyProcess(str(path)))
        return started[-1]

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = start_origin()
    yield server
    server.server.stop(timeout=1)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


@pytest.fixture(scope="session")
def tls_ca() -> Any:
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def tls_origin(tls_ca: Any) -> Iterator[Origin]:
    """An HTTPS origin whose certificate (from ``tls_ca``) names ``origin.test``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("origin.test", "127.0.0.1").configure_cert(context)
    server = start_origin(context)
    yield server
    server.server.stop(timeout=1)


@pytest.fixture
def raw_origin() -> Iterator[Callable[..., RawOrigin]]:
    """``raw_origin(handler)`` starts a RawOrigin; all are stopped at teardown."""
    started: list[RawOrigin] = []

    def factory(handler: Callable[[socket.socket], None]) -> RawOrigin:
        server = RawOrigin(handler)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def python_executable() -> str:
    return sys.executable
