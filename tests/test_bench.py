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


def _cells(text: str, label: str, *columns: str, header: str = "measure") -> dict[str, str]:
    """The cells of the table row that starts with `label`, in the given columns (named in
    the first table whose header row starts with `header`)."""
    def cells(start: str) -> list[str]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {start}"))
        return [cell.strip() for cell in line.strip("|").split("|")]
    row = dict(zip(cells(header), cells(label), strict=True))
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
        "1.25× ✓ vs squid-1", "0.75× ✗", "1.50× ✗"), strict=True))
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


def _tls_results(report: ModuleType, measure: ModuleType) -> tuple[object, object]:
    names = ["direct", "geproxy-1", "squid-1"]
    results = report.Results(names, peers=["squid-1"], proxies=names[1:])
    figures = {
        "direct": {"tls_cycles_s": 1200.0, "cycles_s": 12000.0, "tlsgen_cpu_tls_cycles": 0.6,
                   "tls_mb_s": 800.0, "mb_s": 2000.0, "tlsgen_cpu_tls_gb": 0.5},
        "geproxy-1": {"tls_cycles_s": 600.0, "cycles_s": 2400.0, "proxy_cpu_tls_cycles": 1.0,
                      "proxy_cpu_cycles": 0.25, "tls_mb_s": 500.0, "mb_s": 1250.0},
        "squid-1": {"tls_cycles_s": 800.0, "cycles_s": 4000.0, "proxy_cpu_tls_cycles": 0.5,
                    "proxy_cpu_cycles": 0.2, "tls_mb_s": 400.0, "mb_s": 1000.0},
    }
    for name, values in figures.items():
        flags = {"tls": "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519"}
        results.add(name, 1, measure.Reading(values=values, flags=flags))
        results.runs[name] = 1
    tunnels = report.Results([report.H2, report.H1])
    tunnels.add(report.H2, 1, measure.Reading({"kib_per_tunnel": 8.0, "bulk_mb_s": 250.0}))
    tunnels.add(report.H1, 1, measure.Reading({"kib_per_tunnel": 16.0, "bulk_mb_s": 500.0}))
    tunnels.runs.update({report.H2: 1, report.H1: 1})
    return results, tunnels


def test_the_tls_table_shows_tls_against_plain_and_http2_against_http1(
        bench: tuple[ModuleType, ModuleType]) -> None:
    report, measure = bench
    results, tunnels = _tls_results(report, measure)
    labels = {"clients": 50, "mib": 1, "tunnels": 1000, "opening": 100, "bulk": 100}
    text = "\n".join(report.render_tls(results, tunnels, labels, ["### held"]))
    ratio = "geproxy-1 ÷ squid-1"
    assert "| measure | direct | geproxy-1 | squid-1 | geproxy-1 ÷ squid-1 |" in text
    assert _cells(text, "TLS CONNECT cycles/s", "geproxy-1", ratio) == {
        "geproxy-1": "600", ratio: "0.75×"}
    # each subject's TLS figure over its own plain one, in the same run
    assert _cells(text, "TLS ÷ plain: cycles/s", "direct", "geproxy-1", "squid-1") == {
        "direct": "0.10×", "geproxy-1": "0.25×", "squid-1": "0.20×"}
    assert _cells(text, "TLS ÷ plain: CPU per cycle", "direct", "geproxy-1") == {
        "direct": "—", "geproxy-1": "4.00×"}
    assert _cells(text, "TLS agreed", "squid-1") == {
        "squid-1": "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519"}
    held = text[text.index("### held"):]
    assert _cells(held, "proxy RSS per tunnel, KiB", "HTTP/2 ÷ HTTP/1.1",
                  header="held tunnels") == {"HTTP/2 ÷ HTTP/1.1": "0.50×"}
    assert "| held tunnels, geproxy-1 | HTTP/2: 1,000 tunnels on 1 connection |" in held


def test_the_tls_generator_check_reads_the_direct_tls_server(
        bench: tuple[ModuleType, ModuleType]) -> None:
    report, measure = bench
    results, _ = _tls_results(report, measure)
    lines = report.tls_generator_check(results)
    cycles = next(line for line in lines if line.startswith("- TLS cycles"))
    assert "1,200 cycles/s direct, **1.5×** the fastest proxy (squid-1, 800)" in cycles
    assert "one core of it drives 1,667 cycles/s, **2.1×** that proxy. Under 3×" in cycles
    download = next(line for line in lines if line.startswith("- TLS download"))
    assert "800 MB/s direct, **1.6×** the fastest proxy (geproxy-1, 500)" in download
    assert "one core of it drives 2,000 MB/s, **4.0×** that proxy." in download
    without = report.Results(["geproxy-1"], proxies=["geproxy-1"])
    assert report.tls_generator_check(without)[0].startswith("TLS load generator check: not made")
