"""The bench's report (bench/report.py): best peer, ratios, target marks and the routing
verdicts, from made-up readings. No proxy runs here; bench/run.py is the measurement."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

RATIOS = ("geproxy-auto ÷ best peer", "geproxy-1 ÷ squid-1", "geproxy-1 ÷ proxy.py")

pytestmark = pytest.mark.pure


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    """bench/report.py and bench/measure.py, imported as bench/run.py imports them."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("report"), importlib.import_module("measure")


def _results(report: ModuleType, measure: ModuleType) -> object:
    names = ["direct", "geproxy-1", "geproxy-auto", "squid-1", "proxy.py", "pproxy"]
    results = report.Results(names, peers=["squid-1", "proxy.py", "pproxy"], proxies=names[1:])
    figures = {
        "direct": {"cycles_s": 12000.0, "rps": 90000.0, "loadgen_cpu_cycles": 0.04,
                   "wrk_cpu_requests": 0.01},
        "geproxy-1": {"cycles_s": 3000.0, "rps": 20000.0, "kib_per_tunnel_9000": 9.5},
        "geproxy-auto": {"cycles_s": 5000.0, "rps": 30000.0, "kib_per_tunnel_9000": 11.0},
        "squid-1": {"cycles_s": 4000.0, "rps": 12000.0, "kib_per_tunnel_9000": 31.0},
        "proxy.py": {"cycles_s": 2000.0, "rps": 9000.0, "kib_per_tunnel_9000": 3.5},
        "pproxy": {"cycles_s": 3500.0, "rps": 40000.0, "kib_per_tunnel_9000": 9.9},
    }
    routing = {"geproxy-1": measure.ROUTES, "geproxy-auto": measure.ROUTES,
               "squid-1": measure.ROUTES, "proxy.py": measure.STICKS, "pproxy": measure.STICKS}
    for name, values in figures.items():
        flags = {"routing": routing[name]} if name in routing else {}
        results.add(name, 1, measure.Reading(values=values, flags=flags))
        results.runs[name] = 1
    return results


def _cells(text: str, label: str, *columns: str) -> dict[str, str]:
    """The cells of the table row that starts with `label`, in the given columns."""
    def cells(start: str) -> list[str]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {start}"))
        return [cell.strip() for cell in line.strip("|").split("|")]
    row = dict(zip(cells("measure"), cells(label)))
    return {column: row[column] for column in columns}


def test_a_proxy_that_sticks_to_the_first_host_is_not_the_best_peer_for_keep_alive(
        bench: tuple[ModuleType, ModuleType]) -> None:
    report, measure = bench
    results = _results(report, measure)
    rps = next(metric for metric in report.METRICS if metric.key == "rps")
    assert results.best(rps, results.peers) == ("squid-1", 12000.0)
    assert results.best(rps, results.peers, every=True) == ("pproxy", 40000.0)
    cycles = next(metric for metric in report.METRICS if metric.key == "cycles_s")
    assert results.best(cycles, results.peers) == ("squid-1", 4000.0)  # stuck, yet counted


def test_the_table_shows_ratios_targets_and_verdicts(
        bench: tuple[ModuleType, ModuleType]) -> None:
    report, measure = bench
    text = report.render(_results(report, measure), ["# header"], {"clients": 50, "mib": 1})
    assert f"| pproxy | {' | '.join(RATIOS)} | target |" in text  # subjects, ratios, targets
    assert _cells(text, "CONNECT cycles/s", *RATIOS) == dict(zip(RATIOS, (
        "1.25× ✓ vs squid-1", "0.75× ✗", "1.50× ✗")))
    assert _cells(text, "plain HTTP keep-alive req/s", "pproxy", RATIOS[0]) == {
        "pproxy": "40,000 (sticks to the first host: not counted)",
        RATIOS[0]: "2.50× ✓ vs squid-1"}
    assert _cells(text, "keep-alive routing", "direct", "squid-1", "proxy.py") == {
        "direct": "—", "squid-1": "✓ routes each request",
        "proxy.py": "✗ sticks to the first host"}
    # lower is better here: the best peer is the lowest
    assert _cells(text, "proxy RSS per idle tunnel, KiB (9,000 open)", "target", RATIOS[0]) == {
        "target": "≤ 10 KiB (geproxy-1 ✓, geproxy-auto ✗)", RATIOS[0]: "3.14× vs proxy.py"}


def test_the_generator_check_compares_direct_with_the_fastest_proxy(
        bench: tuple[ModuleType, ModuleType]) -> None:
    report, measure = bench
    lines = report.generator_check(_results(report, measure))
    cycles = next(line for line in lines if "bench/loadgen.c" in line)
    assert "12,000 cycles/s direct, **2.4×** the fastest proxy (geproxy-auto, 5,000)" in cycles
    assert "one core of it drives 25,000 cycles/s, **5.0×** that proxy" in cycles
    assert "Under 3×" in cycles and "not several times faster" not in cycles
    keep_alive = next(line for line in lines if "wrk reached" in line)
    # every proxy counts here, one that sticks too: the generator carried its load
    assert "90,000 req/s direct, **2.2×** the fastest proxy (pproxy, 40,000)" in keep_alive
