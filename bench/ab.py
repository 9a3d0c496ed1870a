"""A/B: geproxy's CPU per CONNECT cycle and per keep-alive request, this checkout against
another commit, in alternating runs under the same load.

    python bench/ab.py                      # the working tree against HEAD
    python bench/ab.py --base HEAD~3 --rounds 5 --seconds 8

Rates on a shared 2-core machine move by 20% between identical runs; the proxy's CPU
seconds per 1,000 cycles or requests move by a few percent, and alternating A, B, A, B
spreads whatever else the machine does over both. The table gives each side's median and
B/A: below 1.00 means the working tree spends less.

Both sides run as `python -m geproxy` (workers = 1, the bench's config from subjects.py)
from a directory of links (`geproxy`, `geproxy_plugins`) put first on PYTHONPATH: the base
from a detached `git worktree` of the commit, removed at the end, the other from this
checkout. Origin: nginx when installed, else bench/origin.c.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import measure
import origin
import procs
import subjects

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CLIENTS = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare with (A)")
    parser.add_argument("--rounds", type=int, default=3, help="A, B pairs (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="per measure (default 5)")
    parser.add_argument("--measures", default="cycles,keepalive",
                        help="comma-separated: cycles, keepalive")
    parser.add_argument("--audited", action="store_true",
                        help="the audited config of the performance targets (subjects.py: "
                             "a JSON access log to a file, a dst rule), not the bench's")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        parser.error("--rounds 1-20, --seconds 1-60")
    return args


def link_tree(source: Path, into: Path) -> Path:
    """A directory holding `geproxy` and `geproxy_plugins` links into source's tree."""
    into.mkdir()
    (into / "geproxy").symlink_to(source / "geproxy")
    (into / "geproxy_plugins").symlink_to(source / "plugins")
    return into


def run_side(path_dir: Path, workdir: Path, loadgen: Path, origins: origin.Origins,
             measures: list[str], seconds: int, audited: bool = False) -> dict[str, float]:
    """Start geproxy from path_dir, measure, stop it (measure.cpu_apart's figures)."""
    port = procs.free_port()
    conf = workdir / "geproxy.ini"
    log = workdir / "access.log" if audited else None
    conf.write_text(subjects.geproxy_config(port, "1", access_log=log))
    os.environ["PYTHONPATH"] = str(path_dir)
    try:
        server = procs.start_server("geproxy-ab", [sys.executable, "-m", "geproxy",
                                                   "--config", str(conf)], port, workdir)
    finally:
        del os.environ["PYTHONPATH"]
    target = measure.Target(origins.port, server, origins.pid)
    try:
        return measure.cpu_apart(loadgen, target, CLIENTS, seconds,
                                 cycles="cycles" in measures, keepalive="keepalive" in measures)
    finally:
        procs.stop_server(server)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    measures = [name.strip() for name in args.measures.split(",") if name.strip()]
    if not set(measures) <= {"cycles", "keepalive"} or not measures:
        raise SystemExit("ab: --measures takes cycles, keepalive")
    procs.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="geproxy-ab-") as tmp:
        workdir = Path(tmp)
        base_tree = workdir / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(base_tree), args.base], check=True)
        try:
            sides = {"A": link_tree(base_tree, workdir / "path-a"),
                     "B": link_tree(ROOT, workdir / "path-b")}
            loadgen = procs.build_c(BENCH_DIR / "loadgen.c", workdir)
            origins = origin.start("auto", workdir, 2**20, procs.raise_nofile())
            found: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
            try:
                for number in range(args.rounds):
                    for side in ("A", "B"):
                        found[side].append(run_side(sides[side], workdir, loadgen, origins,
                                                    measures, args.seconds, args.audited))
                        print(f"round {number + 1} {side}: {found[side][-1]}", file=sys.stderr)
            finally:
                origins.stop()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base_tree)], check=False)
    print(render(args, measures, found))
    return 0


def render(args: argparse.Namespace, measures: list[str],
           found: dict[str, list[dict[str, float]]]) -> str:
    labels = {"cycles": ("proxy CPU ms per CONNECT cycle", "cycle_total", "cycles_s",
                         "cycles/s"),
              "keepalive": ("proxy CPU ms per keep-alive request", "request_total", "rps",
                            "req/s")}
    config = "the audited config" if args.audited else "the bench's config"
    lines = [f"A = {args.base}, B = working tree, {config}; {args.rounds} rounds of "
             f"{args.seconds} s, {CLIENTS} clients, medians", "",
             "| measure | A | B | B/A |", "|---|---:|---:|---:|"]
    for name in measures:
        label, cpu, rate, unit = labels[name]
        for key, text, digits in ((cpu, label, 4), (rate, unit, 0)):
            a = statistics.median(run[key] for run in found["A"])
            b = statistics.median(run[key] for run in found["B"])
            lines.append(f"| {text} | {a:.{digits}f} | {b:.{digits}f} | {b / a:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
