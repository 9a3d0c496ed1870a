"""What each feature costs a keep-alive request and a CONNECT cycle: geproxy-1 measured with
the audited configuration, then with one part taken off after another, down to the core
alone, beside the gevent floor, in one run.

    python bench/features.py                  # 3 rounds of 5 s per measure, ~6 minutes
    python bench/features.py --rounds 5 --save

The steps, each the one before less something:

1. `audited`: the configuration the performance targets are stated for (subjects.py: every
   built-in plugin, a JSON access log to a file, a `dst` rule walked for every request);
2. `no access log`: `access_log = off`;
3. `no rules`: the bench's own config (`[acl] rules` back to the default, decided per
   client address at connect);
4. `no metrics`: `disable = metrics`;
5. `core only`: every built-in plugin off but the system resolver (`resolve` needs one);
   no policy, no guard, no cache, nothing counted.

Then the floors of bench/floor.py. Each round runs every step in turn; the table gives the
medians of CPU per item (user and kernel together, ms), and what each step's removal saved
(the difference of the medians, in µs): the price of that feature on this machine now.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import floor
import procs
import subjects

BENCH_DIR = Path(__file__).resolve().parent
CLIENTS = 50
STEPS = ("audited", "no access log", "no rules", "no metrics", "core only")
#: Every built-in plugin but the one resolver `core only` keeps.
CORE_ONLY_DISABLE = ("resolver", "dnscache", "auth", "acl", "external", "parent", "pac", "sni",
                     "destinations", "metrics", "access_log")


def config(step: str, port: int, workdir: Path) -> str:
    """The geproxy config of ``step`` (one of STEPS)."""
    if step == "audited":
        return subjects.geproxy_config(port, "1", access_log=workdir / "access.log")
    if step == "no access log":
        text = subjects.geproxy_config(port, "1", access_log=workdir / "access.log")
        return text.replace(f"access_log = {workdir / 'access.log'}\nlog_format = json\n",
                            "access_log = off\n")
    text = subjects.geproxy_config(port, "1")
    if step == "no rules":
        return text
    foreign = subjects.foreign_plugins()
    if step == "no metrics":
        disabled = ["metrics", *foreign]
    else:  # core only: no plugin sections either (a disabled plugin's section is an error)
        disabled = [*CORE_ONLY_DISABLE, *foreign]
        text = text.split("\n[acl]\n", 1)[0] + "\n"
    lines = [line for line in text.splitlines() if not line.startswith("disable =")]
    lines.insert(lines.index("[geproxy]") + 1, f"disable = {' '.join(disabled)}")
    return "\n".join(lines) + "\n"


def start(step: str, workdir: Path) -> procs.Server:
    home = workdir / step.replace(" ", "-")
    home.mkdir(exist_ok=True)
    if step in floor.YARDSTICKS:
        return floor.start(step, workdir)
    port = procs.free_port()
    conf = home / "geproxy.ini"
    conf.write_text(config(step, port, home))
    command = [sys.executable, "-m", "geproxy", "--config", str(conf)]
    return procs.start_server("geproxy", command, port, home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="per measure (default 5)")
    parser.add_argument("--save", action="store_true",
                        help="also save the table as bench/results/features-*.md")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        parser.error("--rounds 1-20, --seconds 1-60")
    names = [*STEPS, *floor.YARDSTICKS]
    started = datetime.datetime.now()
    found: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="geproxy-features-") as tmp:
        origins = floor.in_rounds(Path(tmp), names, start, args.rounds, args.seconds, found)
    text = "\n".join([
        f"# What geproxy's features cost, {started:%Y-%m-%d %H:%M:%S}", "",
        f"- machine: {procs.machine()}; {subjects._geproxy_version()}; origin "
        f"{origins.version}", "", render(args, found), ""])
    procs.publish(text, "features", started, args.save)
    return 0


def render(args: argparse.Namespace, found: dict[str, list[dict[str, float]]]) -> str:
    """A row per step: CPU per item (medians) and what taking that step's feature off saved
    (the difference from the row above, µs)."""
    lines = [f"{args.rounds} rounds of {args.seconds} s per measure, {CLIENTS} clients; CPU "
             "(user and kernel) in ms per item, medians; saved: the previous row's median "
             "less this row's, in µs", "",
             "| step | keep-alive request | saved µs | CONNECT cycle | saved µs |",
             "|---|---:|---:|---:|---:|"]
    previous: dict[str, float] = {}
    for name, runs in found.items():
        if not runs:
            continue
        row = [name]
        for key in ("request_total", "cycle_total"):
            median = statistics.median(run[key] for run in runs)
            row.append(f"{median:.3f}")
            before = previous.get(key)
            row.append(f"{(before - median) * 1000:.1f}"
                       if before is not None and name in STEPS else "")
            previous[key] = median
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
