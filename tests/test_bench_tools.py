"""bench/floor.py and bench/ab.py: the yardstick proxy does what its figures claim (it
tunnels, and it routes each keep-alive request by its host), and both tables are made as
documented, from made-up readings. The measurements themselves are not run here."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

from geproxy.testing import curl

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def floor(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("floor")


@pytest.fixture
def yardstick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[int]:
    """`python bench/floor.py serve PORT`, started and stopped as the bench does it; its
    port."""
    monkeypatch.syspath_prepend(str(BENCH))
    procs = importlib.import_module("procs")
    port = procs.free_port()
    server = procs.start_server("floor", [sys.executable, str(BENCH / "floor.py"), "serve",
                                          str(port)], port, tmp_path)
    yield port
    assert procs.stop_server(server) == []  # it stopped on SIGTERM, nothing was left


def test_the_yardstick_tunnels_and_forwards(yardstick, origin):
    proxy = f"http://127.0.0.1:{yardstick}"
    through_tunnel = curl("-sS", "-p", "-x", proxy, origin.url("/"))
    assert through_tunnel.returncode == 0, through_tunnel.stderr
    assert through_tunnel.stdout == b"hello\n"
    forwarded = curl("-sS", "-x", proxy, origin.url("/"))
    assert forwarded.stdout == b"hello\n"


def test_the_yardstick_routes_each_keep_alive_request(yardstick, origin, raw_origin):
    """Two origins on one client connection: each request reaches its own (the bench's
    routing check; a yardstick that stuck to the first host would flatter the floor)."""

    def answer(sock: socket.socket) -> None:
        while second.read_head(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")

    second = raw_origin(answer)
    with socket.create_connection(("127.0.0.1", yardstick), timeout=10) as sock:
        for port in (origin.port, second.port, origin.port):
            sock.sendall(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"
                         "\r\n\r\n".encode())
            data = b""
            while not data.endswith(b"hello\n"):
                piece = sock.recv(65536)
                assert piece, data
                data += piece
            assert data.startswith(b"HTTP/1.1 200 ")
    assert len(origin.seen) == 2
    assert second.received.count(b"GET / HTTP/1.1") == 1


def test_the_floor_table_splits_user_and_kernel(floor):
    run = {"cycles_s": 4000.0, "cycle_user": 0.1, "cycle_sys": 0.14, "cycle_total": 0.24,
           "rps": 20000.0, "request_user": 0.02, "request_sys": 0.03, "request_total": 0.05}
    found = {"floor": [dict(run), dict(run, cycle_user=0.3, cycle_total=0.44)],
             "geproxy-1": [dict(run)]}
    table = floor.render(argparse.Namespace(rounds=2, seconds=5), found)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| floor") or line.startswith("| geproxy")}
    # floor: cycle user median of 0.1 and 0.3, the total the median of the per-run sums
    assert rows["floor"][1:5] == ["4,000", "0.200", "0.140", "0.340"]
    assert rows["geproxy-1"][5:9] == ["20,000", "0.020", "0.030", "0.050 |"]


def test_the_ab_table_gives_b_over_a(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    ab = importlib.import_module("ab")
    found = {"A": [{"request_total": 0.2, "rps": 5000.0},
                   {"request_total": 0.22, "rps": 4600.0}],
             "B": [{"request_total": 0.15, "rps": 6000.0},
                   {"request_total": 0.17, "rps": 5800.0}]}
    table = ab.render(argparse.Namespace(base="HEAD~1", rounds=2, seconds=5), ["keepalive"],
                      found)
    assert "| proxy CPU ms per keep-alive request | 0.2100 | 0.1600 | 0.76 |" in table
    assert "| req/s | 4800 | 5900 | 1.23 |" in table


def test_the_bench_config_runs_geproxy_without_others_plugins(monkeypatch, tmp_path):
    """The example plugin that .ci/run installs is found by geproxy's entry points; the bench
    measures geproxy as deployed, so its config turns every plugin not geproxy's own off."""
    from geproxy import DEFAULT_PLUGINS
    from geproxy.policy.plugins import load, plugin_names

    monkeypatch.syspath_prepend(str(BENCH))
    subjects = importlib.import_module("subjects")
    config = tmp_path / "bench.ini"
    config.write_text(subjects.geproxy_config(3128, "1"))
    pm, _ = load(str(config))
    own = {name for name, _ in DEFAULT_PLUGINS}
    assert set(plugin_names(pm)) == own
    installed = {entry.name for entry in importlib.metadata.entry_points(group="geproxy")}
    assert subjects.foreign_plugins() == sorted(installed - own)
