"""bench/floor.py and bench/ab.py: the yardstick proxy does what its figures claim (it
tunnels, and it routes each keep-alive request by its host), and both tables are made as
documented, from made-up readings. Their measurements are not run here; bench/acl_lists.py,
which needs no servers, runs on small lists (its figures are not checked, only that it
gives them)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import socket
import subprocess
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
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():  # the first table's rows (the ratios' follow)
        if line.startswith("| floor") or line.startswith("| geproxy"):
            rows.setdefault(line.split(" | ")[0].strip("| "), line.split(" | "))
    # floor: cycle user median of 0.1 and 0.3, the total the median of the per-run sums
    assert rows["floor"][1:5] == ["4,000", "0.200", "0.140", "0.340"]
    assert rows["geproxy-1"][5:9] == ["20,000", "0.020", "0.030", "0.050 |"]


def test_the_floor_ratios_are_per_round(floor):
    """The targets' ratios: each round's geproxy over the same round's yardstick, the median
    and the range of those."""
    run = {"cycles_s": 4000.0, "cycle_user": 0.1, "cycle_sys": 0.14, "cycle_total": 0.2,
           "rps": 20000.0, "request_user": 0.02, "request_sys": 0.03, "request_total": 0.05}
    found = {"floor": [dict(run), dict(run, request_total=0.1), dict(run)],
             "floor with timeouts": [dict(run), dict(run), dict(run, cycle_total=0.4)],
             "geproxy-1-audited": [dict(run, request_total=0.1, cycle_total=0.3),
                                   dict(run, request_total=0.1, cycle_total=0.3),
                                   dict(run, request_total=0.15, cycle_total=0.3)]}
    table = floor.render(argparse.Namespace(rounds=3, seconds=5), found)
    # keep-alive: 2.0, 1.0, 3.0 -> median 2.00; CONNECT: 1.5, 1.5, 0.75 -> median 1.50
    assert "| geproxy-1-audited | 2.00× (1.00-3.00) | 1.50× (0.75-1.50) |" in table


def test_the_working_floors_table_gives_the_cost_above_the_floor_per_round(floor):
    """``--work``: each working floor's CPU per request above the same round's floor, in µs,
    and that over the work it adds."""
    run = {"cycles_s": 4000.0, "cycle_user": 0.1, "cycle_sys": 0.14, "cycle_total": 0.2,
           "rps": 20000.0, "request_user": 0.02, "request_sys": 0.03, "request_total": 0.05}
    found = {"floor": [dict(run), dict(run, request_total=0.06)],
             "floor +50 µs": [dict(run, request_total=0.12), dict(run, request_total=0.14)]}
    table = floor.render(argparse.Namespace(rounds=2, seconds=5), found)
    # above: 70 and 80 µs -> median 75.0, over 50 µs of work: 1.50
    assert "| floor +50 µs | 50 | 75.0 (70.0-80.0) | 1.50 |" in table


def test_the_work_of_a_working_floor_is_calibrated(floor):
    turns = floor.calibrate(50)
    assert turns >= 1
    assert floor.work(turns) == floor.work(turns)  # the same work each time
    assert floor.calibrate(200) > turns


def test_a_working_floor_still_forwards(monkeypatch, tmp_path, origin):
    monkeypatch.syspath_prepend(str(BENCH))
    procs = importlib.import_module("procs")
    port = procs.free_port()
    server = procs.start_server("floor", [sys.executable, str(BENCH / "floor.py"), "serve",
                                          str(port), "--work", "30"], port, tmp_path)
    try:
        out = curl("-sS", "-x", f"http://127.0.0.1:{port}", origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    finally:
        assert procs.stop_server(server) == []


def test_the_audited_config_logs_json_and_walks_a_dst_rule(monkeypatch, tmp_path):
    """The configuration of the performance targets: every plugin geproxy has, a JSON access
    log to the file given, and rules whose first reads the destination (so every request
    is decided by a walk, not at connect)."""
    from geproxy.policy.plugins import load

    monkeypatch.syspath_prepend(str(BENCH))
    subjects = importlib.import_module("subjects")
    config = tmp_path / "audited.ini"
    config.write_text(subjects.geproxy_config(3128, "1", access_log=tmp_path / "a.log"))
    _, loaded = load(str(config))
    assert loaded.core["access_log"] == str(tmp_path / "a.log")
    assert loaded.core["log_format"] == "json"
    rules = loaded.section("acl")["rules"]
    assert [rule.split(":")[0] for rule in rules] == ["blocked", "loopback"]
    assert " dst " in rules[0]
    assert "geproxy-1-audited" not in subjects.DEFAULT.split(",")  # floor.py measures it


def test_the_core_micro_bench_times_every_step() -> None:
    """`python bench/core_hot.py` small: a row per step of a request's head handling for
    both requests, and their sum."""
    done = subprocess.run([sys.executable, str(BENCH / "core_hot.py"), "--requests", "50",
                           "--repeat", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [row[0].strip("| *") for row in rows[1:]]
    assert names == ["parse the request head", "its framing and keep-alive",
                     "the head sent upstream", "parse the response head",
                     "the answer's head to the client", "all"]
    for row in rows[1:]:
        assert all(float(cell.strip(" |*")) > 0 for cell in row[1:])


def test_the_greenlets_micro_bench_serves_every_connection_both_ways() -> None:
    """`python bench/greenlets.py` small: a figure for spawned greenlets and for parked
    ones, every stand-in connection served (it exits 1 otherwise)."""
    done = subprocess.run([sys.executable, str(BENCH / "greenlets.py"), "--connections",
                           "500", "--repeat", "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |")
            for line in done.stdout.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["spawn", "parked"]
    assert all(float(rows[mode]) > 0 for mode in ("spawn", "parked"))


def test_the_hooks_micro_bench_loads_every_step(tmp_path: Path) -> None:
    """`python bench/hooks_hot.py` small: every step of bench/features.py is loaded and
    configured as the proxy does it, and each of its hook calls gets a figure."""
    done = subprocess.run([sys.executable, str(BENCH / "hooks_hot.py"), "--requests", "300",
                           "--repeat", "2"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in done.stdout.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["audited", "no access log", "no rules", "no metrics",
                              "core only"]
    assert all(float(cell.strip(" |")) > 0 for row in list(rows.values())[1:]
               for cell in row[1:])


def test_the_features_steps_are_configs_geproxy_takes(monkeypatch, tmp_path):
    """bench/features.py's steps: each one loads, and each takes off what it says."""
    from geproxy.policy.plugins import load, plugin_names

    monkeypatch.syspath_prepend(str(BENCH))
    features = importlib.import_module("features")
    loaded = {}
    for step in features.STEPS:
        path = tmp_path / f"{step.replace(' ', '-')}.ini"
        path.write_text(features.config(step, 3128, tmp_path))
        pm, config = load(str(path), configure=False)
        loaded[step] = (set(plugin_names(pm)), config)
    assert loaded["audited"][1].core["log_format"] == "json"
    assert loaded["no access log"][1].core["access_log"] == "off"
    assert loaded["no access log"][1].section("acl")["rules"]
    assert "metrics" in loaded["no rules"][0] and "metrics" not in loaded["no metrics"][0]
    assert loaded["core only"][0] == {"system_resolver"}


def test_the_profile_table_leaves_the_hubs_wait_out(monkeypatch, tmp_path):
    """bench/hotspots.py's table, from a real profile: functions by own time per request,
    the hub's loop (its wait for events) not among them nor in the busy total."""
    import cProfile

    monkeypatch.syspath_prepend(str(BENCH))
    hotspots = importlib.import_module("hotspots")
    profiler = cProfile.Profile()
    profiler.enable()
    total = sum(sorted(range(20000), key=lambda n: -n)[:10])
    profiler.disable()
    saved = tmp_path / "out.prof"
    profiler.dump_stats(str(saved))
    table = hotspots.render(saved, 10.0, 5, "audited")
    assert total > 0
    assert table.startswith("# geproxy profile per keep-alive request (audited config, 10 ")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert 0 < len(rows) <= 5
    assert any("lambda" in row for row in rows)  # 20,000 calls: 2,000 per "request"
    assert not any("hub.py" in row for row in rows)


def test_a_saved_scaling_report_says_when_and_which_geproxy(monkeypatch):
    import datetime

    monkeypatch.syspath_prepend(str(BENCH))
    scaling = importlib.import_module("scaling")
    text = scaling.document(datetime.datetime(2026, 12, 8, 2, 29, 43), "| the table |")
    lines = text.splitlines()
    assert lines[0] == "# geproxy with 1 and more workers, 2026-12-08 02:29:43"
    assert lines[3].startswith("- version: geproxy ")
    assert "| the table |" in lines


def test_the_scaling_table_gives_ratios_and_the_spread(monkeypatch):
    """bench/scaling.py's table, from made-up readings: each count's medians, its ratio to
    the first count round by round, and how the CPU went between the workers."""
    monkeypatch.syspath_prepend(str(BENCH))
    scaling = importlib.import_module("scaling")
    found = {1: [{"cycle_total": 0.4, "request_total": 0.2},
                 {"cycle_total": 0.5, "request_total": 0.2}],
             2: [{"cycle_total": 0.44, "request_total": 0.19},
                 {"cycle_total": 0.5, "request_total": 0.22}]}
    spread = {1: [], 2: [[1.0, 3.0], [2.0, 2.0]]}
    table = scaling.render(argparse.Namespace(rounds=2, seconds=5, plain=False), [1, 2],
                           found, spread)
    assert "| 1 | 0.450 | 1.00 (1.00-1.00) | 0.200 | 1.00 (1.00-1.00) | one process |" in table
    assert "| 2 | 0.470 | 1.05 (1.00-1.10) | 0.205 | 1.02 (0.95-1.10) | 38% / 62% |" in table


def test_the_ab_table_gives_b_over_a(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    ab = importlib.import_module("ab")
    found = {"A": [{"request_total": 0.2, "rps": 5000.0},
                   {"request_total": 0.22, "rps": 4600.0}],
             "B": [{"request_total": 0.15, "rps": 6000.0},
                   {"request_total": 0.17, "rps": 5800.0}]}
    table = ab.render(argparse.Namespace(base="HEAD~1", rounds=2, seconds=5, audited=False),
                      ["keepalive"], found)
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


def test_the_acl_lists_bench_runs_small(tmp_path: Path) -> None:
    """`python bench/acl_lists.py --quick` on lists small enough for a test: a row per list
    and size and for the load through the acl plugin, with a figure in every cell, and the
    summary lines."""
    done = subprocess.run([sys.executable, str(BENCH / "acl_lists.py"), "--quick",
                           "--domains", "2000", "--networks", "300"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in done.stdout.splitlines() if re.match(r"\| (dst|src|acl) ", line)]
    assert [row[:2] for row in rows] == [
        ["dst", "10"], ["dst", "2,000"], ["acl dst file:", "2,000"],
        ["src", "10"], ["src", "300"], ["acl src file:", "300"]]
    for row in rows:
        figures = row[2:5] if row[0].startswith("acl") else row[2:]
        assert all(re.fullmatch(r"[0-9.,]+x?", cell) for cell in figures), row
    assert rows[0][-1] == rows[3][-1] == "1.00x"  # the 10-entry rows
    assert re.search(r"^dst 2,000: load [0-9.]+ s, \+[0-9]+ MB RSS; check [0-9.]+x the "
                     r"10-entry cost; through the acl plugin: load [0-9.]+ s, \+[0-9]+ MB RSS$",
                     done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^src 300: load ", done.stdout, re.MULTILINE), done.stdout


def test_the_acl_lists_files_are_what_the_probes_assume(monkeypatch, tmp_path: Path) -> None:
    """Every generated line parses, the lists hold no duplicates, and no entry covers the
    probes that are meant to miss."""
    from geproxy import HostPatterns, NetworkSet

    monkeypatch.syspath_prepend(str(BENCH))
    acl_lists = importlib.import_module("acl_lists")
    domains, networks = tmp_path / "d.txt", tmp_path / "n.txt"
    acl_lists.write_domains(domains, 5000)
    acl_lists.write_networks(networks, 5000)
    patterns = HostPatterns.parse(acl_lists.iter_lines(domains, 0))
    assert len(set(patterns.domains)) == 5000
    found = NetworkSet.parse(acl_lists.iter_lines(networks, 0))
    assert len(found) == 5000 and {n.version for n in list(found)[:10]} == {4, 6}
    first = list(acl_lists.iter_lines(domains, 10))
    probes = acl_lists._host_probes(first)
    small = HostPatterns.parse(first)
    assert [patterns.match(h) for h in probes] == [small.match(h) for h in probes]
    assert sum(small.match(h) for h in probes) == len(probes) // 2
    first = list(acl_lists.iter_lines(networks, 10))
    addresses = acl_lists._address_probes(first)
    small_set = NetworkSet.parse(first)
    assert [a in found for a in addresses] == [a in small_set for a in addresses]
    assert sum(a in small_set for a in addresses) == len(addresses) // 2


def test_the_auth_bench_runs_small_and_the_negative_cache_spares_the_directory() -> None:
    """`python bench/auth.py --quick --json` against the kit's slapd: a CPU figure per
    configuration and round, and the guesser's binds bounded as the cache promises:
    at most max_failures (10) binds as the guessed user, one for a repeated password."""
    from geproxy.testing import require_tool

    require_tool("slapd")
    done = subprocess.run([sys.executable, str(BENCH / "auth.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert sorted(figures["cpu_us_per_request"]) == ["htpasswd", "ldap", "none"]
    assert all(len(values) == 1 and values[0] >= 0
               for values in figures["cpu_us_per_request"].values())
    guessed = figures["guesser"]
    assert guessed["attempts"] == 100
    assert 1 <= guessed["user_binds_guessing"] <= 10
    assert guessed["user_binds_repeating"] == 1
