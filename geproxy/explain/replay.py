"""``geproxy explain --replay LOG``: what a configuration would have decided for the requests
of an access log, and where that differs from what was decided then.

Each logged request is decided again, under the configuration given, by :class:`Decider`:
``on_connect``, ``on_request`` and ``route`` as the proxy calls them, with
``ctx.decide_only`` set, ``ctx.user`` the logged user (taken as established: no password is
checked; ``-`` or null is none), the client address the logged one, ``ctx.at`` the logged
time (``ctx.decision_time()`` for time-dependent policy), on the first listener. Nothing is
resolved, connected or sent. The configuration is loaded once for the whole log.

The verdicts compared are the policy's: ``allowed`` when the policy lets the request
through (whatever then happened upstream: a DNS error, a refused connection or the origin's
404 was still let through), ``refused`` when it answers for itself with 400 or more (403,
407, a plugin's own answer, 500 when a plugin fails: the proxy fails closed) or closes the
connection. How each logged outcome is read is in logs.py. A line is counted apart, never
guessed at, when its outcome depends on what the log does not hold (logs.REASONS):

- the new configuration answers 407 to a request logged without a user: whether the client
  would have sent a password is not known (logged 407 then, 407 now: unchanged);
- the destination guard decided (``destination_ip_prohibited``), old or new: it judges the
  addresses of a DNS answer, and nothing is resolved here. When the new policy refuses the
  request before any lookup the verdict is refused both ways, and unchanged;
- a tunnel closed on its first bytes, a connection limit, a failure of the proxy, no answer;
- a client refused at connect before its request was read, that the new configuration lets
  connect: its request is unknown.

Malformed requests are skipped: no policy decided them. The logged user is the identity
established then; a new configuration that authenticates differently (another htpasswd) is
not known to change it. The listener the request came to is not logged: the first one of
the configuration stands for every one.

Output: one line per changed verdict, then the summary (counts, the reasons of the lines
counted apart, the changes by the rule that now decides and by destination host). Exit 0
when no verdict changed, 1 when one did, 2 when the log cannot be read. A line that cannot
be read is reported with its number and counted; more than ``max_bad`` of them, or a log of
nothing else, stop the replay (2).
"""

from __future__ import annotations

import gzip
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator, Optional, TextIO

from ..errors import ClientError, LoopDetected
from .dryrun import Decider, Decision
from .logs import (
    ALLOWED,
    DENIED,
    FORMATS,
    GUARD,
    REASONS,
    REFUSED,
    REFUSED_AT_CONNECT,
    SKIPPED,
    UNDECIDABLE,
    BadLine,
    Logged,
    sniff,
)

__all__ = ["replay", "Tally", "judge"]

log = logging.getLogger(__name__)

UNCHANGED = "unchanged"
TO_REFUSED = "allowed -> refused"
TO_ALLOWED = "refused -> allowed"
#: Unreadable lines a replay reports and counts before it gives up.
MAX_BAD_LINES = 10
#: Rules and hosts the summary lists.
TOP = 10


@dataclass
class Tally:
    """The counts of a replay."""

    replayed: int = 0
    unchanged: int = 0
    to_refused: int = 0
    to_allowed: int = 0
    bad: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    undecidable: Counter[str] = field(default_factory=Counter)
    #: Changes by (direction, rule that decides now).
    by_rule: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_host: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> int:
        return self.to_refused + self.to_allowed


def judge(logged: Logged, decider: Decider) -> tuple[str, str, Optional[Decision]]:
    """What became of one logged request: ``(what, reason, decision)``, ``what`` being
    UNCHANGED, TO_REFUSED, TO_ALLOWED, SKIPPED or UNDECIDABLE and ``reason`` a key of
    REASONS for the last two; ``decision`` is the new one, when one was made."""
    kind = logged.kind
    if kind in (SKIPPED, UNDECIDABLE):
        return kind, logged.reason, None
    if kind == REFUSED_AT_CONNECT:
        refusal = decider.decide_connect(logged.client, logged.time)
        if refusal is not None:
            return UNCHANGED, "", refusal
        return UNDECIDABLE, "request at connect", None
    decision = decider.decide(logged.method, logged.target, logged.client, logged.user,
                              logged.time)
    answer = decision.answer
    if isinstance(answer.error, ClientError):
        return SKIPPED, "target", decision
    # A loop is found after the policy let the request through, as the log reads it.
    allowed = answer.allowed or isinstance(answer.error, LoopDetected)
    if not allowed and answer.status == 407 and logged.user is None:
        if kind == REFUSED and logged.status == 407:
            return UNCHANGED, "", decision
        return UNDECIDABLE, "password", decision
    if kind in (GUARD, DENIED):
        if not allowed:
            return UNCHANGED, "", decision
        return UNDECIDABLE, "dns" if kind == GUARD else "squid denied", decision
    was_allowed = kind == ALLOWED
    if allowed == was_allowed:
        return UNCHANGED, "", decision
    return (TO_REFUSED if was_allowed else TO_ALLOWED), "", decision


def _open(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _lines(handle: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(handle, 1):
        if line.strip():
            yield number, line


def _change_line(name: str, logged: Logged, what: str, decision: Optional[Decision]) -> str:
    new_rule = decision.rule if decision is not None and decision.rule else "-"
    status = decision.answer.status if decision is not None else None
    return (f"{name}:{logged.number}: {what}: {logged.client} {logged.user or '-'} "
            f"{logged.method} {logged.target}, old rule {logged.rule or '-'}, new rule "
            f"{new_rule}" + (f" ({status})" if status else ""))


def replay(config_path: str, log_path: str, out: Optional[TextIO] = None,
           err: Optional[TextIO] = None, log_format: Optional[str] = None, top: int = TOP,
           max_bad: int = MAX_BAD_LINES) -> int:
    """Replay ``log_path`` (``-``: standard input; ``.gz``: gzip) under ``config_path``;
    print the changes and the summary to ``out``, unreadable lines to ``err``. Returns the
    exit status: 0 nothing changed, 1 a verdict changed, 2 the log cannot be read. Raises
    ConfigError for a bad configuration. ``log_format``: one of logs.FORMATS, None to tell
    by the first line."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = "-" if log_path == "-" else log_path
    decider = Decider(config_path)
    tally = Tally()
    started = time.monotonic()
    try:
        handle = _open(log_path)
    except OSError as exc:
        print(f"geproxy explain: cannot read {log_path}: {exc.strerror or exc}", file=err)
        return 2
    try:
        fmt = log_format
        for number, line in _lines(handle):
            if fmt is None:
                fmt = sniff(line)
                if fmt is None:
                    print(f"{name}:{number}: not a line of the json, geproxy or squid "
                          "format (--log-format names it)", file=err)
                    return 2
            try:
                logged = FORMATS[fmt](number, line)
            except BadLine as exc:
                tally.bad += 1
                print(f"{name}:{number}: not a {fmt} access-log line: {exc}", file=err)
                if tally.bad > max_bad:
                    print(f"geproxy explain: {name}: more than {max_bad} unreadable lines, "
                          "stopped", file=err)
                    return 2
                continue
            tally.replayed += 1
            what, reason, decision = judge(logged, decider)
            if what == UNCHANGED:
                tally.unchanged += 1
            elif what == SKIPPED:
                tally.skipped[reason] += 1
            elif what == UNDECIDABLE:
                tally.undecidable[reason] += 1
            else:
                if what == TO_REFUSED:
                    tally.to_refused += 1
                else:
                    tally.to_allowed += 1
                rule = decision.rule if decision is not None and decision.rule else "-"
                tally.by_rule[(what, rule)] += 1
                tally.by_host[(decision.host if decision is not None else "") or "-"] += 1
                out.write(_change_line(name, logged, what, decision) + "\n")
    except OSError as exc:  # a gzip file cut short, a read error
        print(f"geproxy explain: cannot read {log_path}: {exc}", file=err)
        return 2
    finally:
        if handle is not sys.stdin:
            handle.close()
    elapsed = time.monotonic() - started
    log.info("replayed %d lines in %.2fs (%.0f lines/s)", tally.replayed + tally.bad,
             elapsed, (tally.replayed + tally.bad) / elapsed if elapsed > 0 else 0.0)
    if tally.bad and not tally.replayed:
        print(f"geproxy explain: {name}: no line could be read", file=err)
        return 2
    write_summary(out, name, fmt or "empty", tally, top)
    return 1 if tally.changed else 0


def write_summary(out: TextIO, name: str, fmt: str, tally: Tally, top: int = TOP) -> None:
    """The summary: counts, the reasons of the lines counted apart, the changes by rule and
    by host (the ``top`` most frequent of each)."""
    def say(label: str, text: str) -> None:
        out.write(f"{label:<12}{text}\n")

    say("replayed", f"{tally.replayed} requests of {name} ({fmt}): {tally.unchanged} "
                    f"unchanged, {tally.to_refused} {TO_REFUSED}, {tally.to_allowed} "
                    f"{TO_ALLOWED}, {sum(tally.skipped.values())} skipped, "
                    f"{sum(tally.undecidable.values())} undecidable"
                    + (f"; {tally.bad} unreadable lines" if tally.bad else ""))
    for label, counts in (("skipped", tally.skipped), ("undecidable", tally.undecidable)):
        for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            say(label, f"{count}: {REASONS.get(reason, reason)}")
    rules = sorted(tally.by_rule.items(), key=lambda item: (-item[1], item[0]))
    for (what, rule), count in rules[:top]:
        say("by rule", f"{rule}: {count} {what}")
    hosts = sorted(tally.by_host.items(), key=lambda item: (-item[1], item[0]))
    for host, count in hosts[:top]:
        say("by host", f"{host}: {count} changed")
    if len(rules) > top or len(hosts) > top:
        say("", f"(the {top} most frequent; --top N for more)")
