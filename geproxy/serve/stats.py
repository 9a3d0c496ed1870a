"""What /tunnels and /debug/stats show of a process: its requests in flight, and what it
holds (memory, descriptors, greenlets, connections), summed over workers by a master."""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Optional, Sequence

import gevent

from .handlers import is_parked
from .listeners import describe_address

__all__ = ["in_flight", "process_figures", "report_progress", "combine_stats", "SUMMED"]


def in_flight(server: Any) -> list[dict[str, Any]]:
    """The requests and tunnels in flight, for ``/tunnels``."""
    now = time.time()
    out = []
    for conn_id, conn in list(server.active.items()):
        record = conn.record
        if record is None:
            continue
        ctx = conn.ctx
        out.append({
            "id": conn_id,
            "worker": server.worker or 0,
            "client": describe_address(ctx.client_addr),
            "user": ctx.user,
            "method": record.method,
            "target": record.target,
            "age": round(now - record.started, 3),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
        })
    return out


def report_progress(active: dict[str, Any]) -> None:
    """``on_progress`` for each request and tunnel in flight (``active``: Transactions by
    id) that moved bytes since it was last told."""
    for transaction in list(active.values()):
        record = transaction.record
        if record is not None:
            transaction.progress(record)


def process_figures(server: Any) -> dict[str, Any]:
    """What this process holds: a soak test or an operator watching for leaks reads it
    from outside. Counting greenlets walks the heap (gc): cheap enough for an admin page,
    not for a hot path. Readings from /proc are None without it."""
    tunnels = detached = 0
    for conn in list(server.active.values()):
        if conn.record is not None and conn.record.method == "CONNECT":
            tunnels += 1
            detached += conn.detached is not None
    return {
        "worker": server.worker or 0,
        "pid": os.getpid(),
        "rss_kib": _proc_status_kib("VmRSS"),
        "open_fds": _count_entries("/proc/self/fd"),
        "greenlets": _live_greenlets(),
        "parked_greenlets": len(server.handlers),
        "threads": _count_entries("/proc/self/task"),
        "connections": server.open_connections(),
        "idle_connections": len(server.waiting),
        "in_flight": len(server.active),
        "tunnels": tunnels,
        "detached_tunnels": detached,
        "upstream_pool": len(server.pool),
        "generation": server.gen.number,
        "stopping": server.stopping,
    }


#: The figures of /debug/stats that add up over workers.
SUMMED = ("rss_kib", "open_fds", "greenlets", "parked_greenlets", "threads", "connections",
          "idle_connections", "in_flight", "tunnels", "detached_tunnels", "upstream_pool")


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
    """Spawned greenlets still alive: connections, relays, the pool's sweeper ... The hub,
    the greenlet asking (the admin request's own) and the greenlets parked for the next
    connections (``parked_greenlets``) are not counted."""
    current = gevent.getcurrent()
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, gevent.Greenlet) and not obj.dead and obj is not current
               and not is_parked(obj))
