"""The proxy server: listeners, the connection group, the upstream pool, graceful stop."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import Any, Optional, Sequence

import gevent
import gevent.event
import gevent.pool
from gevent.server import StreamServer

from . import http11
from .config import Config
from .connection import Connection
from .errors import TooManyConnections
from .models import Context, Request
from .plugins import Hooks, load, plugin_names
from .upstream import UpstreamPool

__all__ = ["ProxyServer", "create_server"]

log = logging.getLogger(__name__)

BACKLOG = 1024


class ProxyServer:
    """One proxy: its listeners, plugins, connections and upstream pool.

    ``start()`` binds and accepts; ``stop()`` closes the listeners, ends idle connections at
    once, lets busy ones finish for up to ``graceful_timeout`` and then kills the rest.
    """

    def __init__(self, config: Config, pm: Any) -> None:
        self.config = config
        self.pm = pm
        self.hooks = Hooks(pm)
        core = config.core
        self.via: str = "" if core["via"].lower() == "off" else core["via"]
        self.proxy_name = _sf_item(self.via or "geproxy")
        self.max_connections: int = core["max_connections"]
        self.pool = UpstreamPool(core["upstream_keepalive"], core["upstream_idle_timeout"])
        self.connections = gevent.pool.Group()
        #: Greenlets of connections waiting for a request: safe to end at once on stop.
        self.idle: set[gevent.Greenlet] = set()
        self.stopping = False
        self._stopped = gevent.event.Event()
        self.servers: list[StreamServer] = [
            StreamServer(address, self._handle, spawn=self.connections.spawn, backlog=BACKLOG)
            for address in core["listen"]
        ]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound addresses (port 0 in the config is resolved here after start)."""
        return [tuple(server.address[:2]) for server in self.servers]  # type: ignore[misc]

    def start(self) -> None:
        for server in self.servers:
            server.start()
        log.info("listening on %s; plugins: %s",
                 ", ".join(_fmt(a) for a in self.addresses), ", ".join(plugin_names(self.pm)))

    def serve_forever(self) -> None:
        self.start()
        self._stopped.wait()

    def _handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            conn = Connection(self, sock, address)
            if len(self.connections) > self.max_connections:
                self._refuse(conn)
                return
            conn.handle()
        except OSError as exc:  # the client went away before or while being served
            log.debug("connection from %s ended: %s", address[0], exc)
        except Exception:
            log.exception("connection from %s failed", address[0])
        finally:
            sock.close()

    def _refuse(self, conn: Connection) -> None:
        exc = TooManyConnections("max_connections reached")
        try:
            conn.sock.settimeout(1.0)
            conn.sock.sendall(http11.serialize_head(
                f"HTTP/1.1 {exc.status} {http11.reason_phrase(exc.status)}",
                list(conn.error_response(exc).headers) + [("Content-Length", "0"),
                                                          ("Connection", "close")]))
        except OSError:
            pass
        log.warning("refused %s: max_connections (%d) reached", conn.ctx.client_addr[0],
                    self.max_connections)

    def is_local(self, request: Request, ctx: Context) -> bool:
        """Whether ``request`` is addressed to this proxy rather than through it."""
        if not request.host:
            return True
        for host, port in self.addresses:
            if request.port != port:
                continue
            if request.host in (host, ctx.server_addr[0], "localhost"):
                return True
            try:
                target = ipaddress.ip_address(request.host)
            except ValueError:
                continue
            if target.is_loopback and (host in ("0.0.0.0", "::") or
                                       ipaddress.ip_address(host).is_loopback):
                return True
        return False

    def stop(self, timeout: Optional[float] = None) -> None:
        """Graceful stop: no new connections, drain for ``graceful_timeout``, then kill."""
        if self.stopping:
            return
        self.stopping = True
        if timeout is None:
            timeout = self.config.core["graceful_timeout"]
        for server in self.servers:
            server.close()
        busy = len(self.connections) - len(self.idle)
        log.info("stopping: %d connections busy, waiting up to %gs", busy, timeout)
        gevent.killall(list(self.idle), block=False)
        if not self.connections.join(timeout=timeout):
            log.warning("graceful_timeout over: closing %d connections", len(self.connections))
            self.connections.kill(timeout=5)
        self.pool.clear()
        self._stopped.set()
        log.info("stopped")


def _fmt(address: Sequence[Any]) -> str:
    host = address[0]
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def _sf_item(name: str) -> str:
    """The proxy's name as a Structured Field item for Proxy-Status (token or string)."""
    if re.fullmatch(r"[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def create_server(path: str, objects: Sequence[Any] = (),
                  entry_points: bool = True) -> ProxyServer:
    """Build a ProxyServer from the INI file at ``path`` (raises ConfigError)."""
    pm, config = load(path, objects=objects, entry_points=entry_points)
    return ProxyServer(config, pm)
