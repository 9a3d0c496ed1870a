"""CPU per item with 1 and with 2 workers (or more), alternating under the same loads.

    python bench/scaling.py                       # workers 1 and 2, 4 rounds of 5 s, audited
    python bench/scaling.py --workers 1,2 --rounds 6 --plain
    python bench/scaling.py --save                # and bench/results/scaling-*.md

Several workers are one proxy only if each item costs what it costs with one: no shared
lock, no shared cache line, a balanced SO_REUSEPORT. Rates cannot show that on a machine
whose cores the load generator and the origin share; the proxy's CPU per item can: each
round starts geproxy with each worker count in turn (the audited config of subjects.py,
or with `--plain` the bench's), runs bench/loadgen.c's CONNECT cycles and wrk's keep-alive
requests (50 clients each), and reads the CPU of the whole process tree (master and
workers). The table gives the medians, the ratio to the first count round by round (its
median and range), and how the connections spread over the workers (each worker's share
of the CPU, from /proc, over both measures).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import measure
import origin
import procs
import subjects

BENCH_DIR = Path(__file__).resolve().parent
CLIENTS = 50


def workers_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each worker of the master ``pid`` by its pid (the process itself when
    it has no children: one worker)."""
    members = procs.process_tree(pid)[1:] or [pid]
    return {member: sum(procs.cpu_split(member)) for member in members}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    parser.add_argument("--seconds", type=int, default=5, help="per measure (default 5)")
    parser.add_argument("--plain", action="store_true", help="the bench's config")
    parser.add_argument("--save", action="store_true",
                        help="also save the table as bench/results/scaling-YYYYmmdd-HHMMSS.md")
    args = parser.parse_args(argv)
    counts = [int(text) for text in args.workers.split(",") if text.strip()]
    if not counts or not all(1 <= count <= 64 for count in counts):
        parser.error("--workers: counts from 1 to 64")
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        parser.error("--rounds 1-20, --seconds 1-60")
    started = datetime.datetime.now()
    found: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
    spread: dict[int, list[list[float]]] = {count: [] for count in counts}  # per round
    nofile = procs.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="geproxy-scaling-") as tmp:
        workdir = Path(tmp)
        loadgen = procs.build_c(BENCH_DIR / "loadgen.c", workdir)
        origins = origin.start("auto", workdir, 2**20, nofile)
        try:
            for number in range(args.rounds):
                for count in counts:
                    port = procs.free_port()
                    conf = workdir / "geproxy.ini"
                    log = None if args.plain else workdir / "access.log"
                    conf.write_text(subjects.geproxy_config(port, str(count), access_log=log))
                    server = procs.start_server(f"geproxy-{count}", [
                        sys.executable, "-m", "geproxy", "--config", str(conf)], port, workdir)
                    try:
                        target = measure.Target(origins.port, server, origins.pid)
                        before = workers_cpu(server.pid)
                        found[count].append(measure.cpu_apart(loadgen, target, CLIENTS,
                                                              args.seconds))
                        after = workers_cpu(server.pid)
                        if sorted(after) == sorted(before):  # no worker restarted
                            spread[count].append(sorted(after[member] - before[member]
                                                        for member in after))
                    finally:
                        procs.stop_server(server)
                    print(f"round {number + 1} workers {count}: {found[count][-1]}",
                          file=sys.stderr)
        finally:
            origins.stop()
    text = document(started, render(args, counts, found, spread))
    procs.publish(text, "scaling", started, args.save)
    return 0


def document(started: datetime.datetime, table: str) -> str:
    """The saved report: when, on what, which geproxy, then the table."""
    version = subjects.by_names(["geproxy-1"])[0].version()
    return "\n".join([
        f"# geproxy with 1 and more workers, {started:%Y-%m-%d %H:%M:%S}", "",
        f"- machine: {procs.machine()}; load generator, origin and proxy share the cores",
        f"- version: {version}", "", table, ""])


def render(args: argparse.Namespace, counts: list[int],
           found: dict[int, list[dict[str, float]]],
           spread: dict[int, list[list[float]]]) -> str:
    config = "the bench's config" if args.plain else "the audited config"
    lines = [f"{args.rounds} rounds of {args.seconds} s per measure, {CLIENTS} clients, "
             f"{config}; proxy CPU (user and kernel, master and workers) in ms per item, "
             f"medians; ratio to {counts[0]} worker(s), round by round: median (range)", "",
             "| workers | CONNECT cycle | ratio | keep-alive request | ratio | "
             "each worker's share of the CPU |", "|---:|---:|---:|---:|---:|---|"]
    first = found[counts[0]]
    for count in counts:
        runs = found[count]
        cells = [str(count)]
        for key in ("cycle_total", "request_total"):
            cells.append(f"{statistics.median(run[key] for run in runs):.3f}")
            ratios = [run[key] / base[key] for run, base in zip(runs, first, strict=False)]
            cells.append(f"{statistics.median(ratios):.2f} "
                         f"({min(ratios):.2f}-{max(ratios):.2f})")
        shares = spread[count]
        if shares and len(shares[0]) > 1:
            # Each round's workers, the least busy first: how even the spread is.
            totals = [sum(column) for column in zip(*shares, strict=True)]
            whole = sum(totals) or 1.0
            cells.append(" / ".join(f"{total / whole:.0%}" for total in totals))
        else:
            cells.append("one process")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
