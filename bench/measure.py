"""The measures. Each runs once against one subject and returns a Reading; run.py repeats
them and reports medians. All traffic goes to 127.0.0.1; every child has a timeout.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs

WARMUP_SECONDS = 1
HOLD_OPENING = 100        # tunnels being opened at once by the idle-RSS measure
HOLD_SECONDS = 120.0      # bound on opening them, and again on holding them
DOWNLOAD_SECONDS = 120.0  # bound on the one-tunnel download
SLACK = 30.0              # subprocess timeout beyond a child's own bound
WRK_THREADS = 2


class MeasureError(Exception):
    """A measure could not produce a number; the message goes to the table's notes."""


@dataclass(frozen=True)
class Target:
    """Where the load goes: through proxy to the origin, or (proxy None) straight to it."""

    origin_port: int
    proxy: procs.Server | None

    def loadgen_args(self) -> list[str]:
        return ["-p", str(self.proxy.port if self.proxy else 0), "-o", str(self.origin_port)]


@dataclass
class Reading:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_loadgen(loadgen: Path, args: list[str], timeout: float) -> dict[str, Any]:
    """Run the load generator to its end and return its JSON line."""
    try:
        done = subprocess.run([str(loadgen), *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"loadgen {' '.join(args)} ran over {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise MeasureError(f"loadgen failed ({done.returncode}): {done.stderr.strip()[:200]}")
    return _json_line(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")


def _json_line(line: str) -> dict[str, Any]:
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"unreadable output {line[:120]!r}") from exc
    if not isinstance(parsed, dict):
        raise MeasureError(f"unreadable output {line[:120]!r}")
    return parsed


def _error_note(what: str, result: dict[str, Any]) -> list[str]:
    errors = int(result["errors"])
    return [f"{what}: {errors} errors, first: {result['first_error']}"] if errors else []


def cycles(loadgen: Path, target: Target, clients: int, seconds: int) -> Reading:
    """CONNECT + GET + close cycles on `clients` connections, and the proxy's CPU for them."""
    args = ["-m", "cycles", *target.loadgen_args(), "-c", str(clients)]
    run_loadgen(loadgen, [*args, "-d", str(WARMUP_SECONDS)], WARMUP_SECONDS + SLACK)
    pid = target.proxy.pid if target.proxy else None
    cpu_before = procs.cpu_seconds(pid) if pid else 0.0
    result = run_loadgen(loadgen, [*args, "-d", str(seconds)], seconds + SLACK)
    cpu_after = procs.cpu_seconds(pid) if pid else 0.0
    done = float(result["cycles"])
    if done == 0:
        raise MeasureError(f"no cycle completed; first error: {result['first_error']}")
    reading = Reading({
        "cycles_s": done / float(result["seconds"]),
        "p50_ms": float(result["p50_ms"]),
        "p99_ms": float(result["p99_ms"]),
    }, _error_note("cycles", result))
    if pid:
        reading.values["cpu_per_1000"] = (cpu_after - cpu_before) / done * 1000
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
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + SLACK)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"wrk ran over {seconds + SLACK:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        said = (done.stderr or done.stdout).strip()[:200]
        raise MeasureError(f"wrk failed ({done.returncode}): {said}")
    result = _json_line(lines[-1].removeprefix("BENCH "))
    counts = {key: int(result[key]) for key in ("connect", "read", "write", "status", "timeout")}
    answered = int(result["requests"]) - counts["status"]
    errors = {key: count for key, count in counts.items() if count}
    if answered <= 0:
        raise MeasureError(f"wrk: no request answered with 2xx/3xx, errors {errors}")
    notes = [f"wrk: {answered} answered, errors {errors}"] if errors else []
    return Reading({"rps": answered / (int(result["duration_us"]) / 1e6)}, notes)


def idle_rss(loadgen: Path, origin_port: int, proxy: procs.Server, count: int) -> Reading:
    """The proxy's RSS growth per idle CONNECT tunnel, with `count` tunnels open at once."""
    pid = proxy.pid
    args = ["-m", "hold", *Target(origin_port, proxy).loadgen_args(), "-n", str(count),
            "-c", str(HOLD_OPENING), "-d", str(HOLD_SECONDS)]
    before = procs.rss_bytes(pid)
    holder = subprocess.Popen([str(loadgen), *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        opened = _json_line(_read_line(holder, HOLD_SECONDS + SLACK))
        after = procs.rss_bytes(pid)
        if holder.stdin:
            holder.stdin.close()  # releases the tunnels
        held = _json_line(_read_line(holder, SLACK))
        holder.wait(timeout=SLACK)
    finally:
        procs.stop(holder)
    open_count = int(opened["open"])
    if open_count == 0:
        raise MeasureError(f"no tunnel opened; first error: {opened['first_error']}")
    reading = Reading({"kib_per_tunnel": (after - before) / open_count / 1024},
                      _error_note(f"idle tunnels ({open_count} of {count} open)", opened))
    if held["closed_while_held"]:
        reading.notes.append(f"idle tunnels: {held['closed_while_held']} closed while held")
    return reading


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
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
