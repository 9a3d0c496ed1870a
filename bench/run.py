"""geproxy's benchmark: geproxy against no proxy and the other forward proxies, on loopback.

    python bench/run.py [--quick] [--subjects direct,geproxy-1,geproxy-auto,squid-1,...]
                        [--duration SECONDS] [--out bench/results/] [--origin auto]
                        [--tls | --tls-only]

Prints a markdown table and saves it as OUT/YYYYmmdd-HHMMSS.md; with --tls, the TLS tables
follow it (TLS listeners, HTTP/2 against HTTP/1.1), with --tls-only they come alone.
bench/README.md says what each row means. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import certs
import measure
import origin
import peers
import procs
import report
import subjects
import tlsmeasure

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
    main: bool = True   # the main table
    tls: bool = False   # the TLS section


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
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--tls", action="store_true",
                      help="after the main table, the TLS section: cycles and download through "
                           "TLS listeners, 1,000 tunnels over HTTP/2 against HTTP/1.1")
    part.add_argument("--tls-only", action="store_true", help="the TLS section alone")
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
        main=not args.tls_only,
        tls=args.tls or args.tls_only,
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
    run_steps(settings, results, run, name, target.proxy, steps)


def run_steps(settings: Settings, results: report.Results, run: int, name: str,
              proxy: procs.Server | None,
              steps: list[tuple[str, Callable[[], measure.Reading]]]) -> None:
    """Each step in turn, its reading (or its error, as a note) added to results; the
    steps stop when the proxy exits."""
    for step, run_step in steps:
        progress(f"run {run}/{settings.runs} {name}: {step}")
        try:
            reading = run_step()
        except measure.MeasureError as exc:
            reading = measure.Reading(notes=[f"{step}: {exc}"])
        results.add(name, run, reading)
        code = proxy.process.poll() if proxy else None
        if code is not None:
            results.notes.append(f"{name}, run {run}: exited with code {code} during {step}")
            return


def run_all(settings: Settings, workdir: Path, loadgen: Path,
            origins: origin.Origins) -> report.Results:
    chosen = subjects.by_names(settings.subjects)
    results = _results(chosen, lambda subject: subject.start is not None,
                       lambda subject: subject.missing(), lambda subject: subject.version())
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


def _results(chosen: list[subjects.Subject], is_proxy: Callable[[subjects.Subject], bool],
             missing: Callable[[subjects.Subject], str | None],
             version: Callable[[subjects.Subject], str]) -> report.Results:
    """The results of a table of `chosen` subjects, before any run: the peers, the proxies
    (`is_proxy`), and each one's version, or the reason it is skipped (`missing`)."""
    results = report.Results(
        [subject.name for subject in chosen],
        peers=[subject.name for subject in chosen if subject.kind == subjects.PEER],
        proxies=[subject.name for subject in chosen if is_proxy(subject)],
    )
    for subject in chosen:
        reason = missing(subject)
        if reason:
            results.skipped[subject.name] = reason
        else:
            results.versions[subject.name] = version(subject)
    return results


def tls_subjects(settings: Settings) -> list[subjects.Subject]:
    """The chosen subjects that the TLS section measures: direct (the origin's TLS server)
    and those with a TLS listener."""
    return [subject for subject in subjects.by_names(settings.subjects)
            if subject.kind == subjects.DIRECT or subject.start_tls is not None]


def run_tls(settings: Settings, workdir: Path, generators: tlsmeasure.Generators,
            origins: origin.Origins, tls: certs.TLSFiles
            ) -> tuple[report.Results, report.Results | None]:
    """The TLS section: each TLS subject through both its listeners; then, when geproxy-1
    is chosen, its held tunnels over HTTP/2 and over HTTP/1.1."""
    chosen = tls_subjects(settings)

    def missing(subject: subjects.Subject) -> str | None:
        if subject.start_tls is None and not origins.tls_port:
            return subject.missing() or "the built-in origin has no TLS server (nginx is needed)"
        return subject.missing()

    results = _results(chosen, lambda subject: subject.start_tls is not None, missing,
                       _tls_version)
    for run in range(1, settings.runs + 1):
        for subject in chosen:
            if subject.name not in results.skipped:
                _tls_subject_run(settings, results, run, subject, workdir, generators, origins,
                                 tls)
    start = next((subject.start_tls for subject in chosen if subject.name == "geproxy-1"), None)
    if start is None or "geproxy-1" not in results.versions or "geproxy-1" in results.skipped:
        return results, None
    ways = [tlsmeasure.H2, tlsmeasure.H1]
    tunnels = report.Results(ways, proxies=ways)
    for run in range(1, settings.runs + 1):
        for how in ways:
            _tunnels_run(settings, tunnels, run, how, start, workdir, generators, origins, tls)
    return results, tunnels


def _tls_version(subject: subjects.Subject) -> str:
    version = subject.version()
    if subject.name.startswith("squid"):
        library = peers.squid_tls_library()
        return f"{version} ({library})" if library else version
    return version


def _tls_subject_run(settings: Settings, results: report.Results, run: int,
                     subject: subjects.Subject, workdir: Path,
                     generators: tlsmeasure.Generators, origins: origin.Origins,
                     tls: certs.TLSFiles) -> None:
    """One run of one subject, started afresh with its TLS listener: plain cycles and TLS
    cycles, then the plain download and the TLS one, each pair back to back."""
    name = subject.name
    server = None
    if subject.start_tls:
        rundir = workdir / f"tls-{name}-{run}"
        rundir.mkdir(mode=0o755)
        progress(f"TLS run {run}/{settings.runs} {name}: starting")
        try:
            server = subject.start_tls(rundir, tls)
        except procs.StartError as exc:
            results.skipped[name] = f"did not start: {exc}"
            progress(f"{name} skipped: {exc}")
            return
    target = tlsmeasure.TLSTarget(server.tls_port if server else origins.tls_port, origins.port,
                                  tls.ca, server, origins.pid)
    size = settings.download_mib * 2**20
    steps: list[tuple[str, Callable[[], measure.Reading]]] = [
        ("plain cycles", lambda: measure.cycles(generators.loadgen, target.plain(),
                                                settings.clients, settings.seconds)),
        ("TLS cycles", lambda: tlsmeasure.tls_cycles(generators.tlsgen, target,
                                                     settings.clients, settings.seconds)),
        ("plain download", lambda: tlsmeasure.plain_download(generators.loadgen, target, size)),
        ("TLS download", lambda: tlsmeasure.tls_download(generators.tlsgen, target, size)),
    ]
    try:
        run_steps(settings, results, run, name, server, steps)
    finally:
        if server:
            stopped = procs.stop_server(server)
            results.notes.extend(f"{name}, run {run}: {note}" for note in stopped)
    results.runs[name] = run


def _tunnels_run(settings: Settings, tunnels: report.Results, run: int, how: str,
                 start: Callable[[Path, certs.TLSFiles], procs.Server], workdir: Path,
                 generators: tlsmeasure.Generators, origins: origin.Origins,
                 tls: certs.TLSFiles) -> None:
    """Held tunnels one way (HTTP/2 or HTTP/1.1) on a geproxy-1 started for them alone."""
    rundir = workdir / f"tunnels-{how}-{run}"
    rundir.mkdir(mode=0o755)
    progress(f"TLS run {run}/{settings.runs} geproxy-1: {tlsmeasure.TUNNELS:,} tunnels over {how}")
    try:
        server = start(rundir, tls)
    except procs.StartError as exc:
        tunnels.notes.append(f"{how}, run {run}: geproxy-1 did not start: {exc}")
        return
    target = tlsmeasure.TLSTarget(server.tls_port, origins.port, tls.ca, server, origins.pid)
    try:
        run_steps(settings, tunnels, run, how, server,
                  [(f"held tunnels over {how}",
                    lambda: tlsmeasure.held_tunnels(generators, how, target))])
    finally:
        stopped = procs.stop_server(server)
        tunnels.notes.extend(f"{how}, run {run}: {note}" for note in stopped)
    tunnels.runs[how] = run


def tls_header(settings: Settings) -> list[str]:
    """What the TLS section's figures are, for the report."""
    chosen = {subject.name for subject in tls_subjects(settings)}
    without = [name for name in subjects.by_names(settings.subjects)
               if name.name not in chosen]
    options = ", ".join(f"`{key} = {value}`" for key, value in
                        subjects.GEPROXY_TLS_OPTIONS.items())
    lines = [
        "## Through the TLS listener",
        "",
        f"- certificate: {certs.DESCRIPTION}; OpenSSL {_tool_version(['openssl', 'version'], 1)} "
        f"on both sides (geproxy's Python: {ssl.OPENSSL_VERSION})",
        f"- load: bench/tlsgen.c ({settings.clients} clients, one epoll process, OpenSSL): a full "
        "handshake each cycle (no session resumption), the certificate verified, no ALPN "
        "(HTTP/1.1), close_notify at the end; the TLS agreed is in its row",
        f"- geproxy: a `tls://` listener beside the plain one in the same process, `[tls]` "
        f"{options}; each subject runs its plain cycles, then its TLS cycles, then the plain "
        "download and the TLS one, on one process started afresh for each run",
        "- squid: `https_port` with `tls-cert=` and `tls-key=` beside its `http_port`",
        "- direct: the origin's own TLS server (nginx, tickets and session cache off) answers "
        "`GET /` itself: no CONNECT, no tunnel; its plain rows are the origin's plain port. "
        "This column is what TLS costs without a proxy, and the TLS load generator check below "
        "reads it",
    ]
    if without:
        lines.append("- not measured here, no TLS listener in the bench: "
                     + ", ".join(subject.name for subject in without))
    return lines + [""]


def tunnels_header() -> list[str]:
    """What the held-tunnels table measures, for the report."""
    return [
        f"### {tlsmeasure.TUNNELS:,} tunnels over HTTP/2 against HTTP/1.1 (geproxy-1)",
        "",
        f"geproxy-1 started afresh for each column and run; {tlsmeasure.WARMUP_TUNNELS} "
        "tunnels of the same kind opened and closed first (the first HTTP/2 connection "
        f"imports geproxy's HTTP/2 code), then {tlsmeasure.TUNNELS:,} opened, "
        f"{tlsmeasure.OPENING} at a time, each after one small exchange (CONNECT, 200, "
        "`GET /` and its answer through the tunnel), and held idle: RSS and CPU per tunnel. "
        f"Then {tlsmeasure.BULK_ROUNDS} rounds of {tlsmeasure.BULK_TUNNELS} of them each "
        "reading 1 MiB at once. HTTP/2: bench/h2gen.c, one connection (ALPN h2), each tunnel "
        "a CONNECT stream. HTTP/1.1: bench/tlsgen.c, a TLS connection (full handshake) each.",
        "",
    ]


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
    if settings.tls and certs.missing():
        raise SystemExit(f"bench: {certs.missing()}")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    nofile = procs.raise_nofile()
    started = datetime.datetime.now()
    results: report.Results | None = None
    tls_results: tuple[report.Results, report.Results | None] | None = None
    with tempfile.TemporaryDirectory(prefix="geproxy-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # squid, after dropping root, reaches its dir below this one
        generators = build_generators(settings, workdir)
        tls = certs.make(workdir / "tls") if settings.tls else None
        try:
            origins = origin.start(settings.origin, workdir, settings.download_mib * 2**20,
                                   nofile, tls)
        except procs.StartError as exc:
            raise SystemExit(f"bench: the origin did not start: {exc}") from exc
        progress(f"origin {origins.version} on ports {origins.port} (A) and {origins.port_b} "
                 f"(B){f', TLS {origins.tls_port}' if origins.tls_port else ''}; "
                 f"files in {workdir}")
        try:
            if settings.main:
                results = run_all(settings, workdir, generators.loadgen, origins)
            if tls:
                tls_results = run_tls(settings, workdir, generators, origins, tls)
        finally:
            stopped = origins.stop()
        notes = [f"origin: {note}" for note in stopped]
    text = render(settings, started, origins.version, nofile, results, tls_results, notes)
    print(text)
    settings.out.mkdir(parents=True, exist_ok=True)
    saved = settings.out / f"{started:%Y%m%d-%H%M%S}.md"
    saved.write_text(text)
    progress(f"saved {saved}")
    return 0


def build_generators(settings: Settings, workdir: Path) -> tlsmeasure.Generators:
    """The C load generators: the TLS ones (linked with OpenSSL) only for a TLS run."""
    loadgen = procs.build_c(BENCH_DIR / "loadgen.c", workdir)
    if not settings.tls:
        return tlsmeasure.Generators(loadgen, Path(), Path())
    libs = ("-lssl", "-lcrypto")
    return tlsmeasure.Generators(loadgen, procs.build_c(BENCH_DIR / "tlsgen.c", workdir, libs),
                                 procs.build_c(BENCH_DIR / "h2gen.c", workdir, libs))


def render(settings: Settings, started: datetime.datetime, origin_version: str, nofile: int,
           results: report.Results | None,
           tls_results: tuple[report.Results, report.Results | None] | None,
           origin_notes: list[str]) -> str:
    """The whole report: the header, the main table, the TLS section."""
    labels: dict[str, object] = {
        "clients": settings.clients, "mib": settings.download_mib,
        "tunnels": tlsmeasure.TUNNELS, "opening": tlsmeasure.OPENING,
        "bulk": tlsmeasure.BULK_TUNNELS,
    }
    lines = header(settings, started, origin_version, nofile)
    if results is not None:
        results.notes.extend(origin_notes)
        lines.append(report.render(results, [], labels).rstrip("\n"))
    if tls_results is not None:
        tls_table, tunnels = tls_results
        if results is None:
            tls_table.notes.extend(origin_notes)
        lines += ["", *tls_header(settings),
                  *report.render_tls(tls_table, tunnels, labels, tunnels_header())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every child was stopped on the way out
        progress("interrupted")
        sys.exit(130)
