"""Where a keep-alive request's (or a CONNECT cycle's) time goes in geproxy: a cProfile.

    python bench/hotspots.py                      # the audited config, 5 s of wrk, top 40
    python bench/hotspots.py --plain --seconds 8 --top 60 --save /tmp/ka.prof
    python bench/hotspots.py --connect            # CONNECT cycles of bench/loadgen.c instead

geproxy-1 runs under cProfile (`python -m cProfile -o FILE -m geproxy`) with the audited
configuration of subjects.py (every request logged as JSON to a file, a `dst` rule; or the
bench's own with `--plain`), in front of the bench's nginx; wrk sends absolute-form GETs on
50 connections for `--seconds` (with `--connect`, bench/loadgen.c's CONNECT cycles on 50
connections instead); SIGINT drains and stops the proxy, which writes the profile.
The table gives each function's own time (tottime) and calls per answered request, and its
share of all the profiled time but the hub's wait (the loop's `run`: idle, not work).

cProfile makes small calls dearer than they are: read the shares and the call counts, and
measure a change with bench/ab.py or bench/floor.py, not with this.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import sys
import tempfile
from pathlib import Path

import measure
import origin
import procs
import subjects

CLIENTS = 50
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_absolute.lua"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="of wrk (default 5)")
    parser.add_argument("--top", type=int, default=40, help="rows (default 40)")
    parser.add_argument("--plain", action="store_true",
                        help="the bench's config (no access log, no rules), not the audited one")
    parser.add_argument("--save", type=Path, help="keep the raw profile at this path")
    parser.add_argument("--connect", action="store_true",
                        help="CONNECT cycles (bench/loadgen.c), not keep-alive requests")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 60:
        parser.error("--seconds 1-60")
    nofile = procs.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="geproxy-profile-") as tmp:
        workdir = Path(tmp)
        origins = origin.start("auto", workdir, 2**20, nofile)
        try:
            port = procs.free_port()
            conf = workdir / "geproxy.ini"
            log = None if args.plain else workdir / "access.log"
            conf.write_text(subjects.geproxy_config(port, "1", access_log=log))
            out = args.save or workdir / "geproxy.prof"
            command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "geproxy",
                       "--config", str(conf)]
            server = procs.start_server("geproxy-1", command, port, workdir)
            try:
                target = measure.Target(origins.port, server, origins.pid)
                # A warm-up, then the profiled run: both are in the profile, both counted.
                answered = sum(_load(target, workdir, args.connect, seconds)
                               for seconds in (1, args.seconds))
            finally:
                os.kill(server.pid, signal.SIGINT)  # drains, stops, writes the profile
                try:
                    server.process.wait(timeout=30)
                finally:
                    procs.stop_server(server)
        finally:
            origins.stop()
        print(render(out, answered, args.top, "plain" if args.plain else "audited",
                     "CONNECT cycle" if args.connect else "keep-alive request"))
    return 0


def _load(target: measure.Target, workdir: Path, connect: bool, seconds: int) -> float:
    """Drive the load for `seconds`; the requests (or cycles) completed."""
    if not connect:
        return measure.wrk_rate(WRK_SCRIPT, target, CLIENTS, seconds).values["rps"] * seconds
    loadgen = workdir / "loadgen"
    if not loadgen.exists():
        loadgen = procs.build_c(Path(__file__).resolve().parent / "loadgen.c", workdir)
    args = ["-m", "cycles", *target.loadgen_args(), "-c", str(CLIENTS), "-d", str(seconds)]
    return float(measure.run_loadgen(loadgen, args, seconds + measure.SLACK)["cycles"])


def render(path: Path, requests: float, top: int, config: str,
           item: str = "keep-alive request") -> str:
    """The top functions by own time, per request (or cycle), with their share of the busy
    time."""
    stats = pstats.Stats(str(path))
    rows = []
    busy = 0.0
    for (filename, line, name), (_, calls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == "run" and "gevent" in filename and "hub" in filename:
            continue  # the hub's loop: its own time is the wait for events
        where = _short(filename, line, name)
        rows.append((tottime, calls, where))
        busy += tottime
    rows.sort(reverse=True)
    lines = [f"# geproxy profile per {item} ({config} config, {requests:,.0f} under "
             "cProfile)", "",
             f"busy time {busy / requests * 1e6:.1f} µs per {item} (cProfile's, inflated)",
             "", f"| function | calls per {item} | own µs | share |",
             "|---|---:|---:|---:|"]
    for tottime, calls, where in rows[:top]:
        lines.append(f"| `{where}` | {calls / requests:.2f} | {tottime / requests * 1e6:.2f} "
                     f"| {tottime / busy:.1%} |")
    return "\n".join(lines)


def _short(filename: str, line: int, name: str) -> str:
    for marker in ("/geproxy/", "/plugins/", "/site-packages/", "/lib/python3"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})" if filename != "~" else name


if __name__ == "__main__":
    sys.exit(main())
