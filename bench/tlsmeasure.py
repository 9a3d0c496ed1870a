"""The TLS measures, each once against one running subject, returning a measure.Reading as
the plain ones do: CONNECT cycles and one tunnel's download through a TLS listener
(bench/tlsgen.c), and tunnels held open over TLS, one HTTP/1.1 connection each (tlsgen.c)
or all as streams of one HTTP/2 connection (bench/h2gen.c). All traffic goes to 127.0.0.1;
every child has a timeout.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import measure
import procs
from measure import MeasureError, Reading

TUNNELS = 1000            # tunnels held open at once in the HTTP/2 vs HTTP/1.1 measure
BULK_TUNNELS = 100        # of those, how many GET BULK_PATH at once, in each round
BULK_PATH = "/1m"         # 1 MiB from the origin
BULK_ROUNDS = 4           # rounds of BULK_TUNNELS x 1 MiB: enough CPU ticks to divide
WARMUP_TUNNELS = 10       # opened and closed on the fresh proxy before its RSS is read
OPENING = 100             # tunnels being opened at once
HOLD_SECONDS = 120.0      # bound on each step of the held tunnels
H1, H2 = "h1", "h2"       # the two ways of carrying the held tunnels


@dataclass(frozen=True)
class Generators:
    """The C load generators, built for this run."""

    loadgen: Path   # plain: bench/loadgen.c
    tlsgen: Path    # HTTP/1.1 over TLS: bench/tlsgen.c
    h2gen: Path     # HTTP/2: bench/h2gen.c


@dataclass(frozen=True)
class TLSTarget:
    """Where the TLS load goes: a proxy's TLS listener, tunnelling to the origin; or, with
    proxy None, the origin's own TLS server, asked directly (the direct column)."""

    tls_port: int
    origin_port: int
    ca: Path
    proxy: procs.Server | None
    origin_pid: int = 0

    def args(self) -> list[str]:
        origin = self.origin_port if self.proxy else 0  # 0: GET from the TLS server itself
        return ["-p", str(self.tls_port), "-o", str(origin), "-a", str(self.ca)]

    def plain(self) -> measure.Target:
        """The same subject through its plain listener (or the origin's plain port)."""
        return measure.Target(self.origin_port, self.proxy, self.origin_pid)


def tls_cycles(tlsgen: Path, target: TLSTarget, clients: int, seconds: int) -> Reading:
    """TLS handshake + CONNECT + GET + close cycles on `clients` connections, and the
    proxy's CPU for them."""
    args = ["-m", "cycles", *target.args(), "-c", str(clients)]
    warmup = measure.WARMUP_SECONDS
    measure.run_loadgen(tlsgen, [*args, "-d", str(warmup)], warmup + measure.SLACK)
    meter = measure.CpuMeter(target.plain())
    result = measure.run_loadgen(tlsgen, [*args, "-d", str(seconds)], seconds + measure.SLACK)
    done = float(result["cycles"])
    if done == 0:
        raise MeasureError(f"no TLS cycle completed; first error: {result['first_error']}")
    return Reading({
        "tls_cycles_s": done / float(result["seconds"]),
        "tls_p50_ms": float(result["p50_ms"]),
        "tls_p99_ms": float(result["p99_ms"]),
        "tlsgen_cpu_tls_cycles": float(result["cpu_s"]) / done * 1000,
        **meter.per_1000(done, "tls_cycles"),
    }, measure.error_note("TLS cycles", result), {"tls": str(result["tls"])})


def plain_download(loadgen: Path, target: TLSTarget, size: int) -> Reading:
    """One tunnel's download through the plain listener, with the proxy's CPU per GB."""
    meter = measure.CpuMeter(target.plain())
    reading = measure.throughput(loadgen, target.plain(), size)
    reading.values.update(meter.per_1000(size / 1e6, "gb"))  # per 1,000 MB
    return reading


def tls_download(tlsgen: Path, target: TLSTarget, size: int) -> Reading:
    """One GET of `size` body bytes through one tunnel of the TLS listener (or from the
    TLS server itself), read to nowhere; the CPU per GB of the proxy and of the client."""
    meter = measure.CpuMeter(target.plain())
    args = ["-m", "download", *target.args(), "-u", "/big", "-d", str(measure.DOWNLOAD_SECONDS)]
    result = measure.run_loadgen(tlsgen, args, measure.DOWNLOAD_SECONDS + measure.SLACK)
    if int(result["cycles"]) != 1 or int(result["answer_bytes"]) < size:
        raise MeasureError(f"TLS download incomplete; first error: {result['first_error']}")
    megabytes = size / 1e6
    return Reading({
        "tls_mb_s": megabytes / float(result["seconds"]),
        "tlsgen_cpu_tls_gb": float(result["cpu_s"]) / megabytes * 1000,
        **meter.per_1000(megabytes, "tls_gb"),
    })


def held_tunnels(generators: Generators, how: str, target: TLSTarget) -> Reading:
    """TUNNELS tunnels opened on the fresh proxy, each after one small exchange, then held:
    over HTTP/2 (`how` H2: streams of one connection) or HTTP/1.1 (H1: a TLS connection
    each). The proxy's RSS and CPU per tunnel; then BULK_ROUNDS rounds of BULK_TUNNELS of
    them each reading 1 MiB at once: MB/s and the CPU per MB, of the proxy and the client.

    A few tunnels of the same kind are opened and closed first: the first HTTP/2
    connection makes the proxy import its HTTP/2 code, which is not a cost per tunnel.
    """
    proxy = target.proxy
    if proxy is None:
        raise MeasureError("held tunnels need a proxy")
    if how == H2:
        argv = [str(generators.h2gen), *target.args()]
    else:
        argv = [str(generators.tlsgen), "-m", "hold", *target.args()]
    argv += ["-n", str(TUNNELS), "-c", str(OPENING), "-d", str(HOLD_SECONDS)]
    _warm_up(argv)
    base_rss, base_cpu = procs.rss_bytes(proxy.pid), procs.cpu_seconds(proxy.pid)
    reading = Reading()
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        opened = _command(holder, str(TUNNELS))
        count = int(opened["open"])
        if count == 0:
            raise MeasureError(f"no tunnel opened; first error: {opened['first_error']}")
        rss, cpu = measure.settled_rss(proxy.pid), procs.cpu_seconds(proxy.pid)
        reading.values.update({
            "kib_per_tunnel": (rss - base_rss) / count / 1024,
            "cpu_ms_per_tunnel": (cpu - base_cpu) / count * 1000,
            "open_s": float(opened["seconds"]),
            "client_cpu_ms_per_tunnel": float(opened["cpu_s"]) / count * 1000,
        })
        if count < TUNNELS:
            reading.notes.append(f"{how}: {count} of {TUNNELS} tunnels open, first error: "
                                 f"{opened['first_error']}")
        reading.values.update(_bulk(holder, proxy, float(opened["cpu_s"]), reading.notes, how))
        if holder.stdin:
            holder.stdin.close()  # releases the tunnels
        held = measure.json_line(measure.read_line(holder, measure.SLACK))
        holder.wait(timeout=measure.SLACK)
    finally:
        procs.stop(holder)
    if held["closed_while_held"]:
        reading.notes.append(f"{how}: {held['closed_while_held']} tunnels closed while held")
    return reading


def _bulk(holder: subprocess.Popen[str], proxy: procs.Server, client_cpu: float,
          notes: list[str], how: str) -> dict[str, float]:
    """BULK_ROUNDS rounds of `get BULK_PATH BULK_TUNNELS` on the held tunnels."""
    cpu = procs.cpu_seconds(proxy.pid)
    moved = seconds = 0.0
    got: dict[str, Any] = {"cpu_s": client_cpu}
    for _ in range(BULK_ROUNDS):
        got = _command(holder, f"get {BULK_PATH} {BULK_TUNNELS}")
        moved += float(got["bytes"])
        seconds += float(got["seconds"])
        if int(got["done"]) < BULK_TUNNELS:
            notes.append(f"{how}: {got['done']} of {BULK_TUNNELS} downloads done in a round, "
                         f"first error: {got['first_error']}")
            break
    if moved == 0:
        raise MeasureError(f"no download through the held tunnels: {got.get('first_error')}")
    megabytes = moved / 1e6
    return {
        "bulk_mb_s": megabytes / seconds,
        "proxy_cpu_ms_per_mb": (procs.cpu_seconds(proxy.pid) - cpu) / megabytes * 1000,
        "client_cpu_ms_per_mb": (float(got["cpu_s"]) - client_cpu) / megabytes * 1000,
    }


def _warm_up(argv: list[str]) -> None:
    """Open WARMUP_TUNNELS tunnels with the generator and close them again."""
    try:
        done = subprocess.run(argv, input=f"{WARMUP_TUNNELS}\n", capture_output=True, text=True,
                              timeout=HOLD_SECONDS + measure.SLACK)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError("warm-up tunnels ran over their bound") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise MeasureError(f"warm-up failed ({done.returncode}): {done.stderr.strip()[:200]}")
    first = measure.json_line(lines[0])
    if int(first["open"]) < WARMUP_TUNNELS:
        raise MeasureError(f"warm-up: {first['open']} of {WARMUP_TUNNELS} tunnels opened; "
                           f"first error: {first['first_error']}")


def _command(holder: subprocess.Popen[str], line: str) -> dict[str, Any]:
    """Send one command to the holding generator and read its answer."""
    if holder.stdin is None:
        raise MeasureError("generator has no stdin pipe")
    holder.stdin.write(f"{line}\n")
    holder.stdin.flush()
    return measure.json_line(measure.read_line(holder, HOLD_SECONDS + measure.SLACK))
