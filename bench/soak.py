"""geproxy's soak: bounded load with clients that abort anywhere, watching for leaks.

    python bench/soak.py [--duration 300 | --short] [--clients 32] [--seed N]
                         [--interval SECONDS] [--save] [--out bench/results/]

Starts geproxy (``python -m geproxy``, one process, an admin listener) and the test kit's
origin, each in a process of its own on loopback port 0, then runs client workers for the
duration: CONNECT tunnels, keep-alive GETs, POSTs, and clients that abort at a chosen point
or reset. The proxy's ``/debug/stats`` is sampled every few seconds into a table. Once the
load stops and the proxy settles, descriptors and greenlets must be back to their baseline
and RSS must not have grown past the bound, and the clients that did not abort must have
met no error: else it exits 1 and says why. bench/README.md tells more.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import procs  # noqa: E402
import subjects  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# -- what counts as growth -----------------------------------------------------------------
#: Descriptors the settled proxy may hold beyond its baseline and its pooled upstream
#: connections (one each, at most upstream_keepalive for the one origin).
FD_SLACK = 2
#: Greenlets beyond the baseline: the pool's sweeper while anything is pooled, and one spare.
GREENLET_SLACK = 2
#: RSS may grow between the first sample after the warm-up and the last by this much, or
#: by RSS_SLACK_FRACTION of the warm RSS if that is more. See bench/README.md for why.
RSS_SLACK_KIB = 8 * 1024
RSS_SLACK_FRACTION = 0.10
#: The share of the duration before the RSS reference sample: the peak concurrency and the
#: allocator's arenas are reached by then.
WARMUP_FRACTION = 0.2

# -- bounds on every wait ------------------------------------------------------------------
IO_TIMEOUT = 20.0  # one socket operation of a client
CYCLE_LIMIT = 60.0  # one whole cycle
SETTLE_LIMIT = 30.0  # for the proxy to come back to rest after the load
MAX_CYCLES = 1_000_000  # per worker
MAX_HEAD = 64 * 1024
RECV = 64 * 1024

#: Response sizes a non-aborting client asks for (the origin's /bytes/N and /chunked/N).
SIZES = (0, 1, 1000, 65504, 65536 + 17, 300_000)
POST_SIZES = (1, 10, 5000, 65536, 250_000)
#: A response large enough that a client stops reading in the middle of it.
BIG = 8 * 2**20
ABORT_POINTS = ("head", "connect_sent", "after_200", "mid_request_body", "before_response",
                "mid_response")


class Failure(Exception):
    """An answer the client did not expect: counted as an error of its kind."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


# -- the client side -----------------------------------------------------------------------


class Conn:
    """One client connection, with the bytes read past the last answer."""

    def __init__(self, address: tuple[str, int], tls: Any = None) -> None:
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        if tls is not None:  # --tls: a TLS listener, the handshake done here
            self.sock = tls.wrap_socket(self.sock, server_hostname=address[0])
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(RECV)
        self.buf += data
        return bool(data)

    def _need(self, size: int) -> None:
        while len(self.buf) < size:
            expect(self._fill(), "the proxy closed in the middle of an answer")

    def take(self, size: int) -> bytes:
        self._need(size)
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            expect(len(self.buf) < MAX_HEAD, "line too long")
            expect(self._fill(), "the proxy closed in the middle of a line")
        out, _, self.buf = self.buf.partition(b"\r\n")
        return out

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            expect(len(self.buf) < MAX_HEAD, "answer head too long")
            expect(self._fill(), "the proxy closed before an answer" if not self.buf
                   else "the proxy closed in the middle of an answer head")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        expect(len(parts) >= 2 and parts[0].startswith("HTTP/1.") and parts[1].isdigit(),
               f"bad status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def answer(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """The next final answer (1xx skipped) and its whole body."""
        status, headers = self.head()
        while 100 <= status < 200:
            status, headers = self.head()
        if method == "HEAD" or status in (204, 304):
            return status, headers, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            pieces = []
            while True:
                size = int(self.line().split(b";")[0], 16)
                if size == 0:
                    while self.line():  # trailer fields, then the empty line
                        pass
                    return status, headers, b"".join(pieces)
                pieces.append(self.take(size))
                expect(self.take(2) == b"\r\n", "bad chunk end")
        if "content-length" in headers:
            return status, headers, self.take(int(headers["content-length"]))
        while self._fill():  # delimited by the close
            expect(len(self.buf) <= 2 * BIG, "answer too long")
        body, self.buf = self.buf, b""
        return status, headers, body

    def read_some(self, size: int) -> None:
        while len(self.buf) < size and self._fill():
            pass

    def expect_eof(self) -> None:
        expect(not self.buf and not self._fill(), "bytes after the last answer")

    def close(self, rst: bool = False) -> None:
        if rst:  # an RST instead of a FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@dataclass
class Target:
    proxy: tuple[str, int]
    origin_port: int
    digests: dict[int, str]
    #: With --tls: the client side's ssl.SSLContext, trusting the proxy's certificate.
    tls: Any = None

    def conn(self) -> Conn:
        return Conn(self.proxy, self.tls)

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.origin_port}"

    def connect_head(self) -> bytes:
        return f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode()

    def request(self, method: str, path: str, absolute: bool = True, close: bool = False,
                extra: str = "") -> bytes:
        target = f"http://{self.authority}{path}" if absolute else path
        connection = "Connection: close\r\n" if close else ""
        return (f"{method} {target} HTTP/1.1\r\nHost: {self.authority}\r\n{connection}{extra}"
                "\r\n").encode()

    def check_bytes(self, answer: tuple[int, dict[str, str], bytes], size: int) -> None:
        status, _, body = answer
        expect(status == 200, f"status {status} for {size} bytes")
        expect(len(body) == size, f"{len(body)} bytes instead of {size}")
        expect(hashlib.sha256(body).hexdigest() == self.digests[size],
               f"the {size} bytes differ from the origin's")


def tunnel(t: Target, rng: random.Random) -> None:
    """CONNECT, then 1 to 3 GETs through the tunnel; the origin or the client closes."""
    conn = t.conn()
    try:
        conn.send(t.connect_head())
        status, _ = conn.head()
        expect(status == 200, f"CONNECT answered {status}")
        count = rng.randint(1, 3)
        last = rng.random() < 0.5  # the last request asks the origin to close
        for i in range(count):
            size = rng.choice(SIZES)
            conn.send(t.request("GET", f"/bytes/{size}", absolute=False,
                                close=last and i == count - 1))
            t.check_bytes(conn.answer(), size)
        if last:
            conn.expect_eof()  # the origin's FIN comes through the tunnel
    finally:
        conn.close()


def keepalive(t: Target, rng: random.Random) -> None:
    """2 to 6 plain requests on one connection: lengths, chunked, HEAD, a 404."""
    conn = t.conn()
    try:
        count = rng.randint(2, 6)
        last = rng.random() < 0.5
        for i in range(count):
            close = last and i == count - 1
            size = rng.choice(SIZES)
            choice = rng.randrange(5)
            if choice < 2:
                path = f"/{'bytes' if choice == 0 else 'chunked'}/{size}"
                conn.send(t.request("GET", path, close=close))
                t.check_bytes(conn.answer(), size)
            elif choice == 2:
                conn.send(t.request("HEAD", f"/bytes/{size}", close=close))
                status, headers, body = conn.answer("HEAD")
                expect(status == 200 and headers.get("content-length") == str(size)
                       and not body, f"HEAD: {status} {headers.get('content-length')}")
            else:
                path = "/status/404" if choice == 3 else "/"
                conn.send(t.request("GET", path, close=close))
                status, _, body = conn.answer()
                wanted = (404, b"status\n") if choice == 3 else (200, b"hello\n")
                expect((status, body) == wanted, f"GET {path}: {status} {body[:40]!r}")
        if last:
            conn.expect_eof()
    finally:
        conn.close()


def post(t: Target, rng: random.Random) -> None:
    """A POST whose body the origin hashes: Content-Length, chunked, or Expect first."""
    size = rng.choice(POST_SIZES)
    body = rng.randbytes(size)
    mode = rng.choice(("length", "chunked", "expect"))
    conn = t.conn()
    try:
        framing = ("Transfer-Encoding: chunked\r\n" if mode == "chunked"
                   else f"Content-Length: {size}\r\n")
        if mode == "expect":
            framing += "Expect: 100-continue\r\n"
        conn.send(t.request("POST", "/sha256", extra=framing))
        if mode == "expect":
            status, _ = conn.head()
            expect(status == 100, f"Expect answered {status}")
        sent = 0
        while sent < size:
            piece = body[sent: sent + rng.randint(1, 100_000)]
            sent += len(piece)
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if mode == "chunked" else piece)
        if mode == "chunked":
            conn.send(b"0\r\n\r\n")
        status, _, answer = conn.answer("POST")
        expect(status == 200, f"POST answered {status}")
        seen = json.loads(answer)
        expect(seen == {"length": size, "sha256": hashlib.sha256(body).hexdigest()},
               f"the origin got {seen}")
    finally:
        conn.close()


def abort(t: Target, rng: random.Random, point: str, rst: bool) -> None:
    """Go as far as ``point``, then close (with an RST when ``rst``). What comes before the
    point is checked like any client's."""
    conn = t.conn()
    try:
        if point == "head":
            head = t.request("GET", "/bytes/1000")
            conn.send(head[: rng.randint(1, len(head) - 1)])
        elif point == "connect_sent":
            conn.send(t.connect_head())
        elif point == "after_200":
            conn.send(t.connect_head())
            status, _ = conn.head()
            expect(status == 200, f"CONNECT answered {status}")
        elif point == "mid_request_body":
            size = 200_000
            conn.send(t.request("POST", "/sha256", extra=f"Content-Length: {size}\r\n"))
            conn.send(rng.randbytes(rng.randrange(size)))
        elif point == "before_response":
            conn.send(t.request("GET", rng.choice(("/sleep/0.05", f"/bytes/{BIG}", "/"))))
        else:  # mid_response, in a tunnel or plain
            absolute = rng.random() < 0.5
            if not absolute:
                conn.send(t.connect_head())
                status, _ = conn.head()
                expect(status == 200, f"CONNECT answered {status}")
            conn.send(t.request("GET", f"/bytes/{BIG}", absolute=absolute))
            status, _ = conn.head()
            expect(status == 200, f"GET answered {status}")
            conn.read_some(rng.randrange(512 * 1024))
    finally:
        conn.close(rst)


def pick(rng: random.Random) -> tuple[str, Callable[[Target, random.Random], None]]:
    """A cycle: 25% tunnels, 25% keep-alive GETs, 20% POSTs, 20% aborts, 10% resets."""
    roll = rng.random()
    if roll < 0.25:
        return "tunnel", tunnel
    if roll < 0.5:
        return "keepalive", keepalive
    if roll < 0.7:
        return "post", post
    point = rng.choice(ABORT_POINTS)
    rst = roll >= 0.9
    return f"{'rst' if rst else 'abort'}:{point}", (
        lambda t, r: abort(t, r, point, rst))


@dataclass
class Tally:
    cycles: int = 0
    done: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def error(self, kind: str, exc: BaseException) -> None:
        self.errors[kind] += 1
        seen = self.examples.setdefault(kind, [])
        if len(seen) < 3:
            seen.append(f"{type(exc).__name__}: {exc}")


def worker(index: int, seed: int, deadline: float, t: Target, tally: Tally) -> None:
    rng = random.Random(f"{seed}:{index}")  # each worker's choices replay with the seed
    for _ in range(MAX_CYCLES):
        if time.monotonic() >= deadline:
            return
        kind, run = pick(rng)
        try:
            with gevent.Timeout(CYCLE_LIMIT, Failure(f"cycle over {CYCLE_LIMIT:g} s")):
                run(t, rng)
        except (OSError, ValueError, Failure) as exc:  # any fault of the exchange
            tally.error(kind, exc)
        else:
            tally.done[kind] += 1
        tally.cycles += 1


# -- the processes -------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the soak dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(name: str, argv: list[str], workdir: Path,
          wanted: dict[str, str]) -> tuple[subprocess.Popen, Path, dict[str, tuple[str, int]]]:
    """Start ``argv`` with its output in workdir/NAME.log; wait (bounded) until its log has
    a line for each regex of ``wanted`` (host and port groups); returns those addresses."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=REPO,
                                   start_new_session=True,
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509 (no thread)
    found: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + procs.READY_TIMEOUT
    for _ in range(procs.READY_ATTEMPTS):
        text = log.read_text(errors="replace")
        for key, regex in wanted.items():
            match = re.search(regex, text)
            if match:
                found[key] = (match.group(1).strip("[]"), int(match.group(2)))
        if len(found) == len(wanted):
            return process, log, found
        if process.poll() is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    procs.stop(process)
    raise procs.StartError(f"{name} did not start: {procs.last_line(log)}")


def serve_origin() -> int:
    """The child process of ``--serve-origin``: the test kit's origin on a port of its own."""
    from geproxy.testing import start_origin

    origin = start_origin()
    origin.seen = collections.deque(maxlen=16)  # type: ignore[assignment]  # bounded
    print(f"origin listening on 127.0.0.1:{origin.port}", file=sys.stderr, flush=True)
    origin.server.serve_forever()
    return 0


def proxy_config(tls_chain: str = "") -> str:
    """The bench's geproxy config (subjects.py), on port 0, one process, an admin port; with
    ``tls_chain`` (--tls), a TLS listener with that certificate too."""
    text = subjects.geproxy_config(0).replace(
        "[geproxy]\n", "[geproxy]\nworkers = 1\nadmin_listen = 127.0.0.1:0\n", 1)
    if tls_chain:
        text = re.sub(r"^listen = (.*)$", r"listen = \1, tls://127.0.0.1:0", text, count=1,
                      flags=re.M)
        text += f"\n[tls]\ncertificate = {tls_chain}\n"
    return text


def fetch_stats(admin: tuple[str, int]) -> dict[str, Any]:
    conn = Conn(admin)
    try:
        conn.send(b"GET /debug/stats HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        status, _, body = conn.answer()
    finally:
        conn.close()
    expect(status == 200, f"/debug/stats answered {status}")
    return json.loads(body)  # type: ignore[no-any-return]


# -- the run -------------------------------------------------------------------------------

COLUMNS = ("time s", "cycles", "rss_kib", "open_fds", "greenlets", "connections", "tunnels",
           "upstream_pool")


@dataclass
class Sample:
    at: float
    cycles: int
    stats: dict[str, Any]

    def row(self) -> str:
        cells = [f"{self.at:.0f}", str(self.cycles)] + [str(self.stats[key])
                                                        for key in COLUMNS[2:]]
        return "| " + " | ".join(cells) + " |"


@dataclass
class Settings:
    duration: float
    clients: int
    seed: int
    interval: float
    save: bool
    out: Path
    tls: bool = False


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0,
                        help="seconds of load (default 300)")
    parser.add_argument("--short", action="store_true",
                        help="the CI version: 30 s of load, samples every 3 s")
    parser.add_argument("--clients", type=int, default=32,
                        help="concurrent client workers (default 32)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the clients' choices (default: from the clock)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between samples (default 5, 3 with --short)")
    parser.add_argument("--save", action="store_true",
                        help="save the report as OUT/soak-YYYYmmdd-HHMMSS.md")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory for --save (default bench/results/)")
    parser.add_argument("--tls", action="store_true",
                        help="every client speaks TLS to a tls:// listener of the proxy")
    parser.add_argument("--serve-origin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_origin:
        raise SystemExit(serve_origin())
    duration = 30.0 if args.short else args.duration
    interval = args.interval or (3.0 if args.short else 5.0)
    if duration <= 0 or interval <= 0 or not 1 <= args.clients <= 1000:
        parser.error("--duration and --interval must be positive, --clients 1 to 1000")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    return Settings(duration, args.clients, seed, interval, args.save, args.out, args.tls)


class Report:
    """Lines printed as they come and kept for --save."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)


def run(settings: Settings, workdir: Path, say: Report) -> list[str]:
    """The soak; returns the reasons it failed (none: it passed)."""
    from geproxy.testing.data import pattern_sha256

    origin, _, found = start("origin", [sys.executable, str(Path(__file__).resolve()),
                                        "--serve-origin"], workdir,
                             {"origin": r"origin listening on (\S+):(\d+)"})
    conf = workdir / "geproxy.ini"
    client_tls = None
    wanted = {"proxy": r"listening on (\S+):(\d+)[;,]", "admin": r"admin listener on (\S+):(\d+)"}
    if settings.tls:
        import ssl

        from certs import make  # bench/certs.py

        files = make(workdir / "tls")
        conf.write_text(proxy_config(str(files.chain)))
        client_tls = ssl.create_default_context(cafile=str(files.ca))
        wanted["proxy"] = r"tls://(\S+):(\d+)[;,]"
    else:
        conf.write_text(proxy_config())
    try:
        proxy, proxy_log, addresses = start(
            "geproxy", [sys.executable, "-m", "geproxy", "--config", str(conf)], workdir,
            wanted)
    except procs.StartError:
        procs.stop(origin)
        raise
    failures: list[str] = []
    try:
        target = Target(addresses["proxy"], found["origin"][1],
                        {size: pattern_sha256(size) for size in SIZES}, client_tls)
        failures += _load_and_judge(settings, target, addresses["admin"], proxy, proxy_log,
                                    say)
    finally:
        stopping = time.monotonic()
        procs.stop(proxy)
        procs.stop(origin)
        say(f"proxy stopped (SIGTERM) in {time.monotonic() - stopping:.1f} s: exit status "
            f"{proxy.returncode}")
    if proxy.returncode != 0:
        failures.append(f"the proxy's exit status was {proxy.returncode}")
    return failures


def _load_and_judge(settings: Settings, t: Target, admin: tuple[str, int],
                    proxy: subprocess.Popen, proxy_log: Path, say: Report) -> list[str]:
    failures: list[str] = []
    baseline = fetch_stats(admin)
    say(f"proxy pid {baseline['pid']} on {t.proxy[0]}:{t.proxy[1]}, admin port {admin[1]}, "
        f"origin port {t.origin_port}; baseline: {baseline['open_fds']} descriptors, "
        f"{baseline['greenlets']} greenlets, {baseline['rss_kib']} KiB RSS")
    say()
    say("| " + " | ".join(COLUMNS) + " |")
    say("|" + "---:|" * len(COLUMNS))
    tally = Tally()
    started = time.monotonic()
    deadline = started + settings.duration
    workers = [gevent.spawn(worker, i, settings.seed, deadline, t, tally)
               for i in range(settings.clients)]
    samples = [Sample(0.0, 0, baseline)]
    say(samples[0].row())
    for _ in range(int(settings.duration / settings.interval) + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        gevent.sleep(min(settings.interval, left))
        if proxy.poll() is not None:
            break
        samples.append(Sample(time.monotonic() - started, tally.cycles, fetch_stats(admin)))
        say(samples[-1].row())
    gevent.joinall(workers, timeout=CYCLE_LIMIT + 5)
    for one in workers:
        if not one.dead or one.exception is not None:
            failures.append(f"a client worker failed: {one.exception!r}")
            one.kill(block=False)
    if proxy.poll() is not None:
        return failures + [f"the proxy exited during the load (status {proxy.returncode})"]

    # Back to rest: no connection, and descriptors and greenlets within the allowance.
    def allowed(stats: dict[str, Any]) -> tuple[int, int]:
        pooled = stats["upstream_pool"]
        return (baseline["open_fds"] + pooled + FD_SLACK,
                baseline["greenlets"] + (1 if pooled else 0) + GREENLET_SLACK)

    settle_deadline = time.monotonic() + SETTLE_LIMIT
    while True:
        final = fetch_stats(admin)
        fds, greenlets = allowed(final)
        rested = (final["connections"] == 0 and final["open_fds"] <= fds
                  and final["greenlets"] <= greenlets)
        if rested or time.monotonic() >= settle_deadline:
            break
        gevent.sleep(0.5)
    samples.append(Sample(time.monotonic() - started, tally.cycles, final))
    say(samples[-1].row() + " settled")

    say()
    say(f"{tally.cycles} cycles in {settings.duration:g} s by {settings.clients} clients:")
    say()
    say("| kind | done | errors | first errors |")
    say("|---|---:|---:|---|")
    for kind in sorted(set(tally.done) | set(tally.errors)):
        examples = "; ".join(tally.examples.get(kind, []))
        say(f"| {kind} | {tally.done[kind]} | {tally.errors[kind]} | {examples} |")
    say()
    if sum(tally.errors.values()):
        failures.append(f"{sum(tally.errors.values())} errors in cycles that did not abort "
                        "(or before their abort point): see the table")
    if not all(tally.done[kind] for kind in ("tunnel", "keepalive", "post")):
        failures.append("some kinds of cycle never completed")
    if final["connections"]:
        failures.append(f"{final['connections']} connections still open "
                        f"{SETTLE_LIMIT:g} s after the load")
    if final["open_fds"] > fds:
        failures.append(f"descriptors grew: {final['open_fds']}, allowed {fds} (baseline "
                        f"{baseline['open_fds']} + {final['upstream_pool']} pooled "
                        f"+ {FD_SLACK})")
    if final["greenlets"] > greenlets:
        failures.append(f"greenlets grew: {final['greenlets']}, allowed {greenlets} "
                        f"(baseline {baseline['greenlets']} + sweeper + {GREENLET_SLACK})")
    warm_at = settings.duration * WARMUP_FRACTION
    warm = next((s for s in samples if s.at >= warm_at), samples[-1])
    growth = final["rss_kib"] - warm.stats["rss_kib"]
    limit = max(RSS_SLACK_KIB, int(warm.stats["rss_kib"] * RSS_SLACK_FRACTION))
    peak = max(s.stats["rss_kib"] for s in samples)
    say(f"RSS: {warm.stats['rss_kib']} KiB at {warm.at:.0f} s (after the warm-up), "
        f"{final['rss_kib']} KiB at the end, growth {growth:+d} KiB (limit {limit} KiB), "
        f"peak {peak} KiB")
    say(f"descriptors: {baseline['open_fds']} before, {final['open_fds']} after (allowed "
        f"{fds}); greenlets: {baseline['greenlets']} before, {final['greenlets']} after "
        f"(allowed {greenlets}); upstream pool: {final['upstream_pool']}")
    if growth > limit:
        failures.append(f"RSS grew by {growth} KiB after the warm-up (limit {limit} KiB)")
    failures += _judge_log(proxy_log, say)
    return failures


def _judge_log(log: Path, say: Report) -> list[str]:
    """The proxy's own log: lines by level, its answers by cause (with a first example);
    a traceback or an ERROR line is a bug found."""
    levels: collections.Counter = collections.Counter()
    causes: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    bad: list[str] = []
    with log.open(errors="replace") as handle:
        for line in handle:
            level = re.match(r"\S+ \S+ ([A-Z]+) ", line)
            if level:
                levels[level.group(1)] += 1
            answer = re.search(r"\] (\d{3} \w+): (.*)", line)
            if answer:
                causes[answer.group(1)] += 1
                example.setdefault(answer.group(1), answer.group(2)[:120])
            if line.startswith("Traceback") or (level and level.group(1) in (
                    "ERROR", "CRITICAL")):
                bad.append(line.strip()[:200])
    say("proxy log lines: " + (", ".join(f"{n} {name}" for name, n in sorted(levels.items()))
                               or "none"))
    for cause, count in causes.most_common():
        say(f"- {count} × {cause}, e.g. {example[cause]}")
    if bad:
        return [f"the proxy logged {len(bad)} errors or tracebacks, the first: {bad[0]}"]
    return []


def header(settings: Settings, started: datetime.datetime) -> list[str]:
    version = subjects.by_names(["geproxy"])[0].version()
    machine = (f"- {version}; Python {platform.python_version()}, Linux {platform.release()}, "
               f"{os.cpu_count()} cores shared by the clients, the origin and the proxy")
    load = (f"- {settings.duration:g} s of load, {settings.clients} clients, seed "
            f"{settings.seed}, a sample every {settings.interval:g} s; `python bench/soak.py "
            f"--duration {settings.duration:g} --clients {settings.clients} --seed "
            f"{settings.seed}{' --tls' if settings.tls else ''}`"
            + ("; every client over TLS to a `tls://` listener" if settings.tls else ""))
    growth = (f"- growth: descriptors above baseline + pooled + {FD_SLACK}, greenlets above "
              f"baseline + sweeper + {GREENLET_SLACK}, RSS above the sample at "
              f"{WARMUP_FRACTION:.0%} of the run + max({RSS_SLACK_KIB // 1024} MiB, "
              f"{RSS_SLACK_FRACTION:.0%})")
    return [f"# geproxy soak, {started:%Y-%m-%d %H:%M:%S}", "", machine, load, growth, ""]


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    procs.raise_nofile()
    started = datetime.datetime.now()
    say = Report()
    for line in header(settings, started):
        say(line)
    with tempfile.TemporaryDirectory(prefix="geproxy-soak-") as tmp:
        runner = gevent.spawn(run, settings, Path(tmp), say)
        # SIGTERM ends the run the way an error would: every child is stopped on the way.
        gevent.signal_handler(signal.SIGTERM, runner.kill, SystemExit(128 + signal.SIGTERM),
                              False)
        try:
            failures = runner.get()
        except (OSError, ValueError, Failure, procs.StartError) as exc:
            failures = [f"the soak could not go on: {type(exc).__name__}: {exc}"]
        except KeyboardInterrupt:
            runner.kill(SystemExit(130))
            raise
    say()
    if failures:
        say("**FAILED**:")
        for reason in failures:
            say(f"- {reason}")
    else:
        say("**PASSED**: no growth, no error outside the aborts")
    if settings.save:
        settings.out.mkdir(parents=True, exist_ok=True)
        saved = settings.out / f"soak-{started:%Y%m%d-%H%M%S}.md"
        saved.write_text("\n".join(say.lines) + "\n")
        print(f"saved {saved}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        sys.exit(130)
