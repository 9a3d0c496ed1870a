"""The gevent floor: what the least a gevent proxy can do costs, beside geproxy, in one run.

    python bench/floor.py                 # 3 rounds of 5 s per measure, ~4 minutes
    python bench/floor.py --rounds 5 --seconds 8 --save
    python bench/floor.py --work 25,50,100 --only-floors   # what Python work costs in a proxy

The yardstick (`serve` below, started as `python bench/floor.py serve PORT [--timeouts]`) is
a forward proxy reduced to what the bench's loads need and nothing else: a greenlet per
client connection, CONNECT answered with a 200 and relayed by two greenlets, absolute-form
GETs sent upstream in origin-form on one upstream connection per client connection
(another host: another connection), Content-Length bodies only. No parsing beyond the
request line, no checks, no hooks, no pool, no logging, no error answers. With
`--timeouts` every socket also gets a timeout, as a proxy's sockets must have: that is a
gevent.Timeout armed and cancelled for every wait that blocks.

It answers what the rates of the bench leave open: how much of a proxy's CPU per request
the kernel takes whatever the proxy is written in, how much gevent itself takes, and how far
above both geproxy is. Each subject (the two yardsticks, geproxy-1 with the bench's config
and with the audited one of the performance targets (subjects.py: every request logged as
JSON to a file and checked by a `dst` rule),
and tinyproxy, privoxy and squid-1 when installed) runs the bench's loads in turn, round
after round: CONNECT cycles from bench/loadgen.c and keep-alive requests from wrk, 50
clients each; the table gives medians of the proxy's CPU per item, user space and kernel
apart. Not a subject of run.py: the yardstick is no proxy anyone could deploy, and it would
be the best "peer" of every rate.

``--work 25,50`` adds yardsticks that do a fixed amount of plain Python work per request
and per CONNECT (``floor +25 µs``: as many loop turns as took 25 µs on this machine at their
start, so a busy moment costs them the same work, not the same wall time). They answer
what a proxy's own per-request work costs it under this load: each request's work, and the
waits and wakeups that grow as the rate it allows falls (the table after the ratios).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import measure
import origin
import procs
import subjects

BENCH_DIR = Path(__file__).resolve().parent
CLIENTS = 50
IDLE = 600.0  # the yardstick's socket timeout with --timeouts, as the bench's geproxy


def calibrate(microseconds: float) -> int:
    """Turns of ``work``'s loop that take ``microseconds`` on this machine now (the best of
    5 tries of 20,000 turns: the least disturbed)."""
    import time

    best = min(_timed(work, 20_000, time.perf_counter) for _ in range(5))
    return max(1, round(microseconds * 20_000 / (best * 1e6)))


def _timed(func: Callable[[int], int], turns: int, clock: Callable[[], float]) -> float:
    started = clock()
    func(turns)
    return clock() - started


def work(turns: int) -> int:
    """Plain Python work: ``turns`` turns of arithmetic and a dict (a proxy's work is
    attribute and dict look-ups, calls and small objects, not one long C call)."""
    state = {"x": 7}
    for turn in range(turns):
        state["x"] = (state["x"] * 31 + turn) & 0xFFFF
    return state["x"]


def serve(port: int, timeouts: bool, work_us: float = 0.0) -> None:
    """Run the yardstick on 127.0.0.1:port until killed; ``work_us``: that much plain
    Python work per request and per CONNECT."""
    turns = calibrate(work_us) if work_us else 0
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from gevent import socket
    from gevent.server import StreamServer

    def prepare(sock: Any) -> Any:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if timeouts:
            sock.settimeout(IDLE)
        return sock

    def dial(host: bytes, port: int) -> Any:
        sock = prepare(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.connect((host.decode("ascii"), port))
        return sock

    def relay(src: Any, dst: Any) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read_head(sock: Any, buf: bytes) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise EOFError
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        return head, rest

    def handle(client: Any, _: Any) -> None:
        prepare(client)
        upstream, upstream_key, buf = None, None, b""
        try:
            while True:
                head, buf = read_head(client, buf)
                if turns:
                    work(turns)
                lines = head.split(b"\r\n")
                method, target, _version = lines[0].split(b" ")
                if method == b"CONNECT":
                    host, _, port_text = target.rpartition(b":")
                    tunnel = dial(host, int(port_text))
                    client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    back = gevent.spawn(relay, tunnel, client)
                    relay(client, tunnel)
                    back.join()
                    tunnel.close()
                    return
                authority, _, path = target[len(b"http://"):].partition(b"/")
                host, _, port_text = authority.partition(b":")
                if upstream is None or upstream_key != authority:
                    if upstream is not None:
                        upstream.close()
                    upstream, upstream_key = dial(host, int(port_text or b"80")), authority
                out = [b"%s /%s HTTP/1.1" % (method, path)]
                out += [line for line in lines[1:]
                        if not line.lower().startswith((b"proxy-", b"connection"))]
                upstream.sendall(b"\r\n".join(out) + b"\r\n\r\n")
                answer, body = read_head(upstream, b"")
                length = 0
                for line in answer.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                while len(body) < length:
                    data = upstream.recv(65536)
                    if not data:
                        raise EOFError
                    body += data
                client.sendall(answer + b"\r\n\r\n" + body)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            if upstream is not None:
                upstream.close()
            client.close()

    StreamServer(("127.0.0.1", port), handle, backlog=4096).serve_forever()


YARDSTICKS = ("floor", "floor with timeouts")
#: ``floor +50 µs``: the floor with that much Python work per request (``--work``).
WORKING = "floor +{} µs"
PEERS = ("tinyproxy", "privoxy", "squid-1")  # measured too, when installed


def start(name: str, workdir: Path) -> procs.Server:
    """A yardstick, geproxy-1 (the bench's config) or a peer, each in a work dir of its own."""
    home = workdir / name.replace(" ", "-")
    home.mkdir(exist_ok=True)
    home.chmod(0o755)  # squid, after dropping root, reaches it
    if name in YARDSTICKS or name.startswith("floor +"):
        port = procs.free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "serve", str(port)]
        if name == "floor with timeouts":
            argv.append("--timeouts")
        elif name != "floor":
            argv += ["--work", name.split()[1].lstrip("+")]
        return procs.start_server(home.name, argv, port, home)
    subject = subjects.by_names([name])[0]
    assert subject.start is not None
    return subject.start(home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serving = sub.add_parser("serve", help="run the yardstick proxy (used by the measure)")
    serving.add_argument("port", type=int)
    serving.add_argument("--timeouts", action="store_true")
    serving.add_argument("--work", type=float, default=0.0,
                         help="µs of plain Python work per request and per CONNECT")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="per measure (default 5)")
    parser.add_argument("--save", action="store_true",
                        help="also save the table as bench/results/floor-YYYYmmdd-HHMMSS.md")
    parser.add_argument("--work", default="",
                        help="comma-separated µs: also the floor with that much Python work "
                             "per request (floor +N µs)")
    parser.add_argument("--only-floors", action="store_true",
                        help="the yardsticks alone: no geproxy, no peers")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.timeouts, args.work)
        return 0
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        parser.error("--rounds 1-20, --seconds 1-60")
    try:
        amounts = [int(text) for text in args.work.split(",") if text.strip()]
    except ValueError:
        parser.error("--work: whole microseconds, comma-separated (25,50,100)")
    if not all(1 <= amount <= 10_000 for amount in amounts):
        parser.error("--work: 1-10000 µs each")
    names = [*YARDSTICKS, *(WORKING.format(amount) for amount in amounts)]
    if not args.only_floors:
        names += ["geproxy-1", "geproxy-1-audited",
                  *(subject.name for subject in subjects.by_names(list(PEERS))
                    if subject.missing() is None)]
    started = datetime.datetime.now()
    found: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="geproxy-floor-") as tmp:
        origins = in_rounds(Path(tmp), names, start, args.rounds, args.seconds, found)
        versions = {name: subjects.by_names([name])[0].version() for name in names
                    if not name.startswith("floor")}
    text = "\n".join([
        f"# geproxy's gevent floor, {started:%Y-%m-%d %H:%M:%S}", "",
        f"- machine: {procs.machine()}; load generator, origin ({origins.version}) and "
        "proxy share the cores",
        "- versions: " + "; ".join(f"{name}: {version}" for name, version in versions.items()),
        "", render(args, found), ""])
    procs.publish(text, "floor", started, args.save)
    return 0


def in_rounds(workdir: Path, names: list[str], start: Callable[[str, Path], procs.Server],
              rounds: int, seconds: int, found: dict[str, list[dict[str, float]]],
              ) -> origin.Origins:
    """Measure each of ``names`` (started by ``start(name, workdir)``, stopped after) in
    turn, round after round, into ``found[name]`` (measure.cpu_apart's figures), against
    one origin started for all in ``workdir``; returns that origin, stopped."""
    workdir.chmod(0o755)
    loadgen = procs.build_c(BENCH_DIR / "loadgen.c", workdir)
    origins = origin.start("auto", workdir, 2**20, procs.raise_nofile())
    try:
        for number in range(rounds):
            for name in names:
                server = start(name, workdir)
                target = measure.Target(origins.port, server, origins.pid)
                try:
                    found[name].append(measure.cpu_apart(loadgen, target, CLIENTS, seconds))
                finally:
                    procs.stop_server(server)
                print(f"round {number + 1} {name}: {found[name][-1]}", file=sys.stderr)
    finally:
        origins.stop()
    return origins


def render(args: argparse.Namespace, found: dict[str, list[dict[str, float]]]) -> str:
    """One row per subject: rates, and proxy CPU per item in user space and in the kernel."""
    lines = [f"{args.rounds} rounds of {args.seconds} s per measure, {CLIENTS} clients "
             "(bench/loadgen.c cycles, wrk keep-alive), medians; CPU in ms per item, "
             "user / kernel (utime / stime of the process tree)", "",
             "| subject | CONNECT cycles/s | cycle: user | cycle: kernel | cycle: total "
             "| keep-alive req/s | request: user | request: kernel | request: total |",
             "|---|" + "---:|" * 8]
    for name, runs in found.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        cells = [f"{medians['cycles_s']:,.0f}",
                 *(f"{medians[key]:.3f}" for key in ("cycle_user", "cycle_sys", "cycle_total")),
                 f"{medians['rps']:,.0f}",
                 *(f"{medians[key]:.3f}"
                   for key in ("request_user", "request_sys", "request_total"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    measured = [name for name in found if name.startswith("geproxy")]
    if measured:
        lines += ["", "The targets' ratios, round by round (each round measures every subject "
                  "in turn): the median of the rounds' ratios and their range", "",
                  "| subject | keep-alive request ÷ floor | CONNECT cycle ÷ floor with "
                  "timeouts |", "|---|---:|---:|"]
    for name in measured:
        cells = [_ratio(found, name, "floor", "request_total"),
                 _ratio(found, name, "floor with timeouts", "cycle_total")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    working = [name for name in found if name.startswith("floor +")]
    if working and found.get("floor"):
        lines += ["", "What Python work per request costs a gevent proxy under this load: "
                  "each working floor's CPU per keep-alive request above the floor's, "
                  "round by round (median and range), and that over the work added", "",
                  "| subject | work added, µs | above the floor, µs | ÷ the work added |",
                  "|---|---:|---:|---:|"]
        for name in working:
            added = float(name.split()[1].lstrip("+"))
            above = sorted((run["request_total"] - floor["request_total"]) * 1000
                           for run, floor in zip(found[name], found["floor"], strict=False))
            middle = statistics.median(above)
            lines.append(f"| {name} | {added:.0f} | {middle:.1f} ({above[0]:.1f}-"
                         f"{above[-1]:.1f}) | {middle / added:.2f} |")
    return "\n".join(lines)


def _ratio(found: dict[str, list[dict[str, float]]], name: str, base: str, key: str) -> str:
    """`name`'s `key` over `base`'s, per round: "median (lowest-highest)"."""
    ratios = [run[key] / floor[key]
              for run, floor in zip(found[name], found.get(base, []), strict=False)
              if floor.get(key)]
    if not ratios:
        return "n/a"
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    sys.exit(main())
