"""The proxy server: listeners, the connection group, the upstream pool, graceful stop."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from typing import Any, Callable, Optional, Sequence

import gevent
import gevent.event
import gevent.pool

from ..config import Config, ListenAddress
from ..errors import ConfigError
from ..models import Context, Request
from ..net.upstream import UpstreamPool
from ..policy.plugins import exposition, load, plugin_names
from ..relay.tunnel import DETACH_AFTER
from .accept import serve_connection
from .client import ClientConnection
from .generation import Generation, unconfigure
from .handlers import Handlers
from .http1 import refuse_over_limit
from .listeners import Listener, describe_address, is_wildcard, listening_socket
from .local import addressed_to_proxy, admin_app, check_local_options, local_app, names_proxy
from .reloading import (
    observe_reload,
    recheck_tunnels,
    reload_failure,
    restart_only_changes,
)
from .stats import combine_stats, in_flight, process_figures, report_progress

__all__ = ["ProxyServer", "create_server"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.server")

#: Seconds between two ``on_progress`` calls for a request or tunnel that moves bytes.
PROGRESS_INTERVAL = 1.0


class ProxyServer:
    """One proxy: its listeners, plugins, connections and upstream pool.

    ``start()`` binds and accepts; ``stop()`` closes the listeners, ends idle connections at
    once, lets busy ones finish for up to ``graceful_timeout`` and then kills the rest.
    The admin listener (``admin_listen``) stays open until the end, so that ``/readyz``
    answers 503 while the connections drain.
    """

    def __init__(self, config: Config, pm: Any, objects: Sequence[Any] = (),
                 entry_points: bool = True, detach_after: float = DETACH_AFTER) -> None:
        #: The configuration and plugins new connections get; a reload replaces it.
        self.gen = Generation(config, pm)
        #: Seconds a tunnel relays with its greenlet waiting before it lets that greenlet
        #: go: a short exchange ends without the cost of a second greenlet for its end; a
        #: long-lived one stops holding a greenlet's stacks.
        self.detach_after = detach_after
        #: What a reload loads the plugins with, besides the file.
        self._objects, self._entry_points = tuple(objects), entry_points
        core = config.core
        self.pool = UpstreamPool(core["upstream_keepalive"], core["upstream_idle_timeout"])
        try:
            check_local_options(config)
        except ConfigError as exc:  # found after the load: placed at its line here
            raise config.locate(exc) from None
        #: The proxy port's answers to requests for the proxy itself.
        self.local_app = local_app(self, core["local_paths"])
        self.connections = gevent.pool.Group()
        #: What the listeners spawn a connection's greenlet with: one parked by a
        #: connection that ended, when there is one (handlers.py).
        self.handlers = Handlers(self.connections)
        #: Greenlets of connections waiting for a request: safe to end at once on stop.
        self.waiting: set[gevent.Greenlet] = set()
        self.stopping = False
        self._stopped = gevent.event.Event()
        self.servers: list[Listener] = []
        #: Requests and tunnels in flight, by conn id (for /tunnels): Transactions.
        self.active: dict[str, Any] = {}
        #: HTTP/1.1 connections whose tunnel relays with no greenlet
        #: (``Transaction._tunnel``): counted with ``connections``, ended by a stop too.
        self.detached: set[ClientConnection] = set()
        self.admin: Optional[Any] = None  # a gevent.pywsgi.WSGIServer once started
        #: This process's number among a master's workers; None when it runs alone.
        self.worker: Optional[int] = None
        #: What a worker's connection ids start with (``w1``): unique across workers.
        self.conn_prefix: str = ""
        self._conn_numbers = itertools.count(1)
        #: A worker's way to its master (workers.py), which answers what only it knows:
        #: the metrics of every worker. None when this process runs alone.
        self.coordinator: Optional[Any] = None
        #: Ticks every PROGRESS_INTERVAL while the server runs (``_progress_due``).
        self._progress_timer: Optional[Any] = None
        #: The greenlet judging open tunnels after a reload (``reload_tunnels = recheck``).
        self.rechecking: Optional[gevent.Greenlet] = None
        self._reporting = False

    # The current generation's view, for whoever has no connection to ask.
    config = property(lambda self: self.gen.config)
    pm = property(lambda self: self.gen.pm)
    hooks = property(lambda self: self.gen.hooks)
    via = property(lambda self: self.gen.via)
    proxy_name = property(lambda self: self.gen.proxy_name)

    @property
    def addresses(self) -> list[ListenAddress]:
        """The bound addresses (port 0 in the config is resolved here after start), each
        with its ``tls`` flag."""
        return [ListenAddress(server.address[0], server.address[1],
                              server.tls)  # type: ignore[attr-defined]
                for server in self.servers]

    @property
    def admin_address(self) -> Optional[tuple[str, int]]:
        """The admin listener's bound address; None when there is none."""
        if self.admin is None:
            return None
        return tuple(self.admin.address[:2])  # type: ignore[return-value]

    def start(self, listeners: Optional[Sequence[tuple[socket.socket, ListenAddress]]] = None,
              admin: bool = True) -> None:
        """Bind every listen address (and the admin one) and accept; raises OSError if one
        cannot be bound. A worker is given the listening sockets its master bound
        (``listeners``, each with its address) and no admin listener (``admin``): its
        master runs that one."""
        given = list(listeners) if listeners is not None else None
        try:
            for address in (self.config.core["listen"] if given is None
                            else [address for _, address in given]):
                host, port = address
                tls = getattr(address, "tls", False)
                listener = (listening_socket(host, port) if given is None
                            else given[len(self.servers)][0])
                bound = listener.getsockname()[:2]
                # A wildcard listener learns each connection's local address from the
                # kernel; a specific one knows it already.
                local = None if is_wildcard(host) else bound
                server = Listener(listener, self._handler(local, tls),
                                  spawn=self.handlers.spawn)
                server.tls = tls
                self.servers.append(server)
                server.start()
            if admin and self.config.core["admin_listen"] is not None:
                self._start_admin(*self.config.core["admin_listen"])
        except OSError:
            self.close_listeners()
            self._stop_admin()
            raise
        self._progress_timer = gevent.get_hub().loop.timer(PROGRESS_INTERVAL,
                                                           PROGRESS_INTERVAL)
        self._progress_timer.start(self._progress_due)
        log.info("listening on %s; plugins: %s",
                 ", ".join(describe_address(a) for a in self.addresses),
                 ", ".join(plugin_names(self.pm)))
        if self.admin_address is not None:
            log.info("admin listener on %s", describe_address(self.admin_address))

    def _start_admin(self, host: str, port: int) -> None:
        import gevent.pywsgi  # imports ssl: not at module import, before monkey-patching

        listener = listening_socket(host, port)
        self.admin = gevent.pywsgi.WSGIServer(
            listener, admin_app(self), log=None,
            error_log=logging.getLogger("geproxy.admin"))
        self.admin.start()

    def _stop_admin(self) -> None:
        if self.admin is not None:
            self.admin.stop(timeout=1)

    # -- what the admin listener shows and does ------------------------------------------

    def tunnels(self) -> list[dict[str, Any]]:
        """The requests and tunnels in flight, for ``/tunnels``."""
        return in_flight(self)

    def process_stats(self) -> dict[str, Any]:
        """What this process holds, for ``/debug/stats`` (stats.process_figures)."""
        return process_figures(self)

    def close_connection(self, conn_id: str) -> bool:
        """Close the connection ``conn_id`` (POST /tunnels/ID/close); False if unknown."""
        conn = self.active.get(conn_id)
        if conn is None:
            return False
        log.info("closing connection %s on request of the admin listener", conn_id)
        conn.close("admin")
        return True

    def stats(self) -> dict[str, Any]:
        """``/debug/stats`` of a process that runs alone: its figures, in the shape a master
        gives for its workers (combine_stats)."""
        return combine_stats([self.process_stats()], pid=os.getpid(),
                             generation=self.gen.number, stopping=self.stopping)

    def metrics_exposition(self) -> Optional[tuple[bytes, str]]:
        """The text and content type of the ``metrics`` plugin's ``exposition()``, or None
        when it is not loaded. A worker asks its master, which sees every worker."""
        if self.coordinator is not None:
            return self.coordinator.metrics_exposition()  # type: ignore[no-any-return]
        return exposition(self.pm, {0: os.getpid()})

    def serve_forever(self, **start: Any) -> None:
        self.start(**start)
        self.wait()

    def wait(self) -> None:
        """Until a stop has ended."""
        self._stopped.wait()

    def next_conn_id(self) -> str:
        """A new connection id, unique among this server's: ``c42``, and in a worker,
        whose server has ``conn_prefix`` ``w1``, ``w1c42``, so that ids are unique across
        the workers of a master. Each server counts from 1."""
        return f"{self.conn_prefix}c{next(self._conn_numbers)}"

    def _handler(self, local: Optional[tuple[str, int]], tls: bool) -> Any:
        def handle(sock: socket.socket, address: tuple[str, int]) -> None:
            self._handle(sock, address, local, tls)

        return handle

    def _progress_due(self) -> None:
        # In the hub: plugins run in a greenlet, spawned only when anything is in flight.
        self.handlers.trim()
        if self.active and not self._reporting:
            self._reporting = True
            gevent.spawn(self._report_progress)

    def _report_progress(self) -> None:
        try:
            report_progress(self.active)
        finally:
            self._reporting = False

    def close_listeners(self) -> None:
        """Close the proxy listeners (the admin one stays open until the end of a stop)."""
        for server in self.servers:
            server.close()

    def _handle(self, sock: socket.socket, address: tuple[str, int],
                local: Optional[tuple[str, int]], tls: bool = False) -> None:
        gen = self.gen
        gen.users += 1
        conn: Optional[ClientConnection] = None
        try:
            conn = ClientConnection(self, gen, sock, address, local or sock.getsockname()[:2],
                                    tls)
            if self.open_connections() > gen.config.core["max_connections"]:
                refuse_over_limit(conn)
                log.warning("refused %s: max_connections (%d) reached",
                            conn.ctx.client_addr[0], gen.config.core["max_connections"])
                return
            if gen.proxy_protocol != "off" and not conn.read_proxy_header():
                return
            serve_connection(conn)
        except OSError as exc:  # the client went away before or while being served
            log.debug("connection from %s ended: %s", address[0], exc)
        except Exception:
            log.exception("connection from %s failed", address[0])
        finally:
            if conn is None or conn.detached is None:
                (sock if conn is None else conn.sock).close()  # a TLS one says close_notify
                self.release(gen)

    def _drained(self, timeout: float) -> bool:
        """Wait (bounded) until no connection is open, detached ones included."""
        deadline = time.monotonic() + timeout
        while self.open_connections() and time.monotonic() < deadline:
            gevent.sleep(0.01)
        return not self.open_connections()

    def open_connections(self) -> int:
        """Client connections open: served by a greenlet, or tunnels relaying on their own."""
        return len(self.connections) + len(self.detached)

    def detach(self, conn: ClientConnection) -> Callable[..., gevent.Greenlet]:
        """``conn``'s tunnel goes on without its greenlet (the caller, about to end): its
        socket and generation stay, and it is counted once, as detached. Returns what
        spawns its end, among the connections (a stop waits for it)."""
        self.detached.add(conn)
        self.connections.discard(gevent.getcurrent())
        return self.connections.spawn

    def track(self, transaction: Any) -> None:
        """A request or tunnel is in flight: /tunnels lists it, a reload may recheck it."""
        self.active[transaction.ctx.conn_id] = transaction

    def untrack(self, transaction: Any) -> None:
        self.active.pop(transaction.ctx.conn_id, None)

    def release_detached(self, conn: ClientConnection) -> None:
        """The end of a connection whose tunnel relayed detached: what ``_handle`` does at
        the end of the others."""
        self.detached.discard(conn)
        conn.sock.close()
        self.release(conn.gen)

    def is_local(self, request: Request, ctx: Context) -> bool:
        """Whether ``request`` is addressed to this proxy rather than through it."""
        return addressed_to_proxy(request, self.addresses, ctx.server_addr[0])

    def names_proxy(self, host: str, port: int, ctx: Context) -> bool:
        """Whether ``host:port`` names this proxy (an HTTP/2 request's :authority)."""
        return names_proxy(host, port, self.addresses, ctx.server_addr[0])

    def reload(self) -> bool:
        """SIGHUP to a process that runs alone: read the configuration file and plugins
        again. The new ones are built and validated first (``prepare``); if that fails, the
        error is logged and the running ones stay. Otherwise they are put in force
        (``install``). Returns whether they were. A master reloads its workers itself
        (workers.py), with the same two steps in each."""
        try:
            new = self.prepare()
        except Exception as exc:
            self.refused(reload_failure(exc))
            return False
        if new.config.core["workers"] != 1:
            new.unconfigure()
            self.refused(f"[geproxy] workers = {new.config.core['workers']} needs a restart: "
                         "this process runs without a master (workers = 1 when it started)")
            return False
        for line in restart_only_changes(self.config, new.config):
            log.warning("reload: %s", line)
        self.install(new)
        observe_reload(new, None)
        return True

    def refused(self, reason: str) -> None:
        """A reload that was not put in force: said once, and told to the plugins."""
        log.error("reload refused, the running configuration stays: %s", reason)
        observe_reload(self.gen, reason)

    def prepare(self, text: Optional[str] = None) -> "Generation":
        """The configuration loaded again (from ``text`` when given: the file as a master
        read it) with fresh plugins, configured but not in force. Raises ConfigError, or
        whatever a plugin raised."""
        pm, config = load(self.config.path, objects=self._objects,
                          entry_points=self._entry_points, text=text,
                          stash=self.config.stash)
        try:
            return Generation(config, pm, self.gen.number + 1)
        except BaseException:
            unconfigure(pm, config)
            raise

    def install(self, new: "Generation") -> None:
        """Put ``new`` (from ``prepare``) in force: every connection accepted from now on is
        served with it. The one it replaces is released when its last connection ends."""
        old, self.gen = self.gen, new
        old.retired = True
        self.release(old, 0)
        log.info("reloaded %s; plugins: %s", new.config.path, ", ".join(plugin_names(new.pm)))
        if new.config.core["reload_tunnels"] == "recheck":
            self.rechecking = gevent.spawn(recheck_tunnels, self, new)

    def release(self, gen: "Generation", users: int = 1) -> None:
        """A connection of ``gen`` ended; a retired generation with none left is
        unconfigured (its files closed)."""
        gen.users -= users
        if gen.retired and gen.users <= 0 and not gen.released:
            gen.unconfigure()

    def reopen_logs(self) -> None:
        """SIGUSR1: every plugin reopens its log files."""
        log.info("reopening log files")
        self.hooks.reopen_logs()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Graceful stop: no new connections, drain for ``graceful_timeout``, then kill."""
        if self.stopping:
            return
        self.stopping = True
        self.handlers.close()
        if timeout is None:
            timeout = self.config.core["graceful_timeout"]
        self.close_listeners()
        busy = self.open_connections() - len(self.waiting)
        log.info("stopping: %d connections busy, waiting up to %gs", busy, timeout)
        gevent.killall(list(self.waiting), block=False)
        if not self._drained(timeout):
            log.warning("graceful_timeout over: closing %d connections",
                        self.open_connections())
            for conn in list(self.detached):
                if conn.detached is not None:  # their ends, which write records, are spawned
                    conn.detached.close("shutdown")
            self.connections.kill(timeout=5)
            self._drained(5)
        self.pool.clear()
        if self._progress_timer is not None:
            self._progress_timer.close()
        self.gen.unconfigure()
        self._stop_admin()
        self._stopped.set()
        log.info("stopped")


def create_server(path: str, objects: Sequence[Any] = (), entry_points: bool = True,
                  text: Optional[str] = None, detach_after: float = DETACH_AFTER
                  ) -> ProxyServer:
    """Build a ProxyServer from the INI file at ``path``, or from ``text`` read from it
    (raises ConfigError)."""
    pm, config = load(path, objects=objects, entry_points=entry_points, text=text)
    return ProxyServer(config, pm, objects, entry_points, detach_after=detach_after)
