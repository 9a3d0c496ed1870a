"""The metrics plugin's cost per request, without a network: its hooks called as the core
calls them, the way of geproxy_plugins.metrics against the way before it (a labelled
baseline below).

    python bench/metrics_hot.py                   # 20,000 requests, best of 5, both modes
    python bench/metrics_hot.py --requests 100000 --repeat 7

For a plain keep-alive GET, the plugin's hooks of one request (``on_request``, driven as
pluggy drives a wrapper, ``on_progress``, ``on_close``), and of one connection with one
request (``on_connect`` and ``on_disconnect`` too), are called ``--requests`` times; the
table gives microseconds per request, the best of ``--repeat`` runs. Two modes: one process
(prometheus_client's MutexValue) and workers (its multiprocess mode, MultiProcessValue,
files in a temp dir, as a worker writes them). The new way's runs end with one ``flush()``
(what the periodic flush does once a second), counted in its time.

Measurement, not a test: nothing is asserted but that both ways counted the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable, Generator, Optional

from geproxy_plugins import metrics
from geproxy_plugins.metrics import METHODS, OPEN, STASH, Metrics

from geproxy import Config, Context, Headers, Record, Request, Response


class BaselineMetrics(Metrics):
    """The hot hooks as they were before plain integers (geproxy commit f396d3e): every
    count goes straight to a prometheus_client value (its lock, and with workers its
    file). Kept here only to be measured against."""

    def __init__(self) -> None:
        super().__init__()
        self._requests_by: dict[tuple[str, int], Any] = {}

    def on_connect(self, ctx: Context) -> None:
        figures = self._figures()
        figures.connections.inc()
        figures.open.inc()
        ctx.stash[OPEN] = figures

    def on_disconnect(self, ctx: Context) -> None:
        figures = ctx.stash.pop(OPEN, None)
        if figures is not None:
            figures.open.dec()

    def on_request(self, ctx: Context, request: Request) -> Generator[None, Any,
                                                                      Optional[Response]]:
        figures = self._figures()
        ctx.stash[STASH] = figures
        figures.in_flight.inc()
        return (yield)

    def on_progress(self, ctx: Context, record: Record, bytes_in: int,
                    bytes_out: int) -> None:
        figures = self._figures()
        if record.method == "CONNECT":
            figures.up.inc(bytes_in)
            figures.down.inc(bytes_out)
        else:
            figures.http_up.inc(bytes_in)
            figures.http_down.inc(bytes_out)

    def on_close(self, ctx: Context, record: Record) -> None:
        figures = self._figures()
        counted = ctx.stash.pop(STASH, None)
        if counted is not None:
            counted.in_flight.dec()
        method = record.method if record.method in METHODS else "OTHER"
        child = self._requests_by.get((method, record.status))
        if child is None:
            child = self._requests_by[(method, record.status)] = figures.child(
                figures.requests, method, str(record.status))
        child.inc()
        # dns_cache, auth, errors, denials and the histograms: none for this request.


def _wrapped(plugin: Metrics, ctx: Context, request: Request) -> None:
    """``on_request`` as pluggy runs a ``wrapper=True`` implementation: to its yield, then
    sent the inner result (None: nobody answered), to its return."""
    call = plugin.on_request(ctx, request)
    next(call)
    try:
        call.send(None)
    except StopIteration:
        return
    raise RuntimeError("on_request yielded twice")


def _run(plugin: Metrics, count: int, connection: bool, request: Request,
         config: Config) -> float:
    """Seconds for ``count`` requests (each on its own connection when ``connection``)."""
    ctx = Context(client_addr=("127.0.0.1", 40000), server_addr=("127.0.0.1", 3128),
                  config=config)
    record = Record(ctx, method="GET", target=request.target, version="HTTP/1.1",
                    status=200, bytes_in=120, bytes_out=950, request=request)
    on_request, on_progress, on_close = _wrapped, plugin.on_progress, plugin.on_close
    on_connect, on_disconnect = plugin.on_connect, plugin.on_disconnect
    started = time.perf_counter()
    if connection:
        for _ in range(count):
            on_connect(ctx)
            on_request(plugin, ctx, request)
            on_progress(ctx, record, 120, 950)
            on_close(ctx, record)
            on_disconnect(ctx)
    else:
        on_connect(ctx)
        for _ in range(count):
            on_request(plugin, ctx, request)
            on_progress(ctx, record, 120, 950)
            on_close(ctx, record)
        on_disconnect(ctx)
    if not isinstance(plugin, BaselineMetrics):
        plugin.flush()
    return time.perf_counter() - started


def _counted(plugin: Metrics) -> float:
    text = plugin.exposition()[0].decode()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith('geproxy_requests_total{method="GET",status="200"}'))


def _measure(make: Callable[[], tuple[Metrics, Config]], count: int, repeat: int,
             connection: bool, request: Request) -> tuple[float, float]:
    """Microseconds per request, best of ``repeat`` runs; and the requests counted."""
    plugin, config = make()
    try:
        best = min(_run(plugin, count, connection, request, config) for _ in range(repeat))
        return best / count * 1e6, _counted(plugin)
    finally:
        plugin.unconfigure()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000,
                        help="per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs, the best kept (5)")
    args = parser.parse_args(argv)
    if not 1_000 <= args.requests <= 1_000_000 or not 1 <= args.repeat <= 20:
        parser.error("--requests 1000-1000000, --repeat 1-20")
    request = Request("GET", "http://origin.test/", "HTTP/1.1", Headers(frozen=True),
                      "http", "origin.test", 80, "/")
    saved = os.environ.get(metrics.MULTIPROC_ENV)
    rows = []
    with tempfile.TemporaryDirectory(prefix="geproxy-metrics-hot-") as tmp:
        runs = iter(range(1_000_000))

        def maker(cls: type[Metrics], workers: bool) -> Callable[[], tuple[Metrics, Config]]:
            def make() -> tuple[Metrics, Config]:
                plugin = cls()
                config = Config("bench.ini", {})
                plugin.configure(config)
                if workers:  # a directory of its own for each: fresh files
                    directory = os.path.join(tmp, str(next(runs)))
                    os.mkdir(directory)
                    plugin.prepare_workers(config, 2, directory)
                return plugin, config
            return make

        try:
            for mode, workers in (("one process (MutexValue)", False),
                                  ("workers (MultiProcessValue)", True)):
                for what, connection in (("keep-alive request", False),
                                         ("request on its own connection", True)):
                    old, old_n = _measure(maker(BaselineMetrics, workers), args.requests,
                                          args.repeat, connection, request)
                    new, new_n = _measure(maker(Metrics, workers), args.requests,
                                          args.repeat, connection, request)
                    if old_n != new_n:
                        print(f"counted {old_n} (before) and {new_n} (now)", file=sys.stderr)
                        return 1
                    rows.append((mode, what, old, new))
        finally:
            if saved is None:
                os.environ.pop(metrics.MULTIPROC_ENV, None)
            else:
                os.environ[metrics.MULTIPROC_ENV] = saved
    print(f"{args.requests} requests per run, best of {args.repeat}; µs per request\n")
    print("| mode | what | before (prometheus_client per count) | now (plain ints + flush) "
          "| ratio |")
    print("|---|---|---:|---:|---:|")
    for mode, what, old, new in rows:
        print(f"| {mode} | {what} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
