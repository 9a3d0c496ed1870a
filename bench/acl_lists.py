"""Large ACL lists: what a list of a million domains or a hundred thousand networks costs to
load and to check, against a list of ten.

    python bench/acl_lists.py                   # 1,000,000 domains, 100,000 networks, ~1 min
    python bench/acl_lists.py --rounds 5
    python bench/acl_lists.py --quick           # 20,000 and 2,000, 1 round: a smoke run

Issue 17's targets: a list of 1,000,000 domains (``.example.com`` style) loads in at most
5 s and adds at most 200 MB of RSS per worker, and a ``dst`` check costs the same within
noise with 10 entries and with 1,000,000; the same for 100,000 networks in ``src``.

It writes, in a temp dir, a file of N domains (``.d123456.example.com`` and the like: one
to three labels before a numbered one, under a mix of suffixes) and one of M networks
(IPv4 /8 to /32, mostly /24 and single addresses, and a tenth IPv6), one a line. Each
measure runs in a child process of its own, a fresh interpreter whose RSS holds nothing
else: it reads a file (the first 10 lines, or all), parses it (``HostPatterns.parse`` for
domains, ``NetworkSet.parse`` for networks), drops the lines and reports the time taken,
the RSS added (VmRSS after less before, from /proc/self/status) and the peak added (VmHWM),
then times a check over a fixed set of probes: ``patterns.match(host)`` for 1,000 host
names, ``address in networks`` for 1,000 addresses, half inside the first 10 entries
(hits whatever the list's size) and half outside every entry. The same probes go to both
sizes, so the ratio is what the size alone costs. Rounds alternate the sizes; the table
gives medians, the check's per round being the fastest of its repeats.

Then the same files through the ``acl`` plugin, as a deployment loads them: a config whose
``[acl] rules`` is ``deny dst file:PATH`` (or ``allow src file:PATH``), loaded with
``geproxy.policy.plugins.load`` (built-in plugins only), after a first load of the 10-entry
file so that imports and gevent's thread pool are not counted. The plugin reads the file
whole and builds the list in gevent's thread pool; the rows give that load's time, RSS and
peak (``--no-plugin`` leaves them out).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
SMALL = 10
PROBES = 1000
SEED = 17
SUFFIXES = ["example.com", "example.net", "example.org", "example.co.uk", "example.de",
            "cdn.example.io", "ads.example.com", "example.com.au"]
PREFIXES = ["", "", "", "www.", "ads.", "tracker-1.", "m.", "img.cdn.", "a.b.c."]
#: Misses end under these, which no generated entry is.
MISS_SUFFIXES = ["example.test", "nothing.example.com", "invalid"]


# -- the files ------------------------------------------------------------------------------

def write_domains(path: Path, count: int) -> None:
    """``count`` distinct ``.domain`` lines, in a shuffled order of their numbers."""
    rng = random.Random(SEED)
    numbers = list(range(count))
    rng.shuffle(numbers)
    with path.open("w", encoding="ascii") as out:
        for number in numbers:
            prefix = rng.choice(PREFIXES)
            out.write(f".{prefix}d{number}.{SUFFIXES[number % len(SUFFIXES)]}\n")


def _ipv4_network(rng: random.Random) -> str:
    length = rng.choices([8, 12, 16, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
                         [1, 1, 3, 2, 3, 3, 5, 4, 40, 2, 2, 2, 2, 2, 2, 1, 25])[0]
    # 1.0.0.0 to 223.255.255.255; misses are drawn from 240.0.0.0/4, which this never holds.
    number = rng.randrange(1 << 24, 224 << 24) >> (32 - length) << (32 - length)
    return f"{ipaddress.IPv4Address(number)}/{length}"


def _ipv6_network(rng: random.Random) -> str:
    length = rng.choice([32, 40, 48, 48, 56, 64, 64, 64, 128])
    # Under 2000::/4; misses are drawn from 3fff::/16.
    number = rng.randrange(0x2000 << 112, 0x3000 << 112) >> (128 - length) << (128 - length)
    return f"{ipaddress.IPv6Address(number)}/{length}"


def write_networks(path: Path, count: int) -> None:
    """``count`` networks, a tenth of them IPv6; the first ten hold both versions."""
    rng = random.Random(SEED)
    with path.open("w", encoding="ascii") as out:
        for index in range(count):
            six = index % 10 == 3
            out.write((_ipv6_network(rng) if six else _ipv4_network(rng)) + "\n")


def iter_lines(path: Path, limit: int) -> Iterator[str]:
    """The first ``limit`` entries (0: all), blank lines and ``#`` comments left out."""
    taken = 0
    with path.open(encoding="utf-8") as source:
        for line in source:
            text = line.strip()
            if text and not text.startswith("#"):
                yield text
                taken += 1
                if taken == limit:
                    return


# -- the child: one load and one check, in a fresh interpreter -------------------------------

def _status() -> dict[str, int]:
    """VmRSS and VmHWM, in KiB."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def _host_probes(first: list[str]) -> list[str]:
    """Half under the first entries (a label or two in front), half under no entry."""
    rng = random.Random(SEED + 1)
    hits = [rng.choice(["", "www.", "a.b."]) + rng.choice(first).lstrip(".")
            for _ in range(PROBES // 2)]
    misses = [f"{rng.choice(PREFIXES)}d{rng.randrange(10**7)}.{rng.choice(MISS_SUFFIXES)}"
              for _ in range(PROBES - len(hits))]
    return hits + misses


def _address_probes(first: list[str]) -> list[Any]:
    """Half inside the first networks, half outside all (240.0.0.0/4, 3fff::/16)."""
    rng = random.Random(SEED + 1)
    probes: list[Any] = []
    for _ in range(PROBES // 2):
        network = ipaddress.ip_network(rng.choice(first))
        offset = rng.randrange(network.num_addresses)
        probes.append(network.network_address + offset)
    for index in range(PROBES - len(probes)):
        if index % 10 == 3:
            probes.append(ipaddress.IPv6Address((0x3FFF << 112) | rng.getrandbits(112)))
        else:
            probes.append(ipaddress.IPv4Address((240 << 24) | rng.getrandbits(28)))
    return probes


def child(kind: str, path: Path, limit: int, whole: bool, repeats: int) -> dict[str, Any]:
    """Load ``path`` (its first ``limit`` entries, 0 for all) as ``kind`` (dst or src), the
    lines streamed into the parse or, with ``whole``, read into a list first; then time a
    check. What it measured."""
    from geproxy.hosts import HostPatterns, NetworkSet

    first = list(iter_lines(path, SMALL))
    probes = _host_probes(first) if kind == "dst" else _address_probes(first)
    gc.collect()
    before = _status()
    started = time.perf_counter()
    lines: Iterable[str] = iter_lines(path, limit)
    if whole:
        lines = list(lines)
    loaded: Any = HostPatterns.parse(lines) if kind == "dst" else NetworkSet.parse(lines)
    load_s = time.perf_counter() - started
    del lines
    gc.collect()
    after = _status()
    if kind == "dst":
        entries = sum(len(field) for field in (loaded.names, loaded.domains, loaded.globs,
                                               loaded.networks))
        check = loaded.match

        def run() -> None:
            for host in probes:
                check(host)
    else:
        entries = len(loaded)

        def run() -> None:
            for address in probes:
                address in loaded  # noqa: B015
    # Fixed loops: each repeat checks the probes 20 times; the fastest repeat counts.
    best = min(timeit.repeat(run, number=20, repeat=repeats))
    hits = sum(1 for probe in probes if (check(probe) if kind == "dst" else probe in loaded))
    return {"entries": entries, "load_s": load_s,
            "rss_mb": (after["VmRSS"] - before["VmRSS"]) / 1024,
            "peak_mb": (after["VmHWM"] - before["VmRSS"]) / 1024,
            "check_ns": best / (20 * len(probes)) * 1e9, "hits": hits}


def plugin_child(kind: str, path: Path, small: Path) -> dict[str, Any]:
    """Load a config whose acl rule names ``path`` (``kind`` dst or src) through the plugin;
    what it took, after the same config naming ``small`` (imports, thread pool)."""
    from geproxy.policy.plugins import load

    rule = "deny dst" if kind == "dst" else "allow src"
    config = path.parent / f"plugin-{kind}.ini"
    config.write_text(f"[acl]\nrules = {rule} file:{small}\n", encoding="utf-8")
    load(str(config), entry_points=False)
    config.write_text(f"[acl]\nrules = {rule} file:{path}\n", encoding="utf-8")
    gc.collect()
    before = _status()
    started = time.perf_counter()
    loaded = load(str(config), entry_points=False)
    load_s = time.perf_counter() - started
    gc.collect()
    after = _status()
    del loaded
    return {"load_s": load_s, "rss_mb": (after["VmRSS"] - before["VmRSS"]) / 1024,
            "peak_mb": (after["VmHWM"] - before["VmRSS"]) / 1024}


def run_child(kind: str, path: Path, limit: int, whole: bool, repeats: int) -> dict[str, Any]:
    """``child`` in a fresh interpreter that imports this checkout's geproxy."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    done = subprocess.run([sys.executable, __file__, "child", kind, str(path), str(limit),
                           "whole" if whole else "stream", str(repeats)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"acl_lists: the {kind} child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_plugin_child(kind: str, path: Path, small: Path) -> dict[str, Any]:
    """``plugin_child`` in a fresh interpreter that imports this checkout's geproxy."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    done = subprocess.run([sys.executable, __file__, "plugin", kind, str(path), str(small)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"acl_lists: the plugin {kind} child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the parent: files, rounds, table --------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=1_000_000,
                        help="entries of the large dst list (default 1,000,000)")
    parser.add_argument("--networks", type=int, default=100_000,
                        help="entries of the large src list (default 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="children per size (default 3)")
    parser.add_argument("--whole", action="store_true",
                        help="read each file into a list before parsing it (default: stream "
                             "its lines into the parse)")
    parser.add_argument("--no-plugin", dest="plugin", action="store_false",
                        help="leave out the loads through the acl plugin")
    parser.add_argument("--quick", action="store_true",
                        help="20,000 domains, 2,000 networks, 1 round, fewer repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.domains, args.networks, args.rounds = (min(args.domains, 20_000),
                                                     min(args.networks, 2_000), 1)
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds 1-20")
    if not SMALL < args.domains <= 10_000_000 or not SMALL < args.networks <= 10_000_000:
        parser.error(f"--domains and --networks: more than {SMALL}, at most 10,000,000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = 2 if args.quick else 7
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="geproxy-acl-lists-") as tmp:
        files = {"dst": Path(tmp) / "domains.txt", "src": Path(tmp) / "networks.txt"}
        write_domains(files["dst"], args.domains)
        write_networks(files["src"], args.networks)
        for number in range(args.rounds):
            for kind in ("dst", "src"):
                # Alternate which size goes first, so that a drift of the machine's speed
                # falls on both.
                sizes = ("small", "large") if number % 2 == 0 else ("large", "small")
                for size in sizes:
                    limit = SMALL if size == "small" else 0
                    result = run_child(kind, files[kind], limit, args.whole, repeats)
                    found.setdefault((kind, size), []).append(result)
                    print(f"round {number + 1} {kind} {size}: {result}", file=sys.stderr)
                if args.plugin:
                    small = Path(tmp) / f"small-{kind}.txt"
                    small.write_text("\n".join(iter_lines(files[kind], SMALL)) + "\n",
                                     encoding="utf-8")
                    result = run_plugin_child(kind, files[kind], small)
                    found.setdefault((kind, "plugin"), []).append(result)
                    print(f"round {number + 1} {kind} plugin: {result}", file=sys.stderr)
    print(render(args, found))
    return 0


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def render(args: argparse.Namespace, found: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    """The table and a line per list, from each child's figures."""
    read = "read whole, then parsed" if args.whole else "streamed into the parse"
    lines = [f"{args.rounds} round(s), medians; lines {read}; checks over {PROBES} probes, "
             f"half hits; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", "",
             "| list | entries | load s | RSS added MB | peak added MB | check ns "
             "| check vs 10 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for kind in ("dst", "src"):
        small, large = found[(kind, "small")], found[(kind, "large")]
        base = _median(small, "check_ns")
        for runs in (small, large):
            entries = runs[0]["entries"]
            ratio = _median(runs, "check_ns") / base
            lines.append(f"| {kind} | {entries:,} | {_median(runs, 'load_s'):.2f} "
                         f"| {_median(runs, 'rss_mb'):.1f} | {_median(runs, 'peak_mb'):.1f} "
                         f"| {_median(runs, 'check_ns'):.0f} | {ratio:.2f}x |")
        entries = large[0]["entries"]
        plugin = found.get((kind, "plugin"))
        if plugin:
            lines.append(f"| acl {kind} file: | {entries:,} | {_median(plugin, 'load_s'):.2f} "
                         f"| {_median(plugin, 'rss_mb'):.1f} "
                         f"| {_median(plugin, 'peak_mb'):.1f} | | |")
        summary.append(f"{kind} {entries:,}: load {_median(large, 'load_s'):.2f} s, "
                       f"+{_median(large, 'rss_mb'):.0f} MB RSS; check "
                       f"{_median(large, 'check_ns') / base:.2f}x the {SMALL}-entry cost"
                       + (f"; through the acl plugin: load {_median(plugin, 'load_s'):.2f} s, "
                          f"+{_median(plugin, 'rss_mb'):.0f} MB RSS" if plugin else ""))
    return "\n".join([*lines, "", *summary])


if __name__ == "__main__":
    if sys.argv[1:2] == ["plugin"]:
        kind, path, small = sys.argv[2:5]
        print(json.dumps(plugin_child(kind, Path(path), Path(small))))
        sys.exit(0)
    if sys.argv[1:2] == ["child"]:
        kind, path, limit, mode, repeats = sys.argv[2:7]
        print(json.dumps(child(kind, Path(path), int(limit), mode == "whole", int(repeats))))
        sys.exit(0)
    sys.exit(main())
