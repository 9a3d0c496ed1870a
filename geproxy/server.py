"""The proxy server: listeners, the connection group, the upstream pool, graceful stop."""

from __future__ import annotations

import gc
import itertools
import logging
import os
import socket
import time
from typing import Any, Optional, Sequence

import gevent
import gevent.event
import gevent.pool
from gevent.server import StreamServer

from .config import Config, ListenAddress
from .connection import Connection
from .errors import ConfigError, ProxyError, TooManyConnections, proxy_name
from .hosts import authority
from .local import PROXY_PORT_PATHS, addressed_to_proxy, admin_app, local_app
from .models import Context, Record, Request
from .plugins import Hooks, exposition, load, plugin_names
from .upstream import UpstreamPool

__all__ = ["ProxyServer", "create_server"]

log = logging.getLogger(__name__)

BACKLOG = 1024
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
                 entry_points: bool = True) -> None:
        #: The configuration and plugins new connections get; a reload replaces it.
        self.gen = Generation(config, pm)
        #: What a reload loads the plugins with, besides the file.
        self._objects, self._entry_points = tuple(objects), entry_points
        core = config.core
        self.pool = UpstreamPool(core["upstream_keepalive"], core["upstream_idle_timeout"])
        for path in core["local_paths"]:
            if path not in PROXY_PORT_PATHS:
                raise ConfigError(f"not a page the proxy port can serve: {path!r} (use "
                                  f"{' '.join(PROXY_PORT_PATHS)})", path=config.path,
                                  section="geproxy", key="local_paths")
        if core["docroot"] and not os.path.isdir(core["docroot"]):
            raise ConfigError(f"not a directory: {core['docroot']}", path=config.path,
                              section="geproxy", key="docroot")
        #: The proxy port's answers to requests for the proxy itself.
        self.local_app = local_app(self, core["local_paths"])
        self.connections = gevent.pool.Group()
        #: Greenlets of connections waiting for a request: safe to end at once on stop.
        self.idle: set[gevent.Greenlet] = set()
        self.stopping = False
        self._stopped = gevent.event.Event()
        self.servers: list[StreamServer] = []
        #: Connections with a request or tunnel in flight, by conn id (for /tunnels).
        self.active: dict[str, Connection] = {}
        #: Connections whose tunnel relays with no greenlet (Connection._tunnel): counted
        #: with ``connections``, ended by a stop like them.
        self.detached: set[Connection] = set()
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
                listener = (_listener(host, port) if given is None
                            else given[len(self.servers)][0])
                bound = listener.getsockname()[:2]
                # A wildcard listener learns each connection's local address from the
                # kernel; a specific one knows it already.
                local = None if _is_wildcard(host) else bound
                server = _Listener(listener, self._handler(local, tls),
                                   spawn=self.connections.spawn)
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
                 ", ".join(_fmt(a) for a in self.addresses), ", ".join(plugin_names(self.pm)))
        if self.admin_address is not None:
            log.info("admin listener on %s", _fmt(self.admin_address))

    def _start_admin(self, host: str, port: int) -> None:
        import gevent.pywsgi  # imports ssl: not at module import, before monkey-patching

        listener = _listener(host, port)
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
        now = time.time()
        out = []
        for conn_id, conn in list(self.active.items()):
            record = conn.record
            if record is None:
                continue
            ctx = conn.ctx
            out.append({
                "id": conn_id,
                "worker": self.worker or 0,
                "client": _fmt(ctx.client_addr),
                "user": ctx.user,
                "method": record.method,
                "target": record.target,
                "age": round(now - record.started, 3),
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
            })
        return out

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

    def process_stats(self) -> dict[str, Any]:
        """What this process holds: a soak test or an operator watching for leaks reads it
        from outside. Counting greenlets walks the heap (gc): cheap enough for an admin page,
        not for a hot path. Readings from /proc are None without it."""
        tunnels = detached = 0
        for conn in list(self.active.values()):
            if conn.record is not None and conn.record.method == "CONNECT":
                tunnels += 1
                detached += conn.detached is not None
        return {
            "worker": self.worker or 0,
            "pid": os.getpid(),
            "rss_kib": _proc_status_kib("VmRSS"),
            "open_fds": _count_entries("/proc/self/fd"),
            "greenlets": _live_greenlets(),
            "threads": _count_entries("/proc/self/task"),
            "connections": self.open_connections(),
            "idle_connections": len(self.idle),
            "in_flight": len(self.active),
            "tunnels": tunnels,
            "detached_tunnels": detached,
            "upstream_pool": len(self.pool),
            "generation": self.gen.number,
            "stopping": self.stopping,
        }

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
        if self.active and not self._reporting:
            self._reporting = True
            gevent.spawn(self._report_progress)

    def _report_progress(self) -> None:
        """``on_progress`` for each request and tunnel in flight that moved bytes."""
        try:
            for conn in list(self.active.values()):
                record = conn.record
                if record is not None:
                    conn.progress(record)
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
        conn: Optional[Connection] = None
        try:
            conn = Connection(self, gen, sock, address, local or sock.getsockname()[:2], tls)
            if self.open_connections() > gen.config.core["max_connections"]:
                self._refuse(conn)
                return
            conn.handle()
        except OSError as exc:  # the client went away before or while being served
            log.debug("connection from %s ended: %s", address[0], exc)
        except Exception:
            log.exception("connection from %s failed", address[0])
        finally:
            if conn is None or conn.detached is None:
                (sock if conn is None else conn.sock).close()  # a TLS one says close_notify
                if conn is not None:
                    conn.let_go()
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

    def detach(self, conn: Connection) -> None:
        """``conn``'s tunnel goes on without its greenlet (the caller, about to end): its
        socket and generation stay, and it is counted once, as detached."""
        self.detached.add(conn)
        self.connections.discard(gevent.getcurrent())

    def attach(self, conn: Connection) -> None:
        """The end of a detached connection: what ``_handle`` does for the others."""
        self.detached.discard(conn)
        conn.sock.close()
        conn.let_go()
        self.release(conn.conn_gen)

    def _refuse(self, conn: Connection) -> None:
        # A 503 in clear on a TLS port would read as garbage to a TLS client, and a
        # handshake only to refuse costs what the limit is there to spare: close at once.
        if not conn.tls:
            exc = TooManyConnections("max_connections reached")
            conn.sock.settimeout(1.0)
            try:
                conn.answer(conn.error_response(exc), Record(conn.ctx), close=True)
            except ProxyError:
                pass
        log.warning("refused %s: max_connections (%d) reached", conn.ctx.client_addr[0],
                    self.config.core["max_connections"])

    def is_local(self, request: Request, ctx: Context) -> bool:
        """Whether ``request`` is addressed to this proxy rather than through it."""
        return addressed_to_proxy(request, self.addresses, ctx.server_addr[0])

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
            _unconfigure(pm, config)
            raise

    def install(self, new: "Generation") -> None:
        """Put ``new`` (from ``prepare``) in force: every connection accepted from now on is
        served with it. The one it replaces is released when its last connection ends."""
        old, self.gen = self.gen, new
        old.retired = True
        self.release(old, 0)
        log.info("reloaded %s; plugins: %s", new.config.path, ", ".join(plugin_names(new.pm)))
        if new.config.core["reload_tunnels"] == "recheck":
            self.rechecking = gevent.spawn(self._recheck_tunnels, new)

    def _recheck_tunnels(self, gen: "Generation") -> None:
        """``reload_tunnels = recheck``: every open tunnel judged again by ``gen``; those it
        would refuse now are closed (close reason ``reload``)."""
        closed = checked = 0
        for conn in list(self.active.values()):
            if self.gen is not gen:
                return  # a later reload rechecks them instead
            record = conn.record
            if (record is None or record.method != "CONNECT" or record.status != 200
                    or conn.gen is gen):
                continue  # not an established tunnel, or one the new policy let in
            checked += 1
            verdict = conn.recheck(gen, record)
            if verdict is not None and conn.record is record:
                conn.log.info("tunnel to %s closed by the reload: %s", record.target,
                              verdict)
                conn.close("reload")
                closed += 1
        log.info("reload: %d open tunnels rechecked, %d closed", checked, closed)

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
        if timeout is None:
            timeout = self.config.core["graceful_timeout"]
        self.close_listeners()
        busy = self.open_connections() - len(self.idle)
        log.info("stopping: %d connections busy, waiting up to %gs", busy, timeout)
        gevent.killall(list(self.idle), block=False)
        if not self._drained(timeout):
            log.warning("graceful_timeout over: closing %d connections",
                        self.open_connections())
            for conn in list(self.detached):
                conn.close("shutdown")  # their ends, which write their records, are spawned
            self.connections.kill(timeout=5)
            self._drained(5)
        self.pool.clear()
        if self._progress_timer is not None:
            self._progress_timer.close()
        self.gen.unconfigure()
        self._stop_admin()
        self._stopped.set()
        log.info("stopped")


class _Listener(StreamServer):
    """A StreamServer that leaves closing the client socket to ``ProxyServer._handle``:
    a connection whose tunnel relays on its own outlives its handler."""

    #: Whether its connections speak TLS (``tls://`` in ``listen``).
    tls = False

    def do_close(self, *args: Any) -> None:
        """Nothing: the socket is not gevent's to close.

        gevent calls this with the client's socket as soon as the handler's greenlet
        returns (StreamServer's own closes the socket there). A tunnel past DETACH_AFTER
        goes on relaying in the hub after that greenlet returned (``detach``), on this
        very socket, so the socket is closed by whoever ends the connection:
        ``ProxyServer._handle`` when the handler returns with nothing detached,
        ``ProxyServer.attach`` when a detached tunnel ends. Without this override every
        detached tunnel is cut at once (the ``detached`` runs of tests/test_connect.py
        fail). gevent also calls it when spawning the handler raises, which the spawn
        given here (``connections.spawn``: an unbounded Group's; ``max_connections`` is
        enforced by ``_handle``) does not do."""


class Generation:
    """One loaded configuration with its plugins: what a connection is served with from
    its start to its end, whatever reloads happen meanwhile."""

    def __init__(self, config: Config, pm: Any, number: int = 1) -> None:
        self.config = config
        self.pm = pm
        #: 1 for the configuration loaded at start, one more at each successful reload.
        self.number = number
        self.hooks = Hooks(pm)
        core = config.core
        self.via: str = "" if core["via"].lower() == "off" else core["via"]
        self.proxy_name = proxy_name(self.via)
        #: The TLS listeners' context, read from the files at each load (None with no
        #: TLS listener): a reload picks up a renewed certificate.
        self.tls_context: Any = None
        if any(getattr(address, "tls", False) for address in core["listen"]):
            from .tls import server_context  # imports ssl: only when TLS is configured

            self.tls_context = server_context(config["tls"], config.path,
                                              config["tls"]["http2"])
        self.proxy_protocol: str = core["proxy_protocol"]
        self.proxy_protocol_from = core["proxy_protocol_from"]
        if self.proxy_protocol != "off" and not self.proxy_protocol_from:
            raise ConfigError("proxy_protocol needs the balancers' addresses in "
                              "proxy_protocol_from", path=config.path, section="geproxy",
                              key="proxy_protocol_from")
        #: Connections served with it; replaced by a reload, it is released at zero.
        self.users = 0
        self.retired = False
        self.released = False

    def unconfigure(self) -> None:
        if self.released:
            return
        self.released = True
        _unconfigure(self.pm, self.config)


def _unconfigure(pm: Any, config: Config) -> None:
    try:
        pm.hook.unconfigure(config=config)
    except Exception:
        log.exception("a plugin failed to release its resources")


#: ``[geproxy]`` options a reload cannot change: they shape the listeners and the pool.
RESTART_ONLY = ("listen", "admin_listen", "upstream_keepalive", "upstream_idle_timeout")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """What a reload from ``old`` to ``new`` changes that only a restart applies."""
    return [f"[geproxy] {key} changes only on restart" for key in RESTART_ONLY
            if new.core[key] != old.core[key]]


def reload_failure(exc: BaseException) -> str:
    """What refused a reload, in one line; a plugin's bug gets its traceback logged too."""
    if isinstance(exc, ConfigError):
        return str(exc)
    log.error("loading the configuration failed", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def observe_reload(gen: "Generation", error: Optional[str]) -> None:
    """``on_reload`` of every plugin of ``gen``; errors are logged, never raised."""
    gen.hooks.on_reload(gen.config, error)


#: The figures of /debug/stats that add up over workers.
SUMMED = ("rss_kib", "open_fds", "greenlets", "threads", "connections", "idle_connections",
          "in_flight", "tunnels", "detached_tunnels", "upstream_pool")


def combine_stats(workers: Sequence[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """``/debug/stats``: the sum of each figure over ``workers`` (None when no worker could
    read it), the answering process's ``top`` fields (pid, generation, stopping), and each
    worker's own figures under ``workers``. One process alone answers the same shape, with
    itself as its one worker."""
    out: dict[str, Any] = dict(top)
    for name in SUMMED:
        read = [figures[name] for figures in workers if figures.get(name) is not None]
        out[name] = sum(read) if read else None
    out["workers"] = sorted(workers, key=lambda figures: figures["worker"])
    return out


def _proc_status_kib(name: str) -> Optional[int]:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            lines = handle.readlines()
    except OSError:
        return None
    found = [line.split()[1] for line in lines if line.startswith(name + ":")]
    return int(found[0]) if found else None


def _count_entries(directory: str) -> Optional[int]:
    """How many descriptors (/proc/self/fd) or OS threads (/proc/self/task); None without
    /proc."""
    try:
        return len(os.listdir(directory))
    except OSError:
        return None


def _live_greenlets() -> int:
    """Spawned greenlets still alive: connections, relays, the pool's sweeper ... The hub
    and the greenlet asking (the admin request's own) are not counted."""
    current = gevent.getcurrent()
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, gevent.Greenlet) and not obj.dead and obj is not current)


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _listener(host: str, port: int, reuse_port: bool = False,
              listen: bool = True) -> socket.socket:
    """A listening socket. TCP_NODELAY is set here once: accepted sockets inherit it.
    ``reuse_port``: workers each bind the same port (SO_REUSEPORT), the kernel spreads the
    connections; ``listen=False`` only reserves the port (a master's, accepting nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            # [::]:3128 beside 0.0.0.0:3128: each family on its own listener.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{exc.strerror}: {_fmt((host, port))}") from None
    return sock


def _fmt(address: Sequence[Any]) -> str:
    """A listen or client address as the log writes it: ``tls://`` before a TLS one."""
    text = authority(address[0], address[1])
    return "tls://" + text if getattr(address, "tls", False) else text


def create_server(path: str, objects: Sequence[Any] = (), entry_points: bool = True,
                  text: Optional[str] = None) -> ProxyServer:
    """Build a ProxyServer from the INI file at ``path``, or from ``text`` read from it
    (raises ConfigError)."""
    pm, config = load(path, objects=objects, entry_points=entry_points, text=text)
    return ProxyServer(config, pm, objects, entry_points)
