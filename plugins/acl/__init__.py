"""``acl``: who may go where, as ordered squid-like rules; CONNECT only to allowed ports.

The ``[acl]`` section (docs/configuration.md has the full reference)::

    [acl]
    connect_ports = 443 563
    mode = enforce
    rules =
        allow src 127.0.0.0/8 ::1
        intranet: allow src 10.0.0.0/8 dst .corp.example port 80,443
        deny all

Each rule is ``[id:] allow|deny`` followed by ``all`` or by conditions ``src``, ``dst``,
``port``, ``method``, ``user``, each with one or more values. Conditions AND together, the
values of one condition OR; the first rule that matches decides; no match denies (rule id
``default``). A CONNECT to a port outside ``connect_ports`` is denied before any rule is looked
at (rule id ``connect_ports``), like Squid's ``http_access deny CONNECT !SSL_ports``.

Where the decision is made: when every rule that could match a client, up to the first one
that surely does, is decided by the client's address alone, the verdict is known when the
client connects. A denied client is then refused in ``on_connect``: its first request is
answered 403 and the connection closed (``refuse_at_connect = answer``), or it is closed
before a byte is read (``close``); otherwise each request is decided in ``on_request``. The
per-client plan is kept in ``ctx.stash["acl"]``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from cachetools import LRUCache

from geproxy import (
    Config,
    ConfigError,
    Context,
    Denied,
    HostPatterns,
    OptionRegistry,
    Request,
    Response,
    errors,
    hookimpl,
    parse_port_ranges,
)
from geproxy.hosts import ip_literal, parse_network, unmapped

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
PortRange = tuple[int, int]

SECTION = "acl"
DEFAULT_CONNECT_PORTS = "443 563"
DEFAULT_RULES = "loopback: allow src 127.0.0.0/8 ::1"
MODES = ("enforce", "report")
#: What a client denied by its address alone gets: a 403 to its first request, or a close.
REFUSALS = ("answer", "close")
CONDITIONS = ("src", "dst", "port", "method", "user")
#: Rule ids the plugin gives its own denials; a rule may not take them.
DEFAULT_ID = "default"
CONNECT_PORTS_ID = "connect_ports"
REQUEST_KEY = "acl.request"
#: ctx.stash key set when the connection was counted: True when it is over the limit.
COUNTED_KEY = "_acl.over_limit"
PLAN_CACHE_SIZE = 4096

_ID = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:\s*(.*)")
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]+")


# -- matching -------------------------------------------------------------------------------


def client_ip(ctx: Context) -> IPAddress:
    return unmapped(ipaddress.ip_address(ctx.client_addr[0]))


@dataclass(frozen=True)
class Rule:
    """One line of ``rules``. A condition left out (None) matches anything."""

    id: str
    allow: bool
    text: str
    src: Optional[tuple[IPNetwork, ...]] = None
    dst: Optional[HostPatterns] = None
    ports: Optional[tuple[PortRange, ...]] = None
    methods: Optional[frozenset[str]] = None
    users: Optional[frozenset[str]] = None

    @property
    def src_only(self) -> bool:
        """Decided by the client's address alone (``all`` is, too)."""
        return (self.dst is None and self.ports is None and self.methods is None
                and self.users is None)

    def matches_client(self, address: IPAddress) -> bool:
        return self.src is None or any(address in network for network in self.src)

    def matches_request(self, ctx: Context, request: Request) -> bool:
        """Everything but ``src``, which the client's plan has already checked.

        A request addressed to the proxy itself (origin-form, no host) has no destination:
        ``dst`` and ``port`` conditions never match it. ``user`` never matches a request
        without an authenticated user.
        """
        to_proxy = not request.host
        if self.dst is not None and (
                to_proxy or not self.dst.matches(request.host, ip_literal(request.host))):
            return False
        if self.ports is not None and (
                to_proxy or not any(lo <= request.port <= hi for lo, hi in self.ports)):
            return False
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.users is not None and (ctx.user is None or ctx.user not in self.users):
            return False
        return True


@dataclass(frozen=True)
class Verdict:
    allow: bool
    rule: str

    def __str__(self) -> str:
        return f"{'allow' if self.allow else 'deny'} (rule {self.rule})"


DEFAULT_DENY = Verdict(False, DEFAULT_ID)


@dataclass(frozen=True)
class Plan:
    """What the rules say about one client: a verdict known at connect time, or the rules
    that may match its requests (their ``src`` matches it), in order."""

    policy: "Policy"
    verdict: Optional[Verdict]
    candidates: tuple[Rule, ...] = ()

    def __str__(self) -> str:
        if self.verdict is not None:
            return f"decided at connect: {self.verdict}"
        return "decided per request, by rules " + ", ".join(r.id for r in self.candidates)

    def decide(self, ctx: Context, request: Request) -> Verdict:
        if self.verdict is not None:
            return self.verdict
        for rule in self.candidates:
            if rule.matches_request(ctx, request):
                return Verdict(rule.allow, rule.id)
        return DEFAULT_DENY


@dataclass(frozen=True)
class Policy:
    """The parsed ``[acl]`` section; rebuilt whole by each ``configure``."""

    rules: tuple[Rule, ...]
    connect_ports: tuple[PortRange, ...]
    report: bool

    def connect_port_allowed(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.connect_ports)

    def plan(self, address: IPAddress) -> Plan:
        """Walk the rules for one client address.

        Rules whose ``src`` excludes the client can never match its requests and are
        skipped. The first remaining rule decides at connect time if it is ``src``-only;
        otherwise the remaining rules up to (and including) the first ``src``-only one are
        what each request is matched against. No remaining rule at all: denied at connect.
        """
        candidates: list[Rule] = []
        for rule in self.rules:
            if not rule.matches_client(address):
                continue
            if rule.src_only:
                if not candidates:
                    return Plan(self, Verdict(rule.allow, rule.id))
                candidates.append(rule)
                break  # it matches every request: nothing after it is reachable
            candidates.append(rule)
        if not candidates:
            return Plan(self, DEFAULT_DENY)
        return Plan(self, None, tuple(candidates))


# -- parsing --------------------------------------------------------------------------------


def _methods(values: Sequence[str]) -> frozenset[str]:
    for value in values:
        if not _METHOD.fullmatch(value):
            if _METHOD.fullmatch(value.upper()):
                raise ValueError(f"methods are case-sensitive: write {value.upper()!r}, "
                                 f"not {value!r}")
            raise ValueError(f"not a method: {value!r}")
    return frozenset(values)


def parse_rule(text: str, number: int) -> Rule:
    """One line of ``rules``; raises ValueError saying what is wrong with it."""
    match = _ID.fullmatch(text)
    rule_id, body = (match.group(1), match.group(2)) if match else (f"line {number}", text)
    if rule_id in (DEFAULT_ID, CONNECT_PORTS_ID):
        raise ValueError(f"the rule id {rule_id!r} is reserved")
    tokens = [t for t in re.split(r"[\s,]+", body.strip()) if t]
    if not tokens or tokens[0] not in ("allow", "deny"):
        raise ValueError("a rule starts with allow or deny")
    allow, words = tokens[0] == "allow", tokens[1:]
    if words == ["all"]:
        return Rule(rule_id, allow, text)
    if not words:
        raise ValueError(f"nothing to match: write '{tokens[0]} all' or give conditions")
    values: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    for word in words:
        if word in CONDITIONS:
            if word in values:
                raise ValueError(f"{word} given twice: list its values once")
            current = values[word] = []
        elif current is None and word == "all":
            raise ValueError("all stands alone: no conditions go with it")
        elif current is None:
            raise ValueError(f"expected all or a condition ({', '.join(CONDITIONS)}), "
                             f"not {word!r}")
        else:
            current.append(word)
    for condition, given in values.items():
        if not given:
            raise ValueError(f"{condition} needs at least one value")
    fields: dict[str, Any] = {}
    if "src" in values:
        fields["src"] = tuple(parse_network(v) for v in values["src"])
    if "dst" in values:
        fields["dst"] = HostPatterns.parse(values["dst"])
    if "port" in values:
        fields["ports"] = parse_port_ranges(values["port"])
    if "method" in values:
        fields["methods"] = _methods(values["method"])
    if "user" in values:
        fields["users"] = frozenset(values["user"])
    return Rule(rule_id, allow, text, **fields)


def parse_rules(lines: Sequence[str]) -> tuple[Rule, ...]:
    """Every line of ``rules``; raises ValueError starting with ``line N``."""
    rules: list[Rule] = []
    seen: set[str] = set()
    for number, text in enumerate(lines, 1):
        try:
            rule = parse_rule(text, number)
            if rule.id in seen:
                raise ValueError(f"the rule id {rule.id!r} is given twice")
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}: {text!r}") from None
        seen.add(rule.id)
        rules.append(rule)
    return tuple(rules)


def _default_policy() -> Policy:
    return Policy(parse_rules([DEFAULT_RULES]),
                  parse_port_ranges(DEFAULT_CONNECT_PORTS.split()), report=False)


# -- the plugin -----------------------------------------------------------------------------


class ACL:
    name = SECTION

    def __init__(self) -> None:
        # Replaced by configure(); the defaults until then, never "allow everything".
        self.policy = _default_policy()
        self.per_client = 0
        #: refuse_at_connect = close: denials at connect close without an answer.
        self.silent = False
        #: Open connections per client address, while max_connections_per_client is set.
        self._open: dict[str, int] = {}
        #: Bounded: one entry per recent client address.
        self._plans: LRUCache[str, Plan] = LRUCache(maxsize=PLAN_CACHE_SIZE)

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("connect_ports", "ports", DEFAULT_CONNECT_PORTS,
                 "Ports CONNECT may reach, single ports or ranges (1-65535 for all); a CONNECT "
                 "to any other port is denied whatever the rules say.")
            .add("mode", "str", "enforce",
                 "enforce denies; report only logs 'would deny' and lets the request through.",
                 choices=MODES)
            .add("rules", "lines", DEFAULT_RULES,
                 "Ordered rules, one per line, first match wins: [id:] allow|deny all, or "
                 "allow|deny with src, dst, port, method, user conditions; no match denies.")
            .add("refuse_at_connect", "str", "answer",
                 "A client denied by its address alone: answer reads its first request head "
                 "and answers 403, then closes; close closes at once, before any byte is read "
                 "or sent (a firewall's drop, no TLS handshake).", choices=REFUSALS)
            .add("max_connections_per_client", "int", "0",
                 "Connections one client address may have open at once; over it, its "
                 "requests get 503. 0 for no limit.", minimum=0)
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        ports = section["connect_ports"]
        mode = section["mode"]
        try:
            rules = parse_rules(section["rules"])
        except ValueError as exc:
            raise ConfigError(str(exc), path=config.path, section=SECTION,
                              key="rules") from None
        if not rules:
            log.warning("%s: [acl] rules is empty: every client is denied", config.path)
        self.policy = Policy(rules, ports, report=mode == "report")
        self.per_client = section["max_connections_per_client"]
        self.silent = section["refuse_at_connect"] == "close"

    @hookimpl
    def on_connect(self, ctx: Context) -> Optional[Denied]:
        # A connection only being decided (geproxy explain) is not open: not counted.
        if self.per_client and not ctx.decide_only:
            client = ctx.client_addr[0]
            count = self._open[client] = self._open.get(client, 0) + 1
            ctx.stash[COUNTED_KEY] = count > self.per_client  # True: over the limit
        plan = self._plan(ctx)
        verdict = plan.verdict
        if verdict is None or verdict.allow or plan.policy.report:
            # Report mode: the "would deny" line is logged per request, with its target.
            return None
        return Denied(f"client {ctx.client_addr[0]} denied by [acl] rule {verdict.rule}",
                      rule=verdict.rule, silent=self.silent)

    @hookimpl
    def on_disconnect(self, ctx: Context) -> None:
        if COUNTED_KEY in ctx.stash:
            client = ctx.client_addr[0]
            left = self._open.get(client, 1) - 1
            if left > 0:
                self._open[client] = left
            else:
                self._open.pop(client, None)

    # trylast: identity plugins (authentication) set ctx.user in their on_request first.
    @hookimpl(trylast=True)
    def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
        if ctx.stash.get(COUNTED_KEY):
            raise errors.TooManyConnections(
                f"client {ctx.client_addr[0]} has over {self.per_client} connections open")
        plan = ctx.stash.get(SECTION)
        if not isinstance(plan, Plan) or plan.policy is not self.policy:
            plan = self._plan(ctx)  # on_connect did not run for this policy
        policy = plan.policy
        if request.is_connect and not policy.connect_port_allowed(request.port):
            self._deny(ctx, request, policy, CONNECT_PORTS_ID)
            return None
        verdict = plan.decide(ctx, request)
        ctx.stash[REQUEST_KEY] = verdict  # the last request's verdict, for geproxy explain
        if not verdict.allow:
            self._deny(ctx, request, policy, verdict.rule)
        return None

    def _plan(self, ctx: Context) -> Plan:
        # Plans depend only on the policy and the client address: clients come back, and
        # parsing an address and walking the rules per connection is the costly part.
        policy, key = self.policy, ctx.client_addr[0]
        plan = self._plans.get(key)
        if plan is None or plan.policy is not policy:
            plan = self._plans[key] = policy.plan(client_ip(ctx))
        ctx.stash[SECTION] = plan
        return plan

    @staticmethod
    def _deny(ctx: Context, request: Request, policy: Policy, rule: str) -> None:
        """Raise the denial, or in report mode log that it would have been one."""
        client = ctx.client_addr[0]
        if policy.report:
            log.warning("[%s] acl would deny %s %s from %s (rule %s)", ctx.conn_id,
                        request.method, request.target, client, rule)
            return
        raise Denied(f"{request.method} {request.target} from {client}: [acl] rule {rule}",
                     rule=rule)
