"""The rules of ``[acl]``: their grammar, and how a request is walked through them.

A rule is ``[ID:] allow|deny`` then ``all``, or conditions (``conditions.py``), and
optionally ``deny_page NAME`` last. The conditions of a rule are evaluated left to right and
the rule stops at its first condition that does not match; the first rule whose conditions
all match decides; no match denies (rule id ``default``).

A rule is decided without credentials unless the walk reaches one of its ``user`` or
``group`` conditions: only then is the user asked for (``ctx.authenticate``), and a request
that proves none is answered 407 (``NeedsUser``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from geproxy import Context, Request, did_you_mean

from .conditions import KINDS, SQUID_NAMES, Condition, Kind, NeedsUser, Sources, Subject, fold
from .words import Word, split_words

__all__ = ["Rule", "Verdict", "Plan", "Step", "NeedsUser", "parse_rule", "parse_list_line",
           "make_plan", "DEFAULT_ID", "DEFAULT_DENY", "CONNECT_PORTS_ID", "RESERVED_IDS",
           "ListMaker"]

DEFAULT_ID = "default"
CONNECT_PORTS_ID = "connect_ports"
RESERVED_IDS = (DEFAULT_ID, CONNECT_PORTS_ID)
PAGE_KEYWORD = "deny_page"

_ID = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:\s*(.*)", re.DOTALL)
_LIST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

#: ``(kind, path) -> the shared list``: how a ``file:`` value becomes its source.
ListMaker = Callable[[Kind, str], Any]


@dataclass(frozen=True)
class Rule:
    """One line of ``rules``."""

    id: str
    allow: bool
    text: str
    conditions: tuple[Condition, ...] = ()
    #: The rule's place among the rules (1 for the first).
    number: int = 0
    #: Where it is written, ``geproxy.ini:23``, when known.
    location: Optional[str] = None
    #: ``deny_page NAME``: the error page of the refusals it decides.
    page: Optional[str] = None

    @property
    def where(self) -> str:
        """``rule ID (geproxy.ini:23)``, as explain and the log name it."""
        return f"rule {self.id}" + (f" ({self.location})" if self.location else "")

    @property
    def named(self) -> str:
        """``rule ID, geproxy.ini:23``: ``where`` for inside parentheses."""
        return f"rule {self.id}" + (f", {self.location}" if self.location else "")

    @property
    def needs_user(self) -> bool:
        return any(c.needs_user for c in self.conditions)


@dataclass(frozen=True)
class Verdict:
    allow: bool
    rule: str
    #: The rule that decided (None for the default and connect_ports denials).
    by: Optional[Rule] = field(default=None, compare=False)

    def __str__(self) -> str:
        where = self.by.named if self.by is not None else f"rule {self.rule}"
        return f"{'allow' if self.allow else 'deny'} ({where})"


DEFAULT_DENY = Verdict(False, DEFAULT_ID)


@dataclass(frozen=True)
class Step:
    """A rule as one client sees it: its conditions with those decided by the client's
    address left out (they all matched)."""

    rule: Rule
    conditions: tuple[Condition, ...]
    #: What the rule decides when its conditions match: made once, not per request.
    verdict: "Verdict" = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.rule.allow, self.rule.id,
                                                    self.rule))


@dataclass(frozen=True)
class Plan:
    """What the rules say about one client: a verdict known at connect time, or the rules
    that may match its requests, in order."""

    policy: Any
    verdict: Optional[Verdict]
    steps: tuple[Step, ...] = ()
    #: The lists' version the plan was made with: a changed ``src`` list makes a new plan.
    version: int = 0

    def __str__(self) -> str:
        if self.verdict is not None:
            return f"decided at connect: {self.verdict}"
        return "decided per request, by rules " + ", ".join(s.rule.id for s in self.steps)

    def decide(self, ctx: Context, request: Request) -> Verdict:
        """The first rule whose conditions all match; raises NeedsUser (its args: the
        rule and the condition) when the walk needs a user the request does not prove."""
        if self.verdict is not None:
            return self.verdict
        subject = Subject(ctx, request)
        for step in self.steps:
            try:
                for condition in step.conditions:
                    if not condition.matches(subject):
                        break
                else:
                    return step.verdict
            except NeedsUser as exc:
                raise NeedsUser(step.rule, exc.args[0]) from None
        return DEFAULT_DENY


def make_plan(policy: Any, rules: Sequence[Rule], address: Any, version: int) -> Plan:
    """Walk the rules for one client address.

    A rule whose conditions before its first ``user``/``group`` one include an address
    condition that fails for this client never matches its requests, and never asks for a
    user: it is left out. Address conditions that match are dropped from the steps. The
    first remaining rule with no condition left decides at connect time when it comes
    first; otherwise it ends the list (nothing after it is reachable).
    """
    steps: list[Step] = []
    for rule in rules:
        kept: list[Condition] = []
        reachable = True
        for condition in rule.conditions:
            if condition.address_only:
                if condition.matches_address(address):
                    continue
                if not any(c.needs_user for c in kept):
                    reachable = False
                    break
                kept.append(_NEVER)  # fails there, after the user was asked
                break
            kept.append(condition)
        if not reachable:
            continue
        if not kept:
            if not steps:
                return Plan(policy, Verdict(rule.allow, rule.id, rule), version=version)
            steps.append(Step(rule, ()))
            break
        steps.append(Step(rule, tuple(kept)))
    if not steps:
        return Plan(policy, DEFAULT_DENY, version=version)
    return Plan(policy, None, tuple(steps), version)


class _Never:
    """A condition that never matches: an address condition that failed after a user
    condition was reached."""

    needs_user = False
    address_only = False
    text = "(the client's address)"

    def matches(self, subject: Subject) -> bool:
        return False


_NEVER: Any = _Never()


# -- parsing --------------------------------------------------------------------------------


class _Parser:
    """Turns words into conditions, with the named lists and the ``file:`` lists."""

    def __init__(self, lists: Mapping[str, Condition], make_list: ListMaker,
                 fold_case: bool, tz: Any) -> None:
        self.lists = lists
        self.make_list = make_list
        self.fold_case = fold_case
        self.tz = tz

    def conditions(self, words: list[Word]) -> list[Condition]:
        out: list[Condition] = []
        seen: set[str] = set()
        i = 0
        while i < len(words):
            word = words[i]
            text = word.text
            if word.quoted:
                raise ValueError(f"expected a condition, not the value {word}")
            negated = text.startswith("!")
            name = text[1:] if negated else text
            if name.startswith("@"):
                named = self.lists.get(name[1:])
                if named is None:
                    known = ", ".join(sorted(self.lists)) or "none"
                    raise ValueError(f"no list named {name[1:]!r} in [acl] lists "
                                     f"(lists: {known})")
                out.append(Condition(named.kind, named.sources, text,
                                     named.negated != negated, named.fold_case, named.tz))
                i += 1
                continue
            kind = KINDS.get(name)
            if kind is None:
                if name == "all":
                    raise ValueError("all stands alone: no conditions go with it")
                if name == PAGE_KEYWORD:
                    raise ValueError("deny_page NAME comes last, after the conditions")
                raise ValueError(f"unknown condition {name!r}"
                                 + did_you_mean(name, KINDS, SQUID_NAMES)
                                 + f" (conditions: {', '.join(KINDS)})")
            if name in seen and name != "external":  # each external names its own helper
                raise ValueError(f"{name} given twice: list its values once")
            seen.add(name)
            i += 1
            values: list[Word] = []
            while i < len(words) and (words[i].quoted or not _is_keyword(words[i].text)):
                values.append(words[i])
                i += 1
            out.append(self.condition(kind, text, values, negated))
        return out

    def condition(self, kind: Kind, written: str, values: list[Word],
                  negated: bool) -> Condition:
        if not values:
            raise ValueError(f"{kind.name} needs at least one value")
        if kind.name == "external" and (values[0].quoted
                                        or any(not w.quoted and w.text.startswith("file:")
                                               for w in values)):
            raise ValueError("external NAME [ARG...]: a helper's name, then its arguments "
                             "(no file: lists)")
        inline = [w.text for w in values if w.quoted or not w.text.startswith("file:")]
        files = []
        for word in values:
            if not word.quoted and word.text.startswith("file:"):
                path = word.text[len("file:"):]
                if not path:
                    raise ValueError("file: needs a path")
                files.append(self.make_list(kind, path))
        built = kind.build(fold(kind, inline, self.fold_case)) if inline else None
        text = " ".join([written] + [str(w) for w in values])
        return Condition(kind, Sources(built, files), text, negated, self.fold_case, self.tz)


def _is_keyword(text: str) -> bool:
    """Whether an unquoted word starts a new condition (or the page) rather than being a
    value of the one before."""
    name = text[1:] if text.startswith("!") else text
    return name in KINDS or name.startswith("@") or name == PAGE_KEYWORD


def parse_rule(text: str, number: int, lists: Mapping[str, Condition],
               make_list: ListMaker, fold_case: bool = True, tz: Any = None) -> Rule:
    """One line of ``rules``; raises ValueError saying what is wrong with it."""
    match = _ID.fullmatch(text.strip())
    rule_id, body = (match.group(1), match.group(2)) if match else (f"line {number}", text)
    if rule_id in RESERVED_IDS:
        raise ValueError(f"the rule id {rule_id!r} is reserved")
    words = split_words(body)
    if not words or words[0].quoted or words[0].text not in ("allow", "deny"):
        first = words[0].text if words else ""
        raise ValueError("a rule starts with allow or deny"
                         + did_you_mean(first, ("allow", "deny"),
                                        {"http_access": "allow or deny"}))
    allow, rest = words[0].text == "allow", words[1:]
    page = None
    if len(rest) >= 2 and not rest[-2].quoted and rest[-2].text == PAGE_KEYWORD:
        if allow:
            raise ValueError("deny_page goes with deny rules: an allow refuses nobody")
        page = rest[-1].text
        if not _PAGE_NAME.fullmatch(page):
            raise ValueError(f"not a page name (letters, digits, . _ -): {page!r}")
        rest = rest[:-2]
    if [w.text for w in rest] == ["all"] and not rest[0].quoted:
        return Rule(rule_id, allow, text, (), number, page=page)
    if not rest:
        raise ValueError(f"nothing to match: write '{words[0].text} all' or give conditions")
    parser = _Parser(lists, make_list, fold_case, tz)
    return Rule(rule_id, allow, text, tuple(parser.conditions(rest)), number, page=page)


def parse_list_line(text: str, lists: Mapping[str, Condition], make_list: ListMaker,
                    fold_case: bool = True, tz: Any = None) -> tuple[str, Condition]:
    """One line of ``[acl] lists``: ``NAME: CONDITION VALUE...`` (one condition, ``!``
    allowed); ValueError saying what is wrong."""
    name, sep, body = text.partition(":")
    name = name.strip()
    if not sep or not _LIST_NAME.fullmatch(name):
        raise ValueError("a list is NAME: CONDITION VALUE...")
    if name in lists:
        raise ValueError(f"the list {name!r} is given twice")
    conditions = _Parser(lists, make_list, fold_case, tz).conditions(split_words(body))
    if len(conditions) != 1:
        raise ValueError("a list is one condition and its values")
    return name, conditions[0]
