"""What a connection's greenlet costs: spawned afresh, as gevent's servers do, or handed to
one parked by an earlier connection, as geproxy does (geproxy/serve/handlers.py).

    python bench/greenlets.py                     # 20,000 connections, best of 5
    python bench/greenlets.py --connections 100000 --repeat 7

Each mode serves ``--connections`` stand-in connections in batches of 50 (the bench's
clients at a time): each is a function that switches to the hub once (as a connection
waits for its first bytes) and returns. "spawn" gives each a new greenlet of a
``gevent.pool.Group`` (``Group.spawn``: what ``StreamServer`` did with geproxy's group);
"parked" gives each to ``Handlers.spawn``, whose greenlets park when their function
returned and take the next. The table gives microseconds per connection, from handing it
over to the greenlet's end (or its parking), the best of ``--repeat`` runs.

Measurement, not a test: nothing is asserted but that every connection was served.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import gevent
import gevent.pool

from geproxy.serve.handlers import Handlers

BATCH = 50


def serve_batches(spawn: Callable[..., Any], connections: int, group: gevent.pool.Group,
                  handlers: Handlers | None) -> tuple[float, int]:
    """Seconds to serve ``connections`` stand-ins through ``spawn``, and how many were
    served."""
    served = [0]

    def connection() -> None:
        gevent.sleep(0)  # one wait in the hub, as a connection's first read
        served[0] += 1

    started = time.perf_counter()
    for _ in range(connections // BATCH):
        for _ in range(BATCH):
            spawn(connection)
        # Until the batch is over: its greenlets ended (spawn) or parked (Handlers).
        deadline = time.monotonic() + 10
        while len(group):
            if time.monotonic() > deadline:
                raise RuntimeError(f"a batch still runs after 10 s: {len(group)} greenlets")
            gevent.sleep(0)
    elapsed = time.perf_counter() - started
    if handlers is not None:
        handlers.close()
        gevent.sleep(0)
    return elapsed, served[0]


def measure(mode: str, connections: int) -> tuple[float, int]:
    group = gevent.pool.Group()
    if mode == "spawn":
        return serve_batches(group.spawn, connections, group, None)
    handlers = Handlers(group)
    # Warmed: a first batch leaves BATCH greenlets parked, as a busy proxy has them.
    serve_batches(handlers.spawn, BATCH, group, None)
    return serve_batches(handlers.spawn, connections, group, handlers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not BATCH <= args.connections <= 10_000_000 or not 1 <= args.repeat <= 50:
        parser.error(f"--connections {BATCH}-10000000, --repeat 1-50")
    lines = [f"{args.connections:,} connections in batches of {BATCH}, best of "
             f"{args.repeat}: µs per connection, from hand-over to end", "",
             "| mode | µs per connection |", "|---|---:|"]
    for mode in ("spawn", "parked"):
        best = float("inf")
        for _ in range(args.repeat):
            elapsed, served = measure(mode, args.connections)
            if served != args.connections // BATCH * BATCH:
                print(f"{mode}: served {served} of {args.connections}", file=sys.stderr)
                return 1
            best = min(best, elapsed / served)
        lines.append(f"| {mode} | {best * 1e6:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
