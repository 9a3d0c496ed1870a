"""Collected readings and the markdown table made of them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from measure import Reading

SUBJECT_OF_RATIOS = "geproxy"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # may name {clients}, {mib}, {tunnels}
    digits: int
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("cycles_s", "CONNECT cycles/s ({clients} clients)", 0, True),
    Metric("p50_ms", "CONNECT cycle latency p50, ms", 2, False),
    Metric("p99_ms", "CONNECT cycle latency p99, ms", 2, False),
    Metric("cpu_per_1000", "proxy CPU s per 1,000 CONNECT cycles", 3, False),
    Metric("mb_s", "one tunnel download, MB/s ({mib} MiB)", 0, True),
    Metric("rps", "plain HTTP keep-alive req/s (wrk, {clients} conns)", 0, True),
    Metric("kib_per_tunnel", "proxy RSS per idle tunnel, KiB ({tunnels} open)", 1, False),
)


@dataclass
class Results:
    """Every reading of every run, by subject, in the order the subjects were asked for."""

    subjects: list[str]
    versions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # subject -> reason
    runs: dict[str, int] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, subject: str, run: int, reading: Reading) -> None:
        for key, value in reading.values.items():
            self.samples.setdefault(subject, {}).setdefault(key, []).append(value)
        self.notes.extend(f"{subject}, run {run}: {note}" for note in reading.notes)

    def median(self, subject: str, key: str) -> float | None:
        values = self.samples.get(subject, {}).get(key)
        return statistics.median(values) if values else None


def render(results: Results, header: list[str], labels: dict[str, object]) -> str:
    """The markdown report: header lines, the table, then notes on errors and skips."""
    subjects = results.subjects
    baselines = [name for name in subjects if name != SUBJECT_OF_RATIOS] \
        if SUBJECT_OF_RATIOS in subjects else []
    columns = ["measure", *subjects, *(f"{SUBJECT_OF_RATIOS} ÷ {name}" for name in baselines)]
    rows = [
        ["version", *(results.versions.get(name, "—") for name in subjects),
         *("" for _ in baselines)],
        ["runs", *(_status(results, name) for name in subjects), *("" for _ in baselines)],
    ]
    for metric in METRICS:
        arrow = "↑" if metric.higher_is_better else "↓"
        row = [f"{metric.label.format(**labels)} {arrow}"]
        row += [_number(results.median(name, metric.key), metric.digits) for name in subjects]
        ours = results.median(SUBJECT_OF_RATIOS, metric.key)
        row += [_ratio(ours, results.median(name, metric.key)) for name in baselines]
        rows.append(row)
    lines = [*header, "", _markdown_row(columns),
             _markdown_row(["---", *("---:" for _ in columns[1:])])]
    lines += [_markdown_row(row) for row in rows]
    if results.notes:
        lines += ["", "Notes:", *(f"- {note}" for note in results.notes)]
    return "\n".join(lines) + "\n"


def _status(results: Results, subject: str) -> str:
    done = results.runs.get(subject, 0)
    reason = results.skipped.get(subject)
    if reason is None:
        return str(done)
    return f"{done}, then skipped: {reason}" if done else f"skipped: {reason}"


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "—"
    return f"{ours / theirs:.2f}×"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"
