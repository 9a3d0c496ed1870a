"""How fast ``geproxy explain --replay`` decides an access log: lines per second.

    python bench/replay.py                  # 100,000 lines
    python bench/replay.py --lines 1000000

Writes, in a temporary directory, a json access log of made-up traffic (300 hosts, a
blocked one, CONNECTs and GETs from 5,000 client addresses, four users and none) and a
configuration whose ``[acl]`` rules differ from the ones the log was "written" under, runs
``python -m geproxy explain --replay`` on them once, and prints the wall and CPU time of that
process and its lines per second. Nothing is asserted: the figures depend on the machine
and what else runs on it (compare the CPU figure on a busy one).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """\
[geproxy]
access_log = off
[acl]
rules =
    blocked: deny dst blocked.example .bad.example
    nobob: deny user bob dst h1.example.com h2.example.com
    office: allow src 10.0.0.0/8
    others: deny all
"""


def write_log(path: Path, lines: int, seed: int = 1) -> None:
    """``lines`` json access-log lines, as geproxy writes them (the fields replay reads)."""
    rng = random.Random(seed)
    hosts = [f"h{i}.example.com" for i in range(300)] + ["blocked.example"]
    users = [None, "alice", "bob", "carol", "dave"]
    with path.open("w") as out:
        for number in range(lines):
            host = rng.choice(hosts)
            if rng.random() < 0.6:
                method, target = "CONNECT", f"{host}:443"
            else:
                method, target = "GET", f"http://{host}/p{rng.randint(0, 50)}"
            denied = host == "blocked.example"
            out.write(json.dumps({
                "time": 1765000000 + number,
                "client": f"10.1.{rng.randint(0, 19)}.{rng.randint(1, 250)}",
                "user": rng.choice(users), "method": method, "target": target,
                "status": 403 if denied else 200,
                "error": "http_request_denied" if denied else None,
                "rule": "blocked" if denied else None,
                "upstream": None if denied else "192.0.2.1:443",
            }) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        log, config = Path(directory) / "access.log", Path(directory) / "new.ini"
        write_log(log, args.lines)
        config.write_text(CONFIG)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config",
                               str(config), "--replay", str(log)],
                              capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr)
        return 1
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = next(line for line in done.stdout.splitlines() if line.startswith("replayed"))
    print(summary)
    print(f"{args.lines} lines: {wall:.2f} s wall ({args.lines / wall:,.0f} lines/s), "
          f"{cpu:.2f} s CPU ({args.lines / cpu:,.0f} lines/s), start-up included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
