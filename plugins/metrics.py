"""``metrics``: Prometheus metrics of the proxy's traffic, served on the admin listener.

Every instance has its own ``prometheus_client.CollectorRegistry`` (nothing global: two
servers in one process count apart). The core finds the plugin by its name, ``metrics``, and
serves ``exposition()`` as ``GET /metrics`` on the admin listener (``admin_listen``).

Metrics, all with the ``geproxy_`` prefix:

- ``connections_total``: client connections accepted (counted in ``on_connect``).
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
- ``tls_handshakes_total{result}``: handshakes on TLS listeners: ``ok``, or what failed them
  (``timeout``, ``eof``, ``client_certificate``, ``server_certificate``, ``protocol``,
  ``plain_http``, ``error``).
- ``resolve_seconds``, ``connect_seconds``: histograms of name resolution and of connecting
  upstream, for the requests that did each.
- ``reloads_total{outcome}``: reloads (SIGHUP), ``ok`` or ``refused``;
  ``reload_last_success_timestamp_seconds``: when the configuration in force was loaded.
- ``workers_alive``: the processes serving; ``process_cpu_seconds_total{worker}``,
  ``process_resident_memory_bytes{worker}``, ``process_open_fds{worker}`` and
  ``process_start_time_seconds{worker}``: each one's figures, read from /proc when scraped
  (prometheus_client's own process collector knows no workers).

The figures live in ``config.stash`` (one set per server, handed from a configuration to
the next), so a reload goes on counting. With workers (the master sets MULTIPROC_ENV), every
process writes its figures to that directory and the master exposes their sum. Neither mode
exposes ``_created`` samples (the multiprocess mode has none), so the same names come out
whatever ``workers`` says.

Not here: the DNS cache counters (a plugin sees no other plugin; ``dnscache`` keeps them as
attributes) and the count of open client connections (no hook tells of a connection's end).
"""

from __future__ import annotations

import os
import time
from typing import Any, Generator, Iterator, Mapping, Optional

from gevent import monkey
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from geproxy import Config, Context, Record, Request, Response, hookimpl

__all__ = ["Metrics", "MULTIPROC_ENV"]

#: prometheus_client's multiprocess directory; set by the master when there are workers.
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
#: Where the dnscache plugin leaves the outcome of a request's lookup.
DNS_CACHE = "dnscache"
DNS_RESULTS = {"hits": "hit", "misses": "miss", "stale": "stale"}
#: The key of the mark of a connection counted open.
OPEN = "_metrics.open"
#: The key of the figures in ``config.stash``.
STATE = "metrics"


class _Figures:
    """Every metric of one server: made once, kept across reloads in ``config.stash``."""

    def __init__(self, shared: bool) -> None:
        if shared:
            values.ValueClass = values.MultiProcessValue()  # chosen per metric at creation
        self.shared = shared
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
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
        self.dns_cache = Counter("geproxy_dns_cache", "Lookups answered by the dnscache "
                                 "plugin, by outcome.", ["result"], registry=registry)
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
        # Labelled children, looked up once each: labels() takes a lock and builds a key.
        # Every label a process may count is made at once, so the samples shown do not
        # depend on which process happened to count what.
        self.requests_by: dict[tuple[str, int], Any] = {}
        self.up, self.down = self.tunnel_bytes.labels("up"), self.tunnel_bytes.labels("down")
        self.http_up = self.http_bytes.labels("up")
        self.http_down = self.http_bytes.labels("down")
        for outcome in ("ok", "refused"):
            self.reloads.labels(outcome)
        self.handshakes.labels("ok")

    def exposition(self, processes: Mapping[int, int]) -> bytes:
        if self.shared:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry) + generate_latest(_Processes(processes))


class _Processes:
    """The serving processes' figures, read from /proc when scraped: a collector for
    ``generate_latest``. A process gone meanwhile is left out."""

    def __init__(self, processes: Mapping[int, int]) -> None:
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        alive = GaugeMetricFamily("geproxy_workers_alive",
                                  "Processes serving (1 without workers).")
        cpu = CounterMetricFamily("geproxy_process_cpu_seconds",
                                  "CPU time of each serving process, user and system.",
                                  labels=["worker"])
        rss = GaugeMetricFamily("geproxy_process_resident_memory_bytes",
                                "Resident memory of each serving process.", labels=["worker"])
        fds = GaugeMetricFamily("geproxy_process_open_fds",
                                "Open descriptors of each serving process.", labels=["worker"])
        start = GaugeMetricFamily("geproxy_process_start_time_seconds",
                                  "When each serving process started, in seconds since the "
                                  "epoch: a worker started again has a later one.",
                                  labels=["worker"])
        alive.add_metric([], len(self.processes))
        for worker, pid in sorted(self.processes.items()):
            found = _proc_figures(pid)
            if found is None:
                continue
            label = [str(worker)]
            cpu.add_metric(label, found[0])
            rss.add_metric(label, found[1])
            fds.add_metric(label, found[2])
            start.add_metric(label, found[3])
        yield from (alive, cpu, rss, fds, start)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_figures(pid: int) -> Optional[tuple[float, int, int, float]]:
    """CPU seconds, resident bytes, open descriptors and start time of ``pid``; None when
    /proc cannot tell (no /proc, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # The command name (field 2) may hold spaces: count the fields after it.
            fields = handle.read().rpartition(")")[2].split()
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    started = boot + int(fields[19]) / _TICKS  # starttime, in ticks after boot
    return cpu, int(fields[21]) * _PAGE, descriptors, started  # rss, in pages


class Metrics:
    """The metrics plugin; ``exposition()`` gives the text format of its figures."""

    name = "metrics"

    def __init__(self) -> None:
        # prometheus_client guards every value with threading.Lock, which gevent's patching
        # turns into a lock written in Python, taken a dozen times per request. A value is
        # changed in one step that never yields to another greenlet, so the thread's own
        # lock (C, and still right across OS threads) does the same for a fraction.
        values.Lock = monkey.get_original("_thread", "allocate_lock")
        # The same samples with workers or without: the multiprocess mode has no _created.
        disable_created_metrics()
        #: The server's figures: set by configure (from config.stash, or made there).
        self.figures: Optional[_Figures] = None

    @hookimpl
    def configure(self, config: Config) -> None:
        figures = config.stash.get(STATE)
        if not isinstance(figures, _Figures):
            # With workers, the master names a directory where every process keeps its
            # figures (prometheus_client's multiprocess mode), summed when exposed.
            figures = config.stash[STATE] = _Figures(bool(os.environ.get(MULTIPROC_ENV)))
        self.figures = figures

    def exposition(self, processes: Optional[Mapping[int, int]] = None) -> tuple[bytes, str]:
        """The figures in the Prometheus text format, and its content type: with workers,
        the sum over every process. ``processes``: the serving processes by worker number
        (this one alone when not given)."""
        figures = self._figures()
        return (figures.exposition(processes or {0: os.getpid()}), CONTENT_TYPE_LATEST)

    def _figures(self) -> _Figures:
        if self.figures is None:  # not configured: an instance of its own (tests, tools)
            self.figures = _Figures(False)
        return self.figures

    @hookimpl
    def on_connect(self, ctx: Context) -> None:
        if ctx.decide_only:  # only deciding (geproxy explain): nothing was accepted
            return
        figures = self._figures()
        figures.connections.inc()
        figures.open.inc()
        ctx.stash[OPEN] = figures

    @hookimpl
    def on_tls_handshake(self, ctx: Context, error: Optional[str]) -> None:
        self._figures().handshakes.labels(error or "ok").inc()

    @hookimpl
    def on_disconnect(self, ctx: Context) -> None:
        figures = ctx.stash.pop(OPEN, None)
        if figures is not None:  # counted: no plugin refused it before this one
            figures.open.dec()

    @hookimpl
    def on_reload(self, config: Config, error: Optional[str]) -> None:
        figures = self._figures()
        figures.reloads.labels("refused" if error else "ok").inc()
        if not error:
            figures.last_reload.set(time.time())

    @hookimpl(wrapper=True)
    def on_request(self, ctx: Context, request: Request) -> Generator[None, Any,
                                                                      Optional[Response]]:
        # A wrapper runs whatever the other plugins answer, so every request is counted;
        # one only being decided (geproxy explain, a re-check) is not served: not counted.
        if ctx.decide_only:
            return (yield)
        figures = self._figures()
        ctx.stash[STASH] = figures
        figures.in_flight.inc()
        return (yield)

    @hookimpl
    def on_progress(self, ctx: Context, record: Record, bytes_in: int,
                    bytes_out: int) -> None:
        figures = self._figures()
        if record.method == "CONNECT":
            figures.up.inc(bytes_in)
            figures.down.inc(bytes_out)
        else:
            figures.http_up.inc(bytes_in)
            figures.http_down.inc(bytes_out)

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        figures = self._figures()
        counted = ctx.stash.pop(STASH, None)
        if counted is not None:
            counted.in_flight.dec()
        method = record.method if record.method in METHODS else "OTHER"
        child = figures.requests_by.get((method, record.status))
        if child is None:  # bounded: METHODS and OTHER, by the statuses there are
            child = figures.requests_by[(method, record.status)] = figures.requests.labels(
                method, str(record.status))
        child.inc()
        lookup = ctx.stash.pop(DNS_CACHE, None)  # the dnscache plugin's outcome, if it ran
        if lookup in DNS_RESULTS:
            figures.dns_cache.labels(DNS_RESULTS[lookup]).inc()
        if record.error:
            figures.errors.labels(record.error).inc()
        if record.rule:
            figures.denials.labels(record.rule).inc()
        if record.dns_time is not None:
            figures.resolve.observe(record.dns_time)
        if record.connect_time is not None:
            figures.connect.observe(record.connect_time)
