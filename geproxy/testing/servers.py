"""Real servers for tests, all on loopback port 0: the proxy in-process or as a process,
an HTTP(S) origin, and a raw TCP origin for misbehaviour."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import gevent
import gevent.server

from ..models import Record
from ..serve.server import ProxyServer, create_server
from .clients import stop_process
from .data import pattern
from .fakes import RecordCollector, StaticResolver

if TYPE_CHECKING:
    import ssl

    import gevent.pywsgi

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

    @property
    def tls_address(self) -> tuple[str, int]:
        """The first TLS listener's address (``listen = tls://127.0.0.1:0``)."""
        found = [address for address in self.server.addresses if address.tls]
        assert found, "this proxy has no tls:// listener"
        return (found[0][0], found[0][1])

    @property
    def tls_url(self) -> str:
        """What clients put in ``-x`` for the TLS listener: ``https://127.0.0.1:PORT``."""
        return f"https://{self.tls_address[0]}:{self.tls_address[1]}"

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=10)
        return sock

    def pool_problems(self) -> list[str]:
        """What is wrong with the upstream pool: counts that disagree, a connection pooled
        twice or already closed, a key over its bound. Empty when the pool is sound."""
        pool = self.server.pool
        idle = pool.idle()
        problems = []
        if len(idle) != len(pool):
            problems.append(f"the pool counts {len(pool)} but holds {len(idle)}")
        if len({id(sock) for _, sock in idle}) != len(idle):
            problems.append("a connection is pooled twice")
        problems += [f"{key}: a closed connection is pooled" for key, sock in idle
                     if sock.fileno() == -1]
        keys = [key for key, _ in idle]
        problems += [f"{key}: {keys.count(key)} pooled, over upstream_keepalive"
                     for key in set(keys) if keys.count(key) > pool.per_key]
        return problems


#: Sections a test proxy gets unless its ini has them: the loopback origins of the tests
#: listen on any port, and the built-in policy would refuse tunnels to most of them.
TEST_SECTIONS = {
    "acl": "connect_ports = 1-65535\n",
    "destinations": "allow = 127.0.0.0/8 ::1\n",
}


def kit_ini(ini: str = "", access_log: str = "off") -> str:
    """A test configuration from ``ini``: ``[geproxy]`` gets ``listen = 127.0.0.1:0`` and
    ``access_log`` unless given, and the sections of TEST_SECTIONS are added unless the
    test wrote its own (a test of a policy writes the policy it tests)."""
    text = ini if "[geproxy]" in ini else "[geproxy]\n" + ini
    head, sep, rest = text.partition("[geproxy]\n")
    defaults = ""
    if not re.search(r"^listen\s*=", rest, re.M):
        defaults += "listen = 127.0.0.1:0\n"
    if not re.search(r"^access_log\s*=", rest, re.M):
        defaults += f"access_log = {access_log}\n"
    text = head + sep + defaults + rest
    for section, body in TEST_SECTIONS.items():
        if not re.search(rf"^\[{section}\]", text, re.M):
            text += f"\n[{section}]\n{body}"
    return text


def start_proxy(tmp_path: Path, ini: str = "", plugins: Sequence[Any] = (),
                resolver: Optional[StaticResolver] = None,
                detach_after: Optional[float] = None) -> Proxy:
    """Start a proxy from ``kit_ini(ini)`` with extra plugin objects. ``detach_after``: the
    seconds a tunnel relays before its greenlet lets go (the server's default if None)."""
    path = tmp_path / f"geproxy-{time.monotonic_ns()}.ini"
    path.write_text(kit_ini(ini))
    resolver = resolver or StaticResolver()
    records = RecordCollector()
    server = create_server(str(path), objects=[resolver, records, *plugins],
                           entry_points=False)
    if detach_after is not None:
        server.detach_after = detach_after
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


def wait_for_lines(path: Any, count: int, limit: float = 10.0) -> list[str]:
    """The lines of the file ``path`` (an access log), once there are ``count`` of them
    (bounded wait: a log's lines are written after the records)."""
    deadline = time.monotonic() + limit
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        if len(lines) >= count:
            return lines
        gevent.sleep(0.01)
    raise AssertionError(f"{path}: {len(lines)} lines, expected {count}")


class LogLines(list[str]):
    """The lines a process wrote to its standard error, oldest first, each with its newline
    (a list: ``log[-5:]``, ``log.index(...)``). ``"text" in log`` asks whether any line
    contains ``text``, so that ``"..." not in log`` means it was not logged (a list would
    compare whole lines, and such a check would pass whatever was logged); ``log.text`` is
    the lines as one string."""

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return any(item in line for line in self)
        return super().__contains__(item)

    @property
    def text(self) -> str:
        return "".join(self)


class ProxyProcess:
    """geproxy run as its users run it: ``python -m geproxy --config PATH``, in a process.

    The bound address is read from the "listening on" line it logs, with the names of the
    plugins it loaded (``plugins``, in registration order); its standard error is kept in
    ``log`` (LogLines, the last LOG_LINES lines) while it runs.
    """

    #: How many lines of its standard error ``log`` keeps.
    LOG_LINES = 1000

    def __init__(self, config_path: str, limit: float = 20.0) -> None:
        #: The file it runs: a test rewrites it before a SIGHUP, or hands it to explain.
        self.config_path = config_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "geproxy", "--config", config_path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log = LogLines()
        self.address: Optional[tuple[str, int]] = None
        #: The first tls:// listener's address, if there is one.
        self.tls_address: Optional[tuple[str, int]] = None
        #: The plugins it registered, as its "listening on" line names them.
        self.plugins: list[str] = []
        with gevent.Timeout(limit, AssertionError("geproxy did not start listening in time")):
            while self.address is None:
                line = self.process.stderr.readline().decode(errors="replace")  # type: ignore
                if not line:
                    raise AssertionError("geproxy exited: " + "".join(self.log[-20:]))
                self.log.append(line)
                found = re.search(r"listening on (\S+):(\d+)[;,]", line)
                if found:
                    self.address = (found.group(1).strip("[]"), int(found.group(2)))
                    tls = re.search(r"tls://(\S+):(\d+)[;,]", line)
                    if tls:
                        self.tls_address = (tls.group(1).strip("[]"), int(tls.group(2)))
                    names = re.search(r"; plugins: (.*)$", line.rstrip("\n"))
                    self.plugins = names.group(1).split(", ") if names else []
        self._reader = gevent.spawn(self._drain)

    def _drain(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self.log.append(line.decode(errors="replace"))
            del self.log[:-self.LOG_LINES]

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
        code = stop_process(self.process, timeout)
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
    digest; ``/status/N`` (no body for 204 and 304); ``/sleep/SECONDS``. ``seen`` lists
    every request.
    """

    server: "gevent.pywsgi.WSGIServer"
    scheme: str = "http"
    seen: list[Seen] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.address[1]

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        body = self._answer(environ, start_response)
        if environ["REQUEST_METHOD"] == "HEAD":
            return []  # the head only, as HTTP says (gevent.pywsgi would send the body)
        return body

    def _answer(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
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
            code = int(parts[1])
            if code in (204, 304):  # answers that have no body, nor a Content-Length
                start_response(f"{code} Status", [("Content-Type", "text/plain")])
                return []
            return _reply(start_response, f"{code} Status", b"status\n")
        if parts[0] == "sleep":
            gevent.sleep(float(parts[1]))
            return _reply(start_response, "200 OK", b"slept\n")
        return _reply(start_response, "200 OK", b"hello\n")


def _reply(start_response: Callable[..., Any], status: str, body: bytes,
           ctype: str = "text/plain") -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def start_origin(ssl_context: "Optional[ssl.SSLContext]" = None) -> Origin:
    import gevent.pywsgi  # imports ssl: not before the test's monkey-patching

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

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
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
