"""geproxy's benchmark: geproxy against no proxy and the other forward proxies, on loopback.

    python bench/run.py [--quick] [--subjects direct,geproxy-1,geproxy-auto,squid-1,...]
                        [--duration SECONDS] [--out bench/results/] [--origin auto]

Prints a markdown table and saves it as OUT/YYYYmmdd-HHMMSS.md. bench/README.md says what
each row means. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import measure
import origin
import procs
import report
import subjects

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    subjects: list[str]
    runs: int
    seconds: int
    clients: int
    download_mib: int
    levels: tuple[int, ...]
    out: Path
    origin: str


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run per measure, 3 s rates, 256 MiB download")
    parser.add_argument("--subjects", default=subjects.DEFAULT,
                        help=f"comma-separated, from: {subjects.DEFAULT.replace(',', ', ')} "
                             "(default: all)")
    parser.add_argument("--duration", type=int,
                        help="seconds per rate measure (default 10, 3 with --quick)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory for the saved table (default bench/results/)")
    parser.add_argument("--origin", choices=("auto", "nginx", "builtin"), default="auto",
                        help="nginx, the built-in C origin, or nginx when installed (default)")
    args = parser.parse_args(argv)
    seconds = args.duration if args.duration is not None else (3 if args.quick else 10)
    if seconds <= 0:
        parser.error("--duration must be positive")
    return Settings(
        subjects=[name.strip() for name in args.subjects.split(",") if name.strip()],
        runs=1 if args.quick else 3,
        seconds=seconds,
        clients=50,
        download_mib=256 if args.quick else 1024,
        levels=measure.TUNNEL_LEVELS,
        out=args.out,
        origin=args.origin,
    )


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_subject(settings: Settings, results: report.Results, run: int, name: str,
                    target: measure.Target, origins: origin.Origins, loadgen: Path) -> None:
    """Every measure once against one running subject, started afresh for this run: the
    routing check and the idle tunnels first, on the fresh proxy."""
    steps: list[tuple[str, Callable[[], measure.Reading]]] = []
    if target.proxy:
        proxy = target.proxy
        steps.append(("routing check", lambda: measure.routing(
            proxy, origins.port, origins.port_b)))
        steps.append(("idle tunnels", lambda: measure.idle_rss(
            loadgen, target.origin_port, proxy, settings.levels)))
    steps += [
        ("cycles", lambda: measure.cycles(loadgen, target, settings.clients, settings.seconds)),
        ("download", lambda: measure.throughput(loadgen, target, settings.download_mib * 2**20)),
        ("wrk", lambda: measure.wrk_rate(BENCH_DIR / "wrk_absolute.lua", target,
                                         settings.clients, settings.seconds)),
    ]
    for step, run_step in steps:
        progress(f"run {run}/{settings.runs} {name}: {step}")
        try:
            reading = run_step()
        except measure.MeasureError as exc:
            reading = measure.Reading(notes=[f"{step}: {exc}"])
        results.add(name, run, reading)
        code = target.proxy.process.poll() if target.proxy else None
        if code is not None:
            results.notes.append(f"{name}, run {run}: exited with code {code} during {step}")
            return


def run_all(settings: Settings, workdir: Path, loadgen: Path,
            origins: origin.Origins) -> report.Results:
    chosen = subjects.by_names(settings.subjects)
    results = report.Results(
        [subject.name for subject in chosen],
        peers=[subject.name for subject in chosen if subject.kind == subjects.PEER],
        proxies=[subject.name for subject in chosen if subject.start is not None],
    )
    for subject in chosen:
        reason = subject.missing()
        if reason:
            results.skipped[subject.name] = reason
        else:
            results.versions[subject.name] = subject.version()
    # The origin alone goes first in each run, so it is measured before anything else.
    in_order = sorted(chosen, key=lambda subject: subject.start is not None)
    for run in range(1, settings.runs + 1):
        for subject in in_order:
            if subject.name in results.skipped:
                continue
            server = None
            if subject.start:
                rundir = workdir / f"{subject.name}-{run}"
                rundir.mkdir()
                progress(f"run {run}/{settings.runs} {subject.name}: starting")
                try:
                    server = subject.start(rundir)
                except procs.StartError as exc:
                    results.skipped[subject.name] = f"did not start: {exc}"
                    progress(f"{subject.name} skipped: {exc}")
                    continue
            try:
                measure_subject(settings, results, run, subject.name,
                                measure.Target(origins.port, server, origins.pid), origins,
                                loadgen)
            finally:
                if server:
                    stopped = procs.stop_server(server)
                    results.notes.extend(f"{subject.name}, run {run}: {note}" for note in stopped)
            results.runs[subject.name] = run
    return results


def header(settings: Settings, started: datetime.datetime, origin_version: str,
           nofile: int) -> list[str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines
                if line.startswith("model name")), platform.machine())
    chosen = subjects.by_names(settings.subjects)
    return [
        f"# geproxy bench, {started:%Y-%m-%d %H:%M:%S}",
        "",
        f"- machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; client, origin and proxy share the cores",
        f"- origin: {origin_version}; the direct column is the origin without a proxy",
        f"- load: bench/loadgen.c (gcc {_tool_version(['gcc', '-dumpfullversion'], 0)}, one epoll "
        f"process), wrk {_tool_version(['wrk', '-v'], 1)} (-t{measure.WRK_THREADS})",
        f"- {settings.runs} run(s) per measure, median shown; {settings.seconds} s per rate "
        f"measure; every proxy started afresh for each run; descriptor limit {nofile:,} "
        "for the bench and every child",
        "- subjects, as they ran:",
        *(f"  - {subject.name}: {subject.setup}" for subject in chosen),
        "- ↑ higher is better, ↓ lower is better. A ratio column divides the first subject's "
        "median by the second's (best peer: the best of the other proxies for that row; a "
        "keep-alive rate of a proxy that sticks to the first host does not count); ✓/✗: the "
        "target in the last column is met or not",
    ]


def _tool_version(argv: list[str], word: int) -> str:
    """Word `word` of what `argv` prints, or why there is none."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    words = (done.stdout or done.stderr).split()
    return words[word] if len(words) > word else "unknown"


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so the finally blocks stop every child


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    subjects.by_names(settings.subjects)  # fail on a typo before building anything
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    nofile = procs.raise_nofile()
    started = datetime.datetime.now()
    with tempfile.TemporaryDirectory(prefix="geproxy-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # squid, after dropping root, reaches its dir below this one
        loadgen = procs.build_c(BENCH_DIR / "loadgen.c", workdir)
        try:
            origins = origin.start(settings.origin, workdir, settings.download_mib * 2**20,
                                   nofile)
        except procs.StartError as exc:
            raise SystemExit(f"bench: the origin did not start: {exc}") from exc
        progress(f"origin {origins.version} on ports {origins.port} (A) and {origins.port_b} "
                 f"(B); files in {workdir}")
        try:
            results = run_all(settings, workdir, loadgen, origins)
        finally:
            stopped = origins.stop()
        results.notes.extend(f"origin: {note}" for note in stopped)
    labels = {"clients": settings.clients, "mib": settings.download_mib}
    text = report.render(results, header(settings, started, origins.version, nofile), labels)
    print(text)
    settings.out.mkdir(parents=True, exist_ok=True)
    saved = settings.out / f"{started:%Y%m%d-%H%M%S}.md"
    saved.write_text(text)
    progress(f"saved {saved}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every child was stopped on the way out
        progress("interrupted")
        sys.exit(130)
