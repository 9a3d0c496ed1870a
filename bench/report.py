"""Collected readings and the markdown report made of them: the table (a row per measure, a
column per subject, then geproxy's ratios as the performance targets state them), the
load generator check and the notes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from measure import CLOSES, ROUTES, STICKS, TUNNEL_LEVELS, Reading
from tlsmeasure import H1, H2

BEST_PEER = "best peer"
AUTO, ONE = "geproxy-auto", "geproxy-1"
#: Below this many times the fastest proxy's rate, the load generator check warns.
SEVERAL = 3.0


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # may name {clients} or {mib}
    digits: int
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("cycles_s", "CONNECT cycles/s ({clients} clients)", 0, True),
    Metric("p50_ms", "CONNECT cycle latency p50, ms", 2, False),
    Metric("p99_ms", "CONNECT cycle latency p99, ms", 2, False),
    Metric("proxy_cpu_cycles", "proxy CPU s per 1,000 CONNECT cycles", 3, False),
    Metric("mb_s", "one tunnel download, MB/s ({mib} MiB)", 0, True),
    Metric("rps", "plain HTTP keep-alive req/s (wrk, {clients} conns)", 0, True),
    Metric("proxy_cpu_requests", "proxy CPU s per 1,000 keep-alive requests", 3, False),
    *(Metric(f"kib_per_tunnel_{level}", f"proxy RSS per idle tunnel, KiB ({level:,} open)", 1,
             False) for level in TUNNEL_LEVELS),
)


@dataclass(frozen=True)
class Ratio:
    """A ratio column: subject `ours` divided by subject `theirs` (or the best peer)."""

    ours: str
    theirs: str

    @property
    def label(self) -> str:
        return f"{self.ours} ÷ {self.theirs}"


RATIOS = (Ratio(AUTO, BEST_PEER), Ratio(ONE, "squid-1"), Ratio(ONE, "proxy.py"))
#: The targets, as ratios to reach or pass (a ↓ row would be "at most"; none has one yet).
RATIO_TARGETS: dict[str, dict[Ratio, float]] = {
    "cycles_s": {RATIOS[0]: 1.2, RATIOS[1]: 1.0, RATIOS[2]: 4.0},
    "mb_s": {RATIOS[0]: 1.3},
    "rps": {RATIOS[0]: 1.2, RATIOS[1]: 1.5},
}
#: Absolute targets for the geproxy subjects: at most this.
CEILINGS: dict[str, float] = {f"kib_per_tunnel_{max(TUNNEL_LEVELS)}": 10.0}


@dataclass
class Results:
    """Every reading of every run, by subject, in the order the subjects were asked for."""

    subjects: list[str]
    peers: list[str] = field(default_factory=list)  # the subjects "best peer" is chosen from
    proxies: list[str] = field(default_factory=list)  # every subject but direct
    versions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # subject -> reason
    runs: dict[str, int] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    flags: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, subject: str, run: int, reading: Reading) -> None:
        for key, value in reading.values.items():
            self.samples.setdefault(subject, {}).setdefault(key, []).append(value)
        for key, verdict in reading.flags.items():
            self.flags.setdefault(subject, {}).setdefault(key, []).append(verdict)
        self.notes.extend(f"{subject}, run {run}: {note}" for note in reading.notes)

    def median(self, subject: str, key: str) -> float | None:
        values = self.samples.get(subject, {}).get(key)
        return statistics.median(values) if values else None

    def routing(self, subject: str) -> str | None:
        """The routing verdict; a subject that stuck in any run sticks."""
        verdicts = self.flags.get(subject, {}).get("routing", [])
        for worst in (STICKS, CLOSES, ROUTES):
            if worst in verdicts:
                return worst
        return None

    def counted(self, subject: str, metric: Metric) -> bool:
        """Whether the subject's figure may be the best peer's (a keep-alive rate of a proxy
        that sticks to the first host may not: it does not route requests)."""
        return not (metric.key == "rps" and self.routing(subject) == STICKS)

    def best(self, metric: Metric, among: list[str],
             every: bool = False) -> tuple[str, float] | None:
        """The subject with the best median of `metric` among `among`, and that median;
        only those whose figure counts, unless `every`."""
        found = [(name, value) for name in among
                 if (every or self.counted(name, metric))
                 and (value := self.median(name, metric.key))]
        if not found:
            return None
        pick = max if metric.higher_is_better else min
        return pick(found, key=lambda item: item[1])


def render(results: Results, header: list[str], labels: dict[str, object]) -> str:
    """The markdown report: header lines, the table, the load generator check, the notes."""
    subjects = results.subjects
    ratios = [ratio for ratio in RATIOS if ratio.ours in subjects
              and (ratio.theirs in subjects or (ratio.theirs == BEST_PEER and results.peers))]
    columns = ["measure", *subjects, *(ratio.label for ratio in ratios), "target"]
    blank = ["" for _ in [*ratios, None]]
    rows = [
        ["version", *(results.versions.get(name, "—") for name in subjects), *blank],
        ["runs", *(_status(results, name) for name in subjects), *blank],
        ["keep-alive routing: 2 hosts on 1 client connection",
         *(_routing_cell(results, name) for name in subjects), *blank],
    ]
    for metric in METRICS:
        arrow = "↑" if metric.higher_is_better else "↓"
        row = [f"{metric.label.format(**labels)} {arrow}"]
        row += [_value_cell(results, name, metric) for name in subjects]
        row += [_ratio_cell(results, metric, ratio) for ratio in ratios]
        row.append(_target_cell(results, metric))
        rows.append(row)
    lines = [*header, "", _markdown_row(columns),
             _markdown_row(["---", *("---:" for _ in columns[1:-1]), "---"])]
    lines += [_markdown_row(row) for row in rows]
    lines += ["", *generator_check(results)]
    if results.notes:
        lines += ["", "Notes:", *(f"- {note}" for note in results.notes)]
    return "\n".join(lines) + "\n"


def _status(results: Results, subject: str) -> str:
    done = results.runs.get(subject, 0)
    reason = results.skipped.get(subject)
    if reason is None:
        return str(done)
    return f"{done}, then skipped: {reason}" if done else f"skipped: {reason}"


def _routing_cell(results: Results, subject: str) -> str:
    if subject not in results.proxies:
        return "—"
    verdict = results.routing(subject)
    if verdict is None:
        return "—"
    return {ROUTES: "✓ routes each request", STICKS: "✗ sticks to the first host",
            CLOSES: "closes after each request"}[verdict]


def _value_cell(results: Results, subject: str, metric: Metric) -> str:
    text = _number(results.median(subject, metric.key), metric.digits)
    if metric.key != "rps" or text == "—":
        return text
    verdict = results.routing(subject)
    if verdict == STICKS:
        return f"{text} (sticks to the first host: not counted)"
    if verdict == CLOSES:
        return f"{text} (a reconnect rate: it closes after each request)"
    return text


def _ratio_cell(results: Results, metric: Metric, ratio: Ratio) -> str:
    ours = results.median(ratio.ours, metric.key)
    if ratio.theirs == BEST_PEER:
        best = results.best(metric, results.peers)
        theirs, against = (best[1], f" vs {best[0]}") if best else (None, "")
    else:
        theirs, against = results.median(ratio.theirs, metric.key), ""
    if ours is None or not theirs:
        return "—"
    value = ours / theirs
    target = RATIO_TARGETS.get(metric.key, {}).get(ratio)
    mark = "" if target is None else (" ✓" if value >= target else " ✗")
    return f"{value:.2f}×{mark}{against}"


def _target_cell(results: Results, metric: Metric) -> str:
    wanted = RATIO_TARGETS.get(metric.key, {})
    parts = [f"{ratio.label} ≥ {target:.1f}×" for ratio, target in wanted.items()]
    ceiling = CEILINGS.get(metric.key)
    if ceiling is not None:
        marks = []
        for name in (ONE, AUTO):
            value = results.median(name, metric.key)
            if value is not None:
                marks.append(f"{name} {'✓' if value <= ceiling else '✗'}")
        parts.append(f"≤ {ceiling:g} KiB" + (f" ({', '.join(marks)})" if marks else ""))
    return "; ".join(parts)


def generator_check(results: Results) -> list[str]:
    """Lines on whether the load generator and the origin could be the limit: their rates
    straight at the origin (the direct column) against the fastest proxy's, and the CPU the
    generator needs per 1,000 (what one core of it could drive)."""
    if "direct" not in results.subjects or results.median("direct", "cycles_s") is None:
        return ["Load generator check: not made (the direct subject was not measured)."]
    lines = ["Load generator check (direct: no proxy, the same load straight at the origin):"]
    for key, tool, unit, cpu_key in (("cycles_s", "bench/loadgen.c", "cycles/s",
                                      "loadgen_cpu_cycles"),
                                     ("rps", "wrk", "req/s", "wrk_cpu_requests")):
        metric = next(metric for metric in METRICS if metric.key == key)
        direct = results.median("direct", key)
        fastest = results.best(metric, results.proxies, every=True)
        if direct is None or fastest is None:
            continue
        times = direct / fastest[1]
        line = (f"- {metric.label.split(' (')[0]}: {tool} reached {direct:,.0f} {unit} "
                f"direct, **{times:.1f}×** the fastest proxy ({fastest[0]}, {fastest[1]:,.0f})")
        cpu = results.median("direct", cpu_key)
        capacity = 1000 / cpu if cpu else None
        if cpu and capacity:
            line += (f"; it used {cpu:.3f} CPU s per 1,000 ({cpu * direct / 1000:.2f} of a core "
                     f"at that rate), so one core of it drives {capacity:,.0f} {unit}, "
                     f"**{capacity / fastest[1]:.1f}×** that proxy")
        if times < SEVERAL:
            line += (f". Under {SEVERAL:g}× direct: the cores the generator, the origin and "
                     "the proxy share cap the direct rate too")
            if capacity and capacity < SEVERAL * fastest[1]:
                line += ", and the generator itself is not several times faster"
        lines.append(line + ".")
    origin = [f"{results.median('direct', key):.3f} CPU s per 1,000 {what}"
              for key, what in (("origin_cpu_cycles", "cycles"),
                                ("origin_cpu_requests", "requests"))
              if results.median("direct", key) is not None]
    if origin:
        lines.append(f"- the origin itself, direct: {' and '.join(origin)}.")
    return lines


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


# --- the TLS section ---------------------------------------------------------------------

TLS_METRICS: tuple[Metric, ...] = (
    Metric("tls_cycles_s", "TLS CONNECT cycles/s ({clients} clients)", 0, True),
    Metric("tls_p50_ms", "TLS cycle latency p50, ms", 2, False),
    Metric("tls_p99_ms", "TLS cycle latency p99, ms", 2, False),
    Metric("proxy_cpu_tls_cycles", "proxy CPU s per 1,000 TLS cycles", 3, False),
    Metric("cycles_s", "plain CONNECT cycles/s, same process ({clients} clients)", 0, True),
    Metric("proxy_cpu_cycles", "proxy CPU s per 1,000 plain cycles", 3, False),
    Metric("tls_mb_s", "one tunnel download through TLS, MB/s ({mib} MiB)", 0, True),
    Metric("mb_s", "one tunnel download, plain listener, MB/s ({mib} MiB)", 0, True),
    Metric("proxy_cpu_tls_gb", "proxy CPU s per GB, TLS download", 2, False),
    Metric("proxy_cpu_gb", "proxy CPU s per GB, plain download", 2, False),
)


@dataclass(frozen=True)
class Quotient:
    """A row of each subject's median of `top` divided by its median of `bottom`."""

    label: str
    top: str
    bottom: str
    after: str  # the key of the row it follows


TLS_QUOTIENTS = (
    Quotient("TLS ÷ plain: cycles/s", "tls_cycles_s", "cycles_s", "proxy_cpu_cycles"),
    Quotient("TLS ÷ plain: CPU per cycle", "proxy_cpu_tls_cycles", "proxy_cpu_cycles",
             "proxy_cpu_cycles"),
    Quotient("TLS ÷ plain: download MB/s", "tls_mb_s", "mb_s", "mb_s"),
    Quotient("TLS ÷ plain: CPU per GB", "proxy_cpu_tls_gb", "proxy_cpu_gb", "proxy_cpu_gb"),
)
TLS_RATIOS = (Ratio(AUTO, BEST_PEER), Ratio(ONE, "squid-1"))

#: The held-tunnels table: its two columns (Results subjects: H2, H1) and rows.
TUNNEL_COLUMNS = {H2: "HTTP/2: {tunnels:,} tunnels on 1 connection",
                  H1: "HTTP/1.1: {tunnels:,} TLS connections, a tunnel each"}
TUNNEL_METRICS: tuple[Metric, ...] = (
    Metric("kib_per_tunnel", "proxy RSS per tunnel, KiB", 1, False),
    Metric("cpu_ms_per_tunnel", "proxy CPU ms per tunnel, to open it", 3, False),
    Metric("open_s", "time to open them, s ({opening} at a time)", 2, False),
    Metric("client_cpu_ms_per_tunnel", "client CPU ms per tunnel, to open it", 3, False),
    Metric("bulk_mb_s", "{bulk} tunnels × 1 MiB at once, MB/s", 0, True),
    Metric("proxy_cpu_ms_per_mb", "proxy CPU ms per MB, {bulk} × 1 MiB", 2, False),
    Metric("client_cpu_ms_per_mb", "client CPU ms per MB, {bulk} × 1 MiB", 2, False),
)


def render_tls(results: Results, tunnels: Results | None, labels: dict[str, object],
               tunnel_heading: list[str] | None = None) -> list[str]:
    """The TLS section's tables: through the TLS listener (a column per subject, with the
    ratios), the TLS load generator check, and (under `tunnel_heading`) HTTP/2 against
    HTTP/1.1 for held tunnels."""
    subjects = results.subjects
    ratios = [ratio for ratio in TLS_RATIOS if ratio.ours in subjects
              and (ratio.theirs in subjects or (ratio.theirs == BEST_PEER and results.peers))]
    columns = ["measure", *subjects, *(ratio.label for ratio in ratios)]
    blank = ["" for _ in ratios]
    rows = [["version", *(results.versions.get(name, "—") for name in subjects), *blank],
            ["runs", *(_status(results, name) for name in subjects), *blank],
            ["TLS agreed", *(_flag(results, name, "tls") for name in subjects), *blank]]
    for metric in TLS_METRICS:
        arrow = "↑" if metric.higher_is_better else "↓"
        rows.append([f"{metric.label.format(**labels)} {arrow}",
                     *(_number(results.median(name, metric.key), metric.digits)
                       for name in subjects),
                     *(_ratio_cell(results, metric, ratio) for ratio in ratios)])
        for quotient in (q for q in TLS_QUOTIENTS if q.after == metric.key):
            rows.append([quotient.label, *(_quotient_cell(results, name, quotient)
                                           for name in subjects), *blank])
    lines = [_markdown_row(columns), _markdown_row(["---", *("---:" for _ in columns[1:])])]
    lines += [_markdown_row(row) for row in rows]
    lines += ["", *tls_generator_check(results)]
    if tunnels is not None:
        lines += ["", *(tunnel_heading or []), *_tunnel_table(tunnels, labels)]
    notes = results.notes + (tunnels.notes if tunnels else [])
    if notes:
        lines += ["", "Notes:", *(f"- {note}" for note in notes)]
    return lines


def _flag(results: Results, subject: str, key: str) -> str:
    values = results.flags.get(subject, {}).get(key, [])
    return " / ".join(dict.fromkeys(values)) or "—"


def _quotient_cell(results: Results, subject: str, quotient: Quotient) -> str:
    top, bottom = results.median(subject, quotient.top), results.median(subject, quotient.bottom)
    return "—" if top is None or not bottom else f"{top / bottom:.2f}×"


def _tunnel_table(tunnels: Results, labels: dict[str, object]) -> list[str]:
    """HTTP/2 against HTTP/1.1: a row per measure, a column each and their ratio."""
    columns = ["held tunnels, geproxy-1", *(TUNNEL_COLUMNS[name].format(**labels)
                                            for name in (H2, H1)), "HTTP/2 ÷ HTTP/1.1"]
    rows = [["runs", *(str(tunnels.runs.get(name, 0)) for name in (H2, H1)), ""]]
    for metric in TUNNEL_METRICS:
        arrow = "↑" if metric.higher_is_better else "↓"
        h2, h1 = tunnels.median(H2, metric.key), tunnels.median(H1, metric.key)
        ratio = "—" if h2 is None or not h1 else f"{h2 / h1:.2f}×"
        rows.append([f"{metric.label.format(**labels)} {arrow}",
                     _number(h2, metric.digits), _number(h1, metric.digits), ratio])
    lines = [_markdown_row(columns), _markdown_row(["---", "---:", "---:", "---:"])]
    return lines + [_markdown_row(row) for row in rows]


def tls_generator_check(results: Results) -> list[str]:
    """Whether the TLS client could be the limit: its rate and its CPU against the origin's
    TLS server directly (nginx), against the fastest proxy's."""
    if results.median("direct", "tls_cycles_s") is None:
        return ["TLS load generator check: not made (no direct TLS column: it needs nginx as "
                "the origin)."]
    lines = ["TLS load generator check (direct: the origin's own TLS server, nginx, asked "
             "directly with the same load):"]
    for key, what, unit, cpu_key, per in (
            ("tls_cycles_s", "TLS cycles", "cycles/s", "tlsgen_cpu_tls_cycles", "1,000 cycles"),
            ("tls_mb_s", "TLS download", "MB/s", "tlsgen_cpu_tls_gb", "GB")):
        metric = next(metric for metric in TLS_METRICS if metric.key == key)
        direct = results.median("direct", key)
        fastest = results.best(metric, results.proxies, every=True)
        cpu = results.median("direct", cpu_key)
        if direct is None or fastest is None:
            continue
        line = (f"- {what}: bench/tlsgen.c reached {direct:,.0f} {unit} direct, "
                f"**{direct / fastest[1]:.1f}×** the fastest proxy ({fastest[0]}, "
                f"{fastest[1]:,.0f})")
        if cpu:
            capacity = 1000 / cpu  # both CPU figures are per 1,000 (cycles, MB)
            line += (f"; it used {cpu:.3f} CPU s per {per}, "
                     f"so one core of it drives {capacity:,.0f} {unit}, "
                     f"**{capacity / fastest[1]:.1f}×** that proxy")
            if capacity < SEVERAL * fastest[1]:
                line += (f". Under {SEVERAL:g}×: the client is not several times faster than "
                         "that proxy, so its rate is bounded by the shared cores too; its CPU "
                         f"per {per} is the figure that holds")
        lines.append(line + ".")
    return lines
