"""``metrics``: Prometheus metrics of the proxy's traffic, served on the admin listener.

The core finds the plugin by its name, ``metrics`` (``geproxy.plugins.exposition``), and
serves ``exposition()`` as ``GET /metrics`` on the admin listener (``admin_listen``; on the
proxy port too when ``local_paths`` says so).

Metrics, all with the ``geproxy_`` prefix:

- ``connections_total``: client connections accepted (``on_connect``);
  ``connections_open``: those not yet closed (down again in ``on_disconnect``).
- ``requests_in_flight``: requests and tunnels being served (from ``on_request`` to their
  ``on_close``).
- ``requests_total{method,status}``: finished requests and tunnels, by method (an unusual
  method counts as ``OTHER``; ``-`` when no head was read) and the status sent (``0``: none).
- ``tunnel_bytes_total{direction}``: bytes of CONNECT tunnels, ``up`` from the client and
  ``down`` to it (the CONNECT head and its answer included, as in the access log), counted
  as they flow (``on_progress``: at most a second late), not when the tunnel ends.
- ``http_bytes_total{direction}``: the same for every other request (plain HTTP, the
  proxy's own answers, WebSocket upgrades).
- ``errors_total{error}``: requests that ended with a Proxy-Status error type.
- ``acl_denials_total{rule}``: denials by a policy plugin, by the rule id that denied.
- ``parent_failures_total{parent}``: failed attempts through a parent proxy (``route_failed``:
  refused, timed out, closed, answered CONNECT with no 2xx), by the parent's ``host:port``.
- ``dns_cache_total{result}``: requests whose lookup went through a DNS cache, by what it
  made of it (``ctx.dns_cache``: ``hit``, ``miss``, ``stale``).
- ``auth_total{scheme,result}``: requests whose credentials were checked, by scheme
  (``basic``, ``negotiate``, ``certificate``) and outcome (``ctx.auth_result``: ``ok``,
  ``cached``, ``stale``, ``connection``, ``failed``, ``throttled``, ``unavailable``): a
  directory that stopped answering shows as ``stale`` then ``unavailable``, a password
  guesser as ``failed`` then ``throttled``.
- ``tls_handshakes_total{result}``: handshakes on TLS listeners: ``ok``, or what failed them
  (``timeout``, ``eof``, ``client_certificate``, ``server_certificate``, ``protocol``,
  ``plain_http``, ``error``).
- ``resolve_seconds``, ``connect_seconds``: histograms of name resolution and of connecting
  upstream, for the requests that did each.
- ``reloads_total{outcome}``: reloads (SIGHUP), ``ok`` or ``refused``;
  ``reload_last_success_timestamp_seconds``: when the configuration in force was loaded.
- ``workers_alive``: the processes serving; ``process_cpu_seconds_total{worker}``,
  ``process_resident_memory_bytes{worker}``, ``process_open_fds{worker}``,
  ``process_max_fds{worker}`` (its RLIMIT_NOFILE) and ``process_start_time_seconds{worker}``:
  each one's figures, read from /proc when scraped
  (prometheus_client's own process collector knows no workers).

The figures belong to a server: they live in ``config.stash`` (a ``CollectorRegistry`` of
their own, handed from a configuration to the next), so a reload goes on counting and two
servers in one process count apart. With workers, ``prepare_workers`` (called by the master
before it forks) replaces them with figures in prometheus_client's multiprocess mode: every
process writes its own files into a directory of the master's, the master sums them when
/metrics is asked, and ``on_worker_exit`` lets a dead worker's gauges go. The same sample
names come out either way: ``_created`` samples are left out (the multiprocess mode has
none).

Counting costs a few additions of plain integers per request: the hooks add to the
figures' ``_Pending`` counts (no lock: gevent runs every hook of a process in its one
thread, and no hook of this plugin runs in gevent's threadpool), and ``flush()`` moves them
into the prometheus_client values (each change of those takes a lock, and with workers
writes a file). A flush happens before every exposition (a scrape is exact: with workers,
the master asks each worker to flush first), every FLUSH_INTERVAL seconds while a server
counts (a worker killed by SIGKILL loses at most that), and when a configuration is
unconfigured (a stop, a reload's retired plugins). The pending counts belong to the
figures, so every configuration that shares them (a reload's old and new plugins) adds to
the same ones, and none is lost across a reload.

prometheus_client chooses how its values are kept for the whole process (two globals of
``prometheus_client.values``, read whenever a metric or a labelled child is made). This
plugin's figures are made inside ``_Figures.making``, which sets both for them alone and puts
them back: nothing else in the process sees a change.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Generator, Iterator, Mapping, Optional

import gevent
from gevent import monkey
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import Metric

from geproxy import Config, Context, ProxyError, Record, Request, Response, Route, hookimpl

from .metrics_procs import Processes

__all__ = ["Metrics", "MULTIPROC_ENV"]

#: prometheus_client's multiprocess directory: set by ``prepare_workers`` for the master and
#: the workers it forks (prometheus_client's multiprocess values find it only there).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Method labels kept as they are; any other method counts as OTHER (bounded labels).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH", "-"})
#: Seconds: resolving and connecting take from a millisecond to the timeouts (10 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0)
#: The key of this plugin's mark in ``ctx.stash``: a request counted in flight.
#: (a leading "_": a private mark, which ``geproxy explain`` does not print)
STASH = "_metrics"
#: What ``ctx.dns_cache`` may say, and this plugin counts (bounded labels).
DNS_RESULTS = frozenset({"hit", "miss", "stale"})
#: What ``ctx.auth_scheme`` and ``ctx.auth_result`` may say, and this plugin counts.
AUTH_SCHEMES = frozenset({"basic", "negotiate", "certificate"})
AUTH_RESULTS = frozenset({"ok", "cached", "stale", "connection", "failed", "throttled",
                          "unavailable"})
#: The key of the mark of a connection counted open.
OPEN = "_metrics.open"
#: The key of the figures in ``config.stash``.
STATE = "metrics"
#: Seconds between two flushes of the pending counts while a server counts.
FLUSH_INTERVAL = 1.0

#: The lock of this plugin's values: the thread's own, in C. gevent's patching makes
#: threading.Lock, prometheus_client's, a lock written in Python, taken a dozen times per
#: request; a value changes in one step that never yields to another greenlet, so the C
#: lock (still right across OS threads) does the same for a fraction.
_LOCK = monkey.get_original("_thread", "allocate_lock")


@contextlib.contextmanager
def _values_made_with(value_class: Any) -> Iterator[None]:
    """Within the block, prometheus_client makes values of ``value_class``, guarded by
    ``_LOCK``; outside it, what it made before. No greenlet switch can happen inside (making
    a metric, or opening its multiprocess file, never yields)."""
    saved = values.ValueClass, values.Lock
    values.ValueClass, values.Lock = value_class, _LOCK
    try:
        yield
    finally:
        values.ValueClass, values.Lock = saved


class _Pending:
    """Counts not yet in the prometheus_client values: what the hooks add to.

    Plain integers, changed without a lock: every hook of this plugin runs in the process's
    one gevent thread and adds in one step that never yields to another greenlet.
    ``labelled``: counts of labelled counters, by (the counter's attribute of ``_Figures``,
    its labels as counted: a request's status is an int until flushed)."""

    __slots__ = ("connections", "open", "in_flight", "up", "down", "http_up", "http_down",
                 "labelled")

    def __init__(self) -> None:
        # open, in_flight (gauges): the change since the last flush, negative when more
        # went down than up.
        self.connections = self.open = self.in_flight = 0
        self.up = self.down = self.http_up = self.http_down = 0
        self.labelled: dict[tuple[Any, ...], int] = {}

    def add(self, key: tuple[Any, ...]) -> None:
        self.labelled[key] = self.labelled.get(key, 0) + 1


class _Figures:
    """Every metric of one server: made once, kept across reloads in ``config.stash``.
    ``directory``: prometheus_client's multiprocess directory (with workers), or None."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = directory
        #: The one value class of these figures; the multiprocess one keeps its files per
        #: process (a forked worker's are its own) and is made once.
        self.value_class: Any = values.MutexValue
        if directory:
            with _values_made_with(values.MutexValue):
                self.value_class = values.MultiProcessValue()
        self.registry = CollectorRegistry(auto_describe=True)
        #: Labelled children by (metric, labels), made once each: ``labels()`` takes a lock
        #: and builds a key, and must run inside ``making``.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        with self.making():
            self._make(self.registry)
        #: What the hooks counted since the last flush.
        self.pending = _Pending()
        #: The configured plugin instances that count into these figures (a reload's old
        #: and new ones, for a while): the periodic flush runs while there is one.
        self.users = 0
        #: The loop's timer that flushes every FLUSH_INTERVAL, started by the first
        #: connection counted while configured (in a worker, never in its master: it serves
        #: none). A timer, not a greenlet: it runs ``flush`` in the hub, which never waits,
        #: and no greenlet stays alive for it.
        self.flusher: Any = None

    def making(self) -> contextlib.AbstractContextManager[None]:
        """The block where a metric or a labelled child of these figures may be made."""
        return _values_made_with(self.value_class)

    def _make(self, registry: CollectorRegistry) -> None:
        self.connections = Counter("geproxy_connections", "Client connections accepted.",
                                   registry=registry)
        self.open = Gauge("geproxy_connections_open", "Client connections open.",
                          registry=registry, multiprocess_mode="livesum")
        self.in_flight = Gauge("geproxy_requests_in_flight",
                               "Requests and tunnels being served.", registry=registry,
                               multiprocess_mode="livesum")
        self.requests = Counter("geproxy_requests", "Finished requests and tunnels.",
                                ["method", "status"], registry=registry)
        self.tunnel_bytes = Counter("geproxy_tunnel_bytes",
                                    "Bytes through CONNECT tunnels: up from the client, down "
                                    "to it, counted as they flow.", ["direction"],
                                    registry=registry)
        self.http_bytes = Counter("geproxy_http_bytes",
                                  "Bytes of requests other than CONNECT (plain HTTP, the "
                                  "proxy's own answers): up from the client, down to it, "
                                  "counted as they flow.", ["direction"], registry=registry)
        self.errors = Counter("geproxy_errors", "Requests that ended with a Proxy-Status "
                              "error.", ["error"], registry=registry)
        self.denials = Counter("geproxy_acl_denials", "Requests or connections denied by a "
                               "policy rule.", ["rule"], registry=registry)
        self.parent_failures = Counter("geproxy_parent_failures", "Failed attempts through "
                                       "a parent proxy, by its host:port.", ["parent"],
                                       registry=registry)
        self.dns_cache = Counter("geproxy_dns_cache", "Lookups answered by the dnscache "
                                 "plugin, by outcome.", ["result"], registry=registry)
        self.auth = Counter("geproxy_auth", "Requests whose credentials were checked, by "
                            "scheme and outcome.", ["scheme", "result"], registry=registry)
        self.handshakes = Counter("geproxy_tls_handshakes", "Handshakes on TLS listeners, "
                                  "by result: ok, or what failed them.", ["result"],
                                  registry=registry)
        self.reloads = Counter("geproxy_reloads", "Reloads (SIGHUP), by outcome: ok, or "
                               "refused (the running configuration stayed).", ["outcome"],
                               registry=registry)
        self.last_reload = Gauge("geproxy_reload_last_success_timestamp_seconds",
                                 "When the configuration in force was loaded (at start, or "
                                 "by the last reload put in force).", registry=registry,
                                 multiprocess_mode="max")
        self.last_reload.set(time.time())
        self.resolve = Histogram("geproxy_resolve_seconds", "Time to resolve an upstream "
                                 "name.", buckets=BUCKETS, registry=registry)
        self.connect = Histogram("geproxy_connect_seconds", "Time to connect to an upstream.",
                                 buckets=BUCKETS, registry=registry)
        # Every label a process may count is made at once, so the samples shown do not
        # depend on which process happened to count what.
        self.up = self.child(self.tunnel_bytes, "up")
        self.down = self.child(self.tunnel_bytes, "down")
        self.http_up = self.child(self.http_bytes, "up")
        self.http_down = self.child(self.http_bytes, "down")
        for outcome in ("ok", "refused"):
            self.child(self.reloads, outcome)
        self.child(self.handshakes, "ok")

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, made once (inside ``making``) and kept."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            with self.making():
                found = self._children[key] = metric.labels(*labels)
        return found

    def flush(self) -> None:
        """Move the pending counts into the prometheus_client values. Never yields (a
        value's lock is the C one, its file a mapped one), so nothing is counted between
        taking the pending counts and replacing them."""
        pending, self.pending = self.pending, _Pending()
        for value, amount in ((self.connections, pending.connections), (self.up, pending.up),
                              (self.down, pending.down), (self.http_up, pending.http_up),
                              (self.http_down, pending.http_down),
                              (self.open, pending.open), (self.in_flight, pending.in_flight)):
            if amount:
                value.inc(amount)  # a gauge's change may be negative: Gauge.inc adds it
        for (name, *labels), amount in pending.labelled.items():
            self.child(getattr(self, name), *map(str, labels)).inc(amount)

    def start_flushing(self) -> None:
        """Flush every FLUSH_INTERVAL from now on, while a configured plugin counts here."""
        if self.flusher is None and self.users > 0:
            timer = gevent.get_hub().loop.timer(FLUSH_INTERVAL, FLUSH_INTERVAL, ref=False)
            timer.start(self.flush)
            self.flusher = timer

    def stop_flushing(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher.close()
            self.flusher = None

    def exposition(self, processes: Mapping[int, int]) -> bytes:
        self.flush()
        if self.directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.directory)
        else:
            registry = self.registry
        return generate_latest(_WithoutCreated(registry)) + generate_latest(
            Processes(processes))


class _WithoutCreated:
    """A registry's families without their ``_created`` samples, for ``generate_latest``:
    the same names with workers or without (the multiprocess mode has none). Not
    prometheus_client's ``disable_created_metrics()``, which would turn them off for every
    registry of the process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            family.samples = [sample for sample in family.samples if sample.name != created]
            yield family


class Metrics:
    """The metrics plugin; ``exposition()`` gives the text format of its figures."""

    name = "metrics"

    def __init__(self) -> None:
        #: The server's figures: set by configure (from config.stash, or made there), and
        #: by prepare_workers.
        self.figures: Optional[_Figures] = None
        #: configure ran (and unconfigure did not yet): counted in ``figures.users``.
        self._using = False

    @hookimpl
    def configure(self, config: Config) -> None:
        figures = config.stash.get(STATE)
        if not isinstance(figures, _Figures):
            figures = config.stash[STATE] = _Figures()
        self.figures = figures
        figures.users += 1
        self._using = True

    @hookimpl
    def unconfigure(self) -> None:
        """What this instance counted goes into the values (at a stop, a worker's before it
        exits); the periodic flush stops with the last instance of the figures."""
        figures = self.figures
        if figures is None or not self._using:  # configure did not run, or not here
            return
        self._using = False
        figures.users -= 1
        figures.flush()
        if figures.users <= 0:
            figures.stop_flushing()

    def flush(self) -> None:
        """Move every count not yet in the values into them (``_Figures.flush``): asked by a
        master of each worker before it sums their files for /metrics."""
        self._figures().flush()

    @hookimpl
    def prepare_workers(self, config: Config, workers: int, directory: str) -> None:
        """Figures that every process of the master adds to: prometheus_client's
        multiprocess mode, in a directory of the master's, in place of the figures of one
        process that ``configure`` made (nothing was counted yet)."""
        path = os.path.join(directory, "metrics")
        os.mkdir(path)
        # Where prometheus_client's multiprocess values keep their files, here and in each
        # worker forked from here: they read it from the environment, and only there.
        os.environ[MULTIPROC_ENV] = path
        figures = _Figures(path)
        figures.users = self._figures().users  # the configured instances count here now
        self.figures = config.stash[STATE] = figures

    @hookimpl
    def on_worker_exit(self, config: Config, worker: int, pid: int) -> None:
        """A dead worker's live gauges (connections open, requests in flight) stop counting,
        before a process that may get its pid writes files of that name."""
        directory = self._figures().directory
        if directory:
            multiprocess.mark_process_dead(pid, directory)

    def exposition(self, processes: Optional[Mapping[int, int]] = None) -> tuple[bytes, str]:
        """The figures in the Prometheus text format, and its content type: with workers,
        the sum over every process. ``processes``: the serving processes by worker number
        (this one alone when not given)."""
        figures = self._figures()
        return (figures.exposition(processes or {0: os.getpid()}), CONTENT_TYPE_LATEST)

    def _figures(self) -> _Figures:
        if self.figures is None:  # not configured: an instance of its own (tests, tools)
            self.figures = _Figures()
        return self.figures

    # -- counting: plain integers (see _Pending); histograms and reloads go to the values
    # at once (a histogram is observed per upstream connection made, not per request on a
    # kept-alive one; a reload is rare, and counted in the master, which never flushes
    # periodically).

    @hookimpl
    def on_connect(self, ctx: Context) -> None:
        if ctx.decide_only:  # only deciding (geproxy explain): nothing was accepted
            return
        figures = self._figures()
        pending = figures.pending
        pending.connections += 1
        pending.open += 1
        ctx.stash[OPEN] = figures
        if figures.flusher is None:
            figures.start_flushing()

    @hookimpl
    def on_tls_handshake(self, ctx: Context, error: Optional[str]) -> None:
        self._figures().pending.add(("handshakes", error or "ok"))

    @hookimpl
    def on_disconnect(self, ctx: Context) -> None:
        figures = ctx.stash.pop(OPEN, None)
        if figures is not None:  # counted: no plugin refused it before this one
            figures.pending.open -= 1

    @hookimpl
    def on_reload(self, config: Config, error: Optional[str]) -> None:
        figures = self._figures()
        figures.child(figures.reloads, "refused" if error else "ok").inc()
        if not error:
            figures.last_reload.set(time.time())

    @hookimpl
    def route_failed(self, ctx: Context, request: Request, route: Route,
                     error: ProxyError) -> None:
        # Bounded labels: the configured parents.
        self._figures().pending.add(("parent_failures", route.authority))

    @hookimpl(wrapper=True)
    def on_request(self, ctx: Context, request: Request) -> Generator[None, Any,
                                                                      Optional[Response]]:
        # A wrapper runs whatever the other plugins answer, so every request is counted;
        # one only being decided (geproxy explain, a re-check) is not served: not counted.
        if ctx.decide_only:
            return (yield)
        figures = self._figures()
        ctx.stash[STASH] = figures
        figures.pending.in_flight += 1
        return (yield)

    @hookimpl
    def on_progress(self, ctx: Context, record: Record, bytes_in: int,
                    bytes_out: int) -> None:
        pending = self._figures().pending
        if record.method == "CONNECT":
            pending.up += bytes_in
            pending.down += bytes_out
        else:
            pending.http_up += bytes_in
            pending.http_down += bytes_out

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        figures = self._figures()
        counted = ctx.stash.pop(STASH, None)
        if counted is not None:
            counted.pending.in_flight -= 1
        pending = figures.pending
        # Bounded labels: METHODS and OTHER, by the statuses there are.
        key = ("requests", record.method if record.method in METHODS else "OTHER",
               record.status)
        labelled = pending.labelled
        labelled[key] = labelled.get(key, 0) + 1
        if ctx.dns_cache in DNS_RESULTS:  # this request's lookup went through a cache
            pending.add(("dns_cache", ctx.dns_cache))
        if ctx.auth_scheme in AUTH_SCHEMES and ctx.auth_result in AUTH_RESULTS:
            pending.add(("auth", ctx.auth_scheme, ctx.auth_result))
        if record.error:
            pending.add(("errors", record.error))
        if record.rule:
            pending.add(("denials", record.rule))
        if record.dns_time is not None:
            figures.resolve.observe(record.dns_time)
        if record.connect_time is not None:
            figures.connect.observe(record.connect_time)
