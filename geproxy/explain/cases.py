"""``geproxy explain --cases FILE``: policy tests, the intent of a policy kept beside it.

One case per line, ``#`` comments and blank lines aside::

    CLIENT USER METHOD TARGET [at TIME] -> EXPECT [rule ID]

    10.1.2.3 alice CONNECT api.example.com:443 -> allow
    192.0.2.9 - GET http://example.com/ -> 403
    10.1.2.3 bob GET http://blocked.example/ -> deny rule blocked
    10.1.2.3 bob GET http://example.com/ at 2026-12-05T10:00+01:00 -> deny rule weekend

``USER`` is ``-`` for a client without a user (a configuration with ``[auth]`` answers it
407); any other name is taken as authenticated, as ``explain --user`` does. ``EXPECT`` is
``allow`` (tunnelled, forwarded, or answered below 400), ``deny`` (refused by policy: 403,
or the connection closed at connect), ``407``, or any status the proxy itself answers
(``200`` for a tunnel). ``rule ID`` requires the deciding rule too: a refusal's, or for
``allow`` the ``acl`` rule that let it through. ``at TIME`` decides the case for that
time instead of now (``time`` conditions), an ISO 8601 date and time (``2026-12-05T10:00``;
with an offset, ``+01:00`` or ``Z``; without one, in the system's zone).

Each case is decided as ``--replay`` decides a logged request (:class:`Decider`: no
resolution, no connection, the configuration loaded once), in the file's order. The first
case that gets something else stops the run: ``FILE:LINE: expected X, got Y (rule Z)``, exit
1; all passing prints ``N cases passed``, exit 0. The whole file is read first: a malformed
line is reported with its number, exit 2, before any case runs.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Optional, TextIO

from ..errors import Denied
from .dryrun import Answer, Decider

__all__ = ["Case", "CaseError", "parse_cases", "run_cases"]

_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]+")
_RULE = re.compile(r"\S+")


class CaseError(ValueError):
    """A malformed case line; the message names the file and the line."""


@dataclass(frozen=True)
class Case:
    number: int
    client: str
    user: Optional[str]
    method: str
    target: str
    #: ``allow``, ``deny`` or a status, as written.
    expect: str
    rule: Optional[str] = None
    #: ``at TIME``: the time it is decided for (``time.time()`` seconds); None for now.
    at: Optional[float] = None

    @property
    def expected(self) -> str:
        return self.expect + (f" rule {self.rule}" if self.rule else "")


def _case(number: int, text: str) -> Case:
    """One line; raises ValueError saying what is wrong with it."""
    request, arrow, expectation = text.partition("->")
    if not arrow:
        raise ValueError("no '->' between the request and what it must get")
    words = request.split()
    at = None
    if len(words) == 6 and words[4] == "at":
        try:
            at = datetime.datetime.fromisoformat(words[5]).timestamp()
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {words[5]!r} (2026-12-05T10:00, "
                             "2026-12-05T10:00+01:00)") from None
        words = words[:4]
    if len(words) != 4:
        raise ValueError("the request is CLIENT USER METHOD TARGET [at TIME], not "
                         f"{len(words)} words")
    client, user, method, target = words
    try:
        ipaddress.ip_address(client)
    except ValueError:
        raise ValueError(f"not a client address: {client!r}") from None
    if not _METHOD.fullmatch(method):
        raise ValueError(f"not a method: {method!r} (methods are upper case)")
    wanted = expectation.split()
    if not wanted:
        raise ValueError("nothing after '->': allow, deny or a status")
    expect, rest = wanted[0], wanted[1:]
    if expect not in ("allow", "deny") and not (
            expect.isdigit() and len(expect) == 3 and 100 <= int(expect) <= 599):
        raise ValueError(f"expected allow, deny or a status, not {expect!r}")
    rule = None
    if rest:
        # A rule without an id is named "line N": two words.
        unnamed = len(rest) == 3 and rest[1] == "line" and rest[2].isdigit()
        if rest[0] != "rule" or not (len(rest) == 2 or unnamed):
            raise ValueError(f"after {expect!r} only 'rule ID' may follow, not "
                             f"{' '.join(rest)!r}")
        rule = " ".join(rest[1:])
    return Case(number, client, None if user == "-" else user, method, target, expect, rule,
                at)


def parse_cases(text: str, name: str) -> list[Case]:
    """Every case of ``text`` (the file ``name``); raises CaseError for the first malformed
    line."""
    cases = []
    for number, line in enumerate(text.splitlines(), 1):
        body = re.sub(r"(^|\s)#.*", "", line).strip()
        if not body:
            continue
        try:
            cases.append(_case(number, body))
        except ValueError as exc:
            raise CaseError(f"{name}:{number}: {exc}: {line.strip()!r}") from None
    return cases


def _got(answer: Answer) -> str:
    """What a case's EXPECT would be to match ``answer``."""
    if answer.allowed:
        return "allow"
    if answer.status == 403 or (answer.status == 0 and isinstance(answer.error, Denied)):
        return "deny"
    return str(answer.status)


def matches(case: Case, answer: Answer, rule: Optional[str]) -> bool:
    got = _got(answer)
    if case.expect in ("allow", "deny"):
        ok = got == case.expect
    else:
        ok = answer.status == int(case.expect)
    return ok and (case.rule is None or case.rule == rule)


def run_cases(config_path: str, cases_path: str, out: Optional[TextIO] = None,
              err: Optional[TextIO] = None) -> int:
    """Run the cases of ``cases_path`` under ``config_path``; the exit status: 0 all pass, 1
    one did not (the first is printed), 2 a malformed or unreadable file. Raises
    ConfigError for a bad configuration."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with open(cases_path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"geproxy explain: cannot read {cases_path}: {exc}", file=err)
        return 2
    try:
        cases = parse_cases(text, cases_path)
    except CaseError as exc:
        print(exc, file=err)
        return 2
    decider = Decider(config_path)
    for case in cases:
        decision = decider.decide(case.method, case.target, case.client, case.user, case.at)
        if not matches(case, decision.answer, decision.rule):
            got = _got(decision.answer)
            out.write(f"{cases_path}:{case.number}: expected {case.expected}, got {got} "
                      f"(rule {decision.rule or '-'})\n")
            return 1
    out.write(f"{len(cases)} cases passed\n")
    return 0
