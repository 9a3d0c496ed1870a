"""The measures. Each runs once against one subject and returns a Reading; run.py repeats
them and reports medians. All traffic goes to 127.0.0.1; every child has a timeout.
"""

from __future__ import annotations

import json
import resource
import select
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs

WARMUP_SECONDS = 1
TUNNEL_LEVELS = (1000, 5000, 9000)  # idle tunnels open at once when the RSS is read
HOLD_OPENING = 100        # tunnels being opened at once by the idle-RSS measure
HOLD_SECONDS = 120.0      # bound on opening each step of them
SETTLE_SECONDS = 3.0      # bound on waiting for the RSS to stop growing after a step
DOWNLOAD_SECONDS = 120.0  # bound on the one-tunnel download
SLACK = 30.0              # subprocess timeout beyond a child's own bound
WRK_THREADS = 2
ROUTING_TIMEOUT = 10.0    # per socket operation of the routing check
ANSWER_MAX = 1 << 16      # the routing check's answers are tiny; more is an error

# The routing check's verdicts (Reading.flags["routing"]).
ROUTES = "routes each request"
STICKS = "sticks to the first host"
CLOSES = "closes after each request"


class MeasureError(Exception):
    """A measure could not produce a number; the message goes to the table's notes."""


@dataclass(frozen=True)
class Target:
    """Where the load goes: through proxy to the origin, or (proxy None) straight to it."""

    origin_port: int
    proxy: procs.Server | None
    origin_pid: int = 0  # the origin's process, for its CPU time; 0: not measured

    def loadgen_args(self) -> list[str]:
        return ["-p", str(self.proxy.port if self.proxy else 0), "-o", str(self.origin_port)]


@dataclass
class Reading:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)  # verdicts, e.g. "routing"


class CpuMeter:
    """CPU seconds (user + system) used between start and stop by a process tree (the
    proxy, all its workers), and by the origin."""

    def __init__(self, target: Target) -> None:
        self.pids = {"proxy": target.proxy.pid if target.proxy else 0,
                     "origin": target.origin_pid}
        self.before = self._now()

    def _now(self) -> dict[str, float]:
        return {what: procs.cpu_seconds(pid) for what, pid in self.pids.items() if pid}

    def per_1000(self, done: float, suffix: str) -> dict[str, float]:
        """{"proxy_cpu_SUFFIX": s, "origin_cpu_SUFFIX": s} per 1,000 of `done` since start."""
        after = self._now()
        return {f"{what}_cpu_{suffix}": (after[what] - self.before[what]) / done * 1000
                for what in after}


def run_loadgen(loadgen: Path, args: list[str], timeout: float) -> dict[str, Any]:
    """Run the load generator to its end and return its JSON line."""
    try:
        done = subprocess.run([str(loadgen), *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"loadgen {' '.join(args)} ran over {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise MeasureError(f"loadgen failed ({done.returncode}): {done.stderr.strip()[:200]}")
    return json_line(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")


def json_line(line: str) -> dict[str, Any]:
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"unreadable output {line[:120]!r}") from exc
    if not isinstance(parsed, dict):
        raise MeasureError(f"unreadable output {line[:120]!r}")
    return parsed


def error_note(what: str, result: dict[str, Any]) -> list[str]:
    errors = int(result["errors"])
    return [f"{what}: {errors} errors, first: {result['first_error']}"] if errors else []


def cycles(loadgen: Path, target: Target, clients: int, seconds: int) -> Reading:
    """CONNECT + GET + close cycles on `clients` connections, and the proxy's CPU for them."""
    args = ["-m", "cycles", *target.loadgen_args(), "-c", str(clients)]
    run_loadgen(loadgen, [*args, "-d", str(WARMUP_SECONDS)], WARMUP_SECONDS + SLACK)
    meter = CpuMeter(target)
    result = run_loadgen(loadgen, [*args, "-d", str(seconds)], seconds + SLACK)
    done = float(result["cycles"])
    if done == 0:
        raise MeasureError(f"no cycle completed; first error: {result['first_error']}")
    reading = Reading({
        "cycles_s": done / float(result["seconds"]),
        "p50_ms": float(result["p50_ms"]),
        "p99_ms": float(result["p99_ms"]),
        "loadgen_cpu_cycles": float(result["cpu_s"]) / done * 1000,
        **meter.per_1000(done, "cycles"),
    }, error_note("cycles", result))
    return reading


def throughput(loadgen: Path, target: Target, size: int) -> Reading:
    """One GET of `size` body bytes through one tunnel (or direct), read to nowhere."""
    args = ["-m", "download", *target.loadgen_args(), "-u", "/big", "-d", str(DOWNLOAD_SECONDS)]
    result = run_loadgen(loadgen, args, DOWNLOAD_SECONDS + SLACK)
    if int(result["cycles"]) != 1 or int(result["answer_bytes"]) < size:
        raise MeasureError(f"download incomplete; first error: {result['first_error']}")
    return Reading({"mb_s": size / float(result["seconds"]) / 1e6})


def wrk_rate(script: Path, target: Target, connections: int, seconds: int) -> Reading:
    """Keep-alive GETs with wrk: absolute-form through the proxy, origin-form direct.

    The rate counts 2xx/3xx answers only; wrk's error counts go to the notes.
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        raise MeasureError("wrk not installed (apt-get install wrk)")
    origin = f"127.0.0.1:{target.origin_port}"
    if target.proxy:
        url, path = f"http://127.0.0.1:{target.proxy.port}/", f"http://{origin}/"
    else:
        url, path = f"http://{origin}/", "/"
    argv = [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
            url, "--", path, origin]
    meter = CpuMeter(target)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's CPU: the child reaped
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + SLACK)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"wrk ran over {seconds + SLACK:.0f} s") from exc
    wrk_cpu = _cpu_since(children)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        said = (done.stderr or done.stdout).strip()[:200]
        raise MeasureError(f"wrk failed ({done.returncode}): {said}")
    result = json_line(lines[-1].removeprefix("BENCH "))
    counts = {key: int(result[key]) for key in ("connect", "read", "write", "status", "timeout")}
    answered = int(result["requests"]) - counts["status"]
    errors = {key: count for key, count in counts.items() if count}
    if answered <= 0:
        raise MeasureError(f"wrk: no request answered with 2xx/3xx, errors {errors}")
    notes = [f"wrk: {answered} answered, errors {errors}"] if errors else []
    return Reading({
        "rps": answered / (int(result["duration_us"]) / 1e6),
        "wrk_cpu_requests": wrk_cpu / answered * 1000,
        **meter.per_1000(answered, "requests"),
    }, notes)


def cpu_apart(loadgen: Path, target: Target, clients: int, seconds: int,
              cycles: bool = True, keepalive: bool = True) -> dict[str, float]:
    """The rates of CONNECT cycles (after the warm-up `cycles` has too) and of keep-alive
    requests, and the proxy's CPU per item in ms: user space and kernel apart, and their sum
    (`cycle_user`, `cycle_sys`, `cycle_total`; `request_user`, ...)."""
    assert target.proxy is not None
    pid, found = target.proxy.pid, {}
    wrk_script = Path(__file__).resolve().parent / "wrk_absolute.lua"
    if cycles:
        args = ["-m", "cycles", *target.loadgen_args(), "-c", str(clients)]
        run_loadgen(loadgen, [*args, "-d", str(WARMUP_SECONDS)], WARMUP_SECONDS + SLACK)
        before = procs.cpu_split(pid)
        result = run_loadgen(loadgen, [*args, "-d", str(seconds)], seconds + SLACK)
        done = float(result["cycles"])
        if not done:
            raise MeasureError(f"no cycle completed; first error: {result['first_error']}")
        found.update(_per_item("cycle", before, procs.cpu_split(pid), done))
        found["cycles_s"] = done / float(result["seconds"])
    if keepalive:
        before = procs.cpu_split(pid)
        reading = wrk_rate(wrk_script, target, clients, seconds)
        found.update(_per_item("request", before, procs.cpu_split(pid),
                               reading.values["rps"] * seconds))
        found["rps"] = reading.values["rps"]
    return found


def _per_item(what: str, before: tuple[float, float], after: tuple[float, float],
              items: float) -> dict[str, float]:
    user, system = ((after[i] - before[i]) / items * 1000 for i in (0, 1))
    return {f"{what}_user": user, f"{what}_sys": system, f"{what}_total": user + system}


def _cpu_since(before: resource.struct_rusage) -> float:
    """CPU seconds of the children reaped since `before` (RUSAGE_CHILDREN)."""
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (now.ru_utime - before.ru_utime) + (now.ru_stime - before.ru_stime)


def idle_rss(loadgen: Path, origin_port: int, proxy: procs.Server,
             levels: tuple[int, ...]) -> Reading:
    """The proxy's RSS (its process tree) per idle CONNECT tunnel with each of `levels`
    tunnels open at once: (RSS at N - RSS at 0) / N, N the tunnels actually open."""
    pid = proxy.pid
    args = ["-m", "hold", *Target(origin_port, proxy).loadgen_args(), "-n", str(max(levels)),
            "-c", str(HOLD_OPENING), "-d", str(HOLD_SECONDS)]
    base = procs.rss_bytes(pid)
    reading = Reading()
    holder = subprocess.Popen([str(loadgen), *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for level in sorted(levels):
            if holder.stdin is None:
                raise MeasureError("loadgen has no stdin pipe")
            holder.stdin.write(f"{level}\n")
            holder.stdin.flush()
            opened = json_line(read_line(holder, HOLD_SECONDS + SLACK))
            rss = settled_rss(pid)
            open_count = int(opened["open"])
            if open_count == 0:
                raise MeasureError(f"no tunnel opened; first error: {opened['first_error']}")
            reading.values[f"kib_per_tunnel_{level}"] = (rss - base) / open_count / 1024
            if open_count < level:
                reading.notes.append(f"idle tunnels: {open_count} of {level} open, "
                                     f"{opened['errors']} failed, first: {opened['first_error']}")
            if open_count < level * 0.9:
                break  # the next levels would only repeat the failure
        if holder.stdin:
            holder.stdin.close()  # releases the tunnels
        held = json_line(read_line(holder, SLACK))
        holder.wait(timeout=SLACK)
    finally:
        procs.stop(holder)
    if held["closed_while_held"]:
        reading.notes.append(f"idle tunnels: {held['closed_while_held']} closed while held")
    return reading


def settled_rss(pid: int) -> int:
    """The RSS once it stops growing (two readings 0.2 s apart within 0.5%), or after
    SETTLE_SECONDS: a proxy may still be setting up the last tunnels it answered."""
    rss = procs.rss_bytes(pid)
    for _ in range(int(SETTLE_SECONDS / 0.2)):
        time.sleep(0.2)
        later = procs.rss_bytes(pid)
        if later <= rss * 1.005:
            return max(rss, later)
        rss = later
    return rss


def routing(proxy: procs.Server, port_a: int, port_b: int) -> Reading:
    """Two absolute-form requests on one client connection, to origin A then origin B.

    The verdict (flags["routing"]): ROUTES when B answers the second, STICKS when A does
    (the proxy relays the rest of the connection to the first host), CLOSES when the proxy
    ends the connection after the first answer.
    """
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), ROUTING_TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first, closing = _ask(sock, port_a)
            if "origin A" not in first:
                raise MeasureError(f"routing check: the first answer was {first[:80]!r}")
            if closing:
                return Reading(flags={"routing": CLOSES})
            try:
                second, _ = _ask(sock, port_b)
            except (ConnectionError, EOFError):
                return Reading(flags={"routing": CLOSES})
    except (OSError, EOFError) as exc:
        raise MeasureError(f"routing check: {exc!r}") from exc
    if "origin B" in second:
        return Reading(flags={"routing": ROUTES})
    if "origin A" in second:
        return Reading(flags={"routing": STICKS})
    raise MeasureError(f"routing check: the second answer was {second[:80]!r}")


def _ask(sock: socket.socket, port: int) -> tuple[str, bool]:
    """GET http://127.0.0.1:PORT/ on sock; (the 200's body, whether the proxy said it closes).

    EOFError when the connection ends before any byte of the answer; MeasureError on an
    answer other than a 200 with a Content-Length.
    """
    host = f"127.0.0.1:{port}"
    sock.sendall(f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            if data:
                raise MeasureError(f"routing check: answer cut after {data[:80]!r}")
            raise EOFError
        data += chunk
        if len(data) > ANSWER_MAX:
            raise MeasureError("routing check: answer head too long")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    if lines[0].split()[1:2] != ["200"] or not fields.get("content-length", "").isdigit():
        raise MeasureError(f"routing check: answer {lines[0]!r} to GET http://{host}/")
    length = int(fields["content-length"])
    if length > ANSWER_MAX:
        raise MeasureError(f"routing check: a body of {length} bytes")
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise MeasureError("routing check: body cut")
        body += chunk
    connection = fields.get("connection", "")
    closing = "close" in connection or (
        lines[0].startswith("HTTP/1.0") and "keep-alive" not in connection)
    return body.decode("latin-1"), closing


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, waiting at most `timeout` seconds for it."""
    if process.stdout is None:
        raise MeasureError("loadgen has no stdout pipe")
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise MeasureError(f"loadgen said nothing for {timeout:.0f} s")
    line = process.stdout.readline()
    if not line:
        stderr = process.stderr.read() if process.stderr else ""
        raise MeasureError(f"loadgen ended early: {stderr.strip()[:200]}")
    return line
