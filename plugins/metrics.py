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
  ``down`` to it (the CONNECT head and its answer included, as in the access log).
- ``errors_total{error}``: requests that ended with a Proxy-Status error type.
- ``acl_denials_total{rule}``: denials by a policy plugin, by the rule id that denied.
- ``tls_handshakes_total{result}``: handshakes on TLS listeners: ``ok``, or what failed them
  (``timeout``, ``eof``, ``client_certificate``, ``server_certificate``, ``protocol``,
  ``plain_http``, ``error``).
- ``resolve_seconds``, ``connect_seconds``: histograms of name resolution and of connecting
  upstream, for the requests that did each.

Not here: the DNS cache counters (a plugin sees no other plugin; ``dnscache`` keeps them as
attributes) and the count of open client connections (no hook tells of a connection's end).
"""

from __future__ import annotations

import os
from typing import Any, Generator, Optional

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

from geproxy import Context, Record, Request, Response, hookimpl

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


class Metrics:
    """The metrics plugin; ``exposition()`` gives the text format of its registry."""

    name = "metrics"

    def __init__(self) -> None:
        # prometheus_client guards every value with threading.Lock, which gevent's patching
        # turns into a lock written in Python, taken a dozen times per request. A value is
        # changed in one step that never yields to another greenlet, so the thread's own
        # lock (C, and still right across OS threads) does the same for a fraction.
        values.Lock = monkey.get_original("_thread", "allocate_lock")
        # With workers, the master names a directory where every worker's figures are kept
        # (prometheus_client's multiprocess mode), and any worker can expose their sum.
        self.shared = bool(os.environ.get(MULTIPROC_ENV))
        if self.shared:
            values.ValueClass = values.MultiProcessValue()  # chosen per metric at creation
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
                                    "to it.", ["direction"], registry=registry)
        self.errors = Counter("geproxy_errors", "Requests that ended with a Proxy-Status "
                              "error.", ["error"], registry=registry)
        self.denials = Counter("geproxy_acl_denials", "Requests or connections denied by a "
                               "policy rule.", ["rule"], registry=registry)
        self.dns_cache = Counter("geproxy_dns_cache", "Lookups answered by the dnscache "
                                 "plugin, by outcome.", ["result"], registry=registry)
        self.workers = Gauge("geproxy_workers_alive", "Processes serving (1 without workers).",
                             registry=registry, multiprocess_mode="livesum")
        self.workers.set(1)
        self.handshakes = Counter("geproxy_tls_handshakes", "Handshakes on TLS listeners, "
                                  "by result: ok, or what failed them.", ["result"],
                                  registry=registry)
        self.resolve = Histogram("geproxy_resolve_seconds", "Time to resolve an upstream "
                                 "name.", buckets=BUCKETS, registry=registry)
        self.connect = Histogram("geproxy_connect_seconds", "Time to connect to an upstream.",
                                 buckets=BUCKETS, registry=registry)
        # Labelled children, looked up once each: labels() takes a lock and builds a key.
        self._requests: dict[tuple[str, int], Any] = {}
        self._up = self.tunnel_bytes.labels("up")
        self._down = self.tunnel_bytes.labels("down")

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type: with workers,
        the sum over every worker's figures."""
        if not self.shared:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    @hookimpl
    def on_connect(self, ctx: Context) -> None:
        if ctx.decide_only:  # only deciding (geproxy explain): nothing was accepted
            return
        self.connections.inc()
        self.open.inc()
        ctx.stash[OPEN] = True

    @hookimpl
    def on_tls_handshake(self, ctx: Context, error: Optional[str]) -> None:
        self.handshakes.labels(error or "ok").inc()

    @hookimpl
    def on_disconnect(self, ctx: Context) -> None:
        if ctx.stash.pop(OPEN, False):  # counted: no plugin refused it before this one
            self.open.dec()

    @hookimpl(wrapper=True)
    def on_request(self, ctx: Context, request: Request) -> Generator[None, Any,
                                                                      Optional[Response]]:
        # A wrapper runs whatever the other plugins answer, so every request is counted;
        # one only being decided (geproxy explain, a re-check) is not served: not counted.
        if ctx.decide_only:
            return (yield)
        ctx.stash[STASH] = True
        self.in_flight.inc()
        return (yield)

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        if ctx.stash.pop(STASH, False):
            self.in_flight.dec()
        method = record.method if record.method in METHODS else "OTHER"
        child = self._requests.get((method, record.status))
        if child is None:  # bounded: METHODS and OTHER, by the statuses there are
            child = self._requests[(method, record.status)] = self.requests.labels(
                method, str(record.status))
        child.inc()
        lookup = ctx.stash.pop(DNS_CACHE, None)  # the dnscache plugin's outcome, if it ran
        if lookup in DNS_RESULTS:
            self.dns_cache.labels(DNS_RESULTS[lookup]).inc()
        if record.method == "CONNECT":
            self._up.inc(record.bytes_in)
            self._down.inc(record.bytes_out)
        if record.error:
            self.errors.labels(record.error).inc()
        if record.rule:
            self.denials.labels(record.rule).inc()
        if record.dns_time is not None:
            self.resolve.observe(record.dns_time)
        if record.connect_time is not None:
            self.connect.observe(record.connect_time)
