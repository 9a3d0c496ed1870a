"""``acl``: who may go where, as ordered squid-like rules; CONNECT only to allowed ports.

The ``[acl]`` section (docs/configuration.md has the full reference and a Squid translation
table)::

    [acl]
    connect_ports = 443 563
    lists =
        blocked: dst file:/etc/geproxy/blocked-domains.txt
    rules =
        deny !src 10.0.0.0/8 192.168.0.0/16
        deny @blocked deny_page blocked
        staff: allow group staff
        allow user *
        deny all

Each rule is ``[id:] allow|deny`` followed by ``all`` or by conditions (``conditions.py``:
``src dst port method user group url_regex path time external``, ``!`` negating one,
``@NAME`` a named list), and optionally ``deny_page NAME``. The conditions of a rule are
evaluated left to right and it stops at the first that does not match; the first rule that
matches decides; no match denies (rule id ``default``). A CONNECT to a port outside
``connect_ports`` is denied before any rule is looked at (rule id ``connect_ports``), like
Squid's ``http_access deny CONNECT !SSL_ports``.

Credentials are asked only when the walk reaches a ``user`` or ``group`` condition
(``ctx.authenticate``): a request that proves no user is then answered 407 with the
challenges of the identity plugins, and a rule decided before that is decided without them.

Where the decision is made: when every rule that could match a client, up to the first one
that surely does, is decided by the client's address alone, the verdict is known when the
client connects. A denied client is then refused in ``on_connect``: its first request is
answered 403 and the connection closed (``refuse_at_connect = answer``), or it is closed
before a byte is read (``close``); otherwise each request is decided in ``on_request``. The
per-client plan is kept in ``ctx.stash["acl"]``.

Groups come from ``group_file`` (``name: user user ...`` per line) through the
``user_groups`` hook the plugin implements, and from any other plugin implementing it.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import replace
from http import HTTPStatus
from typing import Any, Callable, Iterable, Optional, Sequence

from cachetools import LRUCache

from geproxy import (
    Config,
    ConfigError,
    Context,
    Denied,
    OptionRegistry,
    Request,
    Response,
    did_you_mean,
    errors,
    hookimpl,
    parse_port_ranges,
)

from .conditions import Condition, Kind, client_address, timezone
from .lists import ListFile, values_of
from .pages import ErrorPages, PageFields, accept_of
from .rules import (
    CONNECT_PORTS_ID,
    DEFAULT_ID,
    NeedsUser,
    Plan,
    Rule,
    Verdict,
    make_plan,
    parse_list_line,
    parse_rule,
)

__all__ = ["ACL", "Plan", "Rule", "Verdict", "DEFAULT_ID", "CONNECT_PORTS_ID"]

log = logging.getLogger(__name__)

PortRange = tuple[int, int]

SECTION = "acl"
DEFAULT_CONNECT_PORTS = "443 563"
DEFAULT_RULES = "loopback: allow src 127.0.0.0/8 ::1"
MODES = ("enforce", "report")
#: What a client denied by its address alone gets: a 403 to its first request, or a close.
REFUSALS = ("answer", "close")
REQUEST_KEY = "acl.request"
#: ctx.stash key set when the connection was counted: True when it is over the limit.
COUNTED_KEY = "_acl.over_limit"
#: Where the loaded ``file:`` lists wait for the configuration a reload makes.
LISTS_STASH = "acl.lists"
PLAN_CACHE_SIZE = 4096


class Version:
    """Bumped when one of a policy's ``file:`` lists is swapped: the plans made before are
    stale. Made before the lists, which tell it, and handed to the policy they end in."""

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


class Policy:
    """The parsed ``[acl]`` section; rebuilt whole by each ``configure``."""

    def __init__(self, rules: Sequence[Rule], connect_ports: Sequence[PortRange],
                 report: bool, files: Sequence[ListFile] = (),
                 lists_version: Optional[Version] = None) -> None:
        self.rules = tuple(rules)
        self.connect_ports = tuple(connect_ports)
        self.report = report
        self.files = tuple(files)
        self._version = lists_version or Version()

    @property
    def version(self) -> int:
        return self._version.value

    def connect_port_allowed(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.connect_ports)

    def plan(self, address: Any) -> Plan:
        return make_plan(self, self.rules, address, self.version)


def _default_policy() -> Policy:
    rule = parse_rule(DEFAULT_RULES, 1, {}, _no_files)
    return Policy([rule], parse_port_ranges(DEFAULT_CONNECT_PORTS.split()), report=False)


def _no_files(kind: Kind, path: str) -> Any:
    raise ValueError("file: lists are not read here")


def parse_groups(data: bytes, fold_case: bool) -> dict[str, frozenset[str]]:
    """``group_file``: ``name: user user ...`` per line, ``#`` comments; the groups of each
    user. ValueError naming the line that is not."""
    members: dict[str, set[str]] = {}
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"line {number}: not UTF-8") from None
        if not line or line.startswith("#"):
            continue
        group, sep, users = line.partition(":")
        group = group.strip()
        if not sep or not group or any(c.isspace() for c in group):
            raise ValueError(f"line {number}: not 'group: user user ...'")
        if group in seen:
            raise ValueError(f"line {number}: the group {group!r} is given twice")
        seen.add(group)
        for user in users.replace(",", " ").split():
            members.setdefault(user.lower() if fold_case else user, set()).add(group)
    return {user: frozenset(groups) for user, groups in members.items()}


class ACL:
    name = SECTION

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # Replaced by configure(); the defaults until then, never "allow everything".
        self.policy = _default_policy()
        self.per_client = 0
        #: refuse_at_connect = close: denials at connect close without an answer.
        self.silent = False
        self.fold_case = True
        #: Open connections per client address, while max_connections_per_client is set.
        self._open: dict[str, int] = {}
        #: Bounded: one entry per recent client address.
        self._plans: LRUCache[str, Plan] = LRUCache(maxsize=PLAN_CACHE_SIZE)
        self._groups_file: Optional[ListFile] = None
        #: deny_page and the pages of error_dir; false when there is none.
        self.pages = ErrorPages.load("", "", ())
        self.contact = ""

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
                 "allow|deny with conditions (src dst port method user group url_regex path "
                 "time external, ! to negate, @NAME for a list) and an optional deny_page NAME; no "
                 "match denies.")
            .add("lists", "lines", "",
                 "Named lists, one per line: NAME: CONDITION VALUE...; rules use them as "
                 "@NAME (!@NAME negated).")
            .add("check_interval", "duration", "5s",
                 "How often, at most, file: lists and group_file are checked for changes.",
                 minimum=0)
            .add("group_file", "path", "",
                 "Groups for group conditions: one 'group: user user ...' per line; empty "
                 "for none (other plugins may give groups too).")
            .add("timezone", "str", "",
                 "The zone time conditions are read in (an IANA name such as Europe/Berlin); "
                 "empty for the system's.")
            .add("deny_page", "path", "",
                 "An HTML template sent with every refusal of a rule without its own "
                 "deny_page; empty for the plain one-line answer.")
            .add("error_dir", "path", "",
                 "The directory of the pages rules name with deny_page NAME (NAME.html).")
            .add("contact", "str", "",
                 "Who to contact about a refusal, for the error pages' ${contact} field.")
            .add("refuse_at_connect", "str", "answer",
                 "A client denied by its address alone: answer reads its first request head "
                 "and answers 403, then closes; close closes at once, before any byte is read "
                 "or sent (a firewall's drop, no TLS handshake).", choices=REFUSALS)
            .add("max_connections_per_client", "int", "0",
                 "Connections one client address may have open at once; over it, its "
                 "requests get 503. 0 for no limit.", minimum=0)
        )

    # -- configuration --------------------------------------------------------------------

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        auth = config.section("auth") if "auth" in config else {}
        self.fold_case = auth.get("user_case", "insensitive") != "sensitive"
        problems: list[ConfigError] = []

        def problem(key: str, message: str, line: Optional[int] = None) -> None:
            problems.append(ConfigError(message, path=config.path, section=SECTION, key=key,
                                        line=line))

        try:
            tz = timezone(section["timezone"])
        except ValueError as exc:
            problem("timezone", str(exc))
            tz = None
        interval = section["check_interval"]
        previous: dict[tuple[str, str], ListFile] = config.stash.get(LISTS_STASH, {})
        files: dict[tuple[str, str], ListFile] = {}
        lists_version = Version()

        def make_list(kind: Kind, path: str) -> ListFile:
            path = config.resolve_path(path)
            key = (kind.name, path)
            found = files.get(key)
            if found is None:
                found = ListFile(f"{kind.name}:{self.fold_case}", path,
                                 values_of(kind, self.fold_case), interval,
                                 lists_version.bump, self.clock)
                old = previous.get(key)
                if old is None or not found.adopt(old):
                    try:
                        found.load()
                    except OSError as exc:
                        raise ValueError(f"cannot read {path}: {exc.strerror or exc}"
                                         ) from None
                    except ValueError as exc:
                        raise ValueError(f"{path}: {exc}") from None
                files[key] = found
            return found

        check_external = _helper_check(config, problem)
        lists: dict[str, Condition] = {}
        for number, text in enumerate(section["lists"], 1):
            try:
                name, condition = parse_list_line(text, lists, make_list, self.fold_case, tz)
            except ValueError as exc:
                problem("lists", f"{exc}: {text!r}", number)
                continue
            check_external(condition, "lists", number)
            lists[name] = condition
        rules: list[Rule] = []
        seen: set[str] = set()
        for number, text in enumerate(section["rules"], 1):
            try:
                rule = parse_rule(text, number, lists, make_list, self.fold_case, tz)
                if rule.id in seen:
                    raise ValueError(f"the rule id {rule.id!r} is given twice")
            except ValueError as exc:
                problem("rules", f"{exc}: {text!r}", number)
                continue
            seen.add(rule.id)
            for condition in rule.conditions:
                check_external(condition, "rules", number)
            rules.append(_located(rule, config))
        self._configure_groups(config, section, problem)
        pages = self._configure_pages(section, rules, problem)
        if problems:
            raise problems[0] if len(problems) == 1 else errors.ConfigErrors(problems)
        if not rules:
            log.warning("%s: [acl] rules is empty: every client is denied", config.path)
        if auth.get("require") == "rules" and auth.get("htpasswd") \
                and not any(rule.needs_user for rule in rules):
            log.warning("%s: [auth] require = rules, and no [acl] rule has a user or group "
                        "condition: nobody is ever asked for credentials", config.path)
        policy = Policy(rules, section["connect_ports"], section["mode"] == "report",
                        tuple(files.values()), lists_version)
        config.stash[LISTS_STASH] = files
        self.policy = policy
        self.per_client = section["max_connections_per_client"]
        self.silent = section["refuse_at_connect"] == "close"
        self.pages, self.contact = pages, section["contact"]

    @staticmethod
    def _configure_pages(section: Any, rules: Sequence[Rule],
                         problem: Callable[..., None]) -> ErrorPages:
        """deny_page and the pages the rules name in error_dir, read and checked now."""
        default, directory = section["deny_page"], section["error_dir"]
        try:
            ErrorPages.load(default, "", ())
        except ValueError as exc:
            problem("deny_page", str(exc))
            default = ""
        names = {rule.page for rule in rules if rule.page is not None}
        try:
            return ErrorPages.load(default, directory, names)
        except ValueError as exc:
            problem("error_dir" if directory and not names else "rules", str(exc))
        return ErrorPages.load("", "", ())

    def _configure_groups(self, config: Config, section: Any,
                          problem: Callable[..., None]) -> None:
        path = section["group_file"]
        self._groups_file = None
        if not path:
            return
        fold_case = self.fold_case

        def build(lines: Iterable[bytes]) -> tuple[dict[str, frozenset[str]], int]:
            groups = parse_groups(b"".join(lines), fold_case)
            return groups, len(groups)

        holder = ListFile("group_file", path, build, section["check_interval"],
                          lambda: None, self.clock)
        try:
            holder.load()
        except OSError as exc:
            problem("group_file", f"cannot read {path}: {exc.strerror or exc}")
            return
        except ValueError as exc:
            problem("group_file", f"{path}: {exc}")
            return
        self._groups_file = holder

    # -- connections ----------------------------------------------------------------------

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
        where = verdict.by.where if verdict.by is not None else f"rule {verdict.rule}"
        denied = Denied(f"client {ctx.client_addr[0]} denied by [acl] {where}",
                        rule=verdict.rule, silent=self.silent)
        # Answered to whatever the first request asks, unread yet: no host, plain text.
        self._page(denied, ctx, None, verdict)
        return denied

    @hookimpl
    def on_disconnect(self, ctx: Context) -> None:
        if COUNTED_KEY in ctx.stash:
            client = ctx.client_addr[0]
            left = self._open.get(client, 1) - 1
            if left > 0:
                self._open[client] = left
            else:
                self._open.pop(client, None)

    # -- requests -------------------------------------------------------------------------

    # Plain: after third-party plugins' plain implementations (registered later, called
    # first), before auth's trylast one, which enforces require = always on what the walk
    # let through.
    @hookimpl
    def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
        if ctx.stash.get(COUNTED_KEY):
            raise errors.TooManyConnections(
                f"client {ctx.client_addr[0]} has over {self.per_client} connections open")
        policy = self.policy
        if not ctx.decide_only:
            for holder in policy.files:
                holder.refresh()
        plan = ctx.stash.get(SECTION)
        if not isinstance(plan, Plan) or plan.policy is not policy \
                or plan.version != policy.version:
            plan = self._plan(ctx)  # on_connect did not run for this policy, or lists changed
        if request.is_connect and not policy.connect_port_allowed(request.port):
            self._deny(ctx, request, policy, Verdict(False, CONNECT_PORTS_ID))
            return None
        try:
            verdict = plan.decide(ctx, request)
        except NeedsUser as exc:
            rule, condition = exc.args
            detail = (f"{request.method} {request.target} from {ctx.client_addr[0]}: [acl] "
                      f"{rule.where} needs a user ({condition}), and the request proves none")
            if policy.report:
                log.warning("[%s] acl would ask for credentials: %s", ctx.conn_id, detail)
                return None
            required = errors.AuthenticationRequired(
                detail, challenges=ctx.challenges(request), rule=rule.id)
            self._page(required, ctx, request, Verdict(False, rule.id, rule))
            raise required from None
        ctx.stash[REQUEST_KEY] = verdict  # the last request's verdict, for geproxy explain
        if not verdict.allow:
            self._deny(ctx, request, policy, verdict)
        return None

    def _plan(self, ctx: Context) -> Plan:
        # Plans depend only on the policy (and its lists) and the client address: clients
        # come back, and parsing an address and walking the rules is the costly part.
        policy, key = self.policy, ctx.client_addr[0]
        plan = self._plans.get(key)
        if plan is None or plan.policy is not policy or plan.version != policy.version:
            plan = self._plans[key] = policy.plan(client_address(ctx))
        ctx.stash[SECTION] = plan
        return plan

    def _deny(self, ctx: Context, request: Request, policy: Policy,
              verdict: Verdict) -> None:
        """Raise the denial, or in report mode log that it would have been one."""
        client = ctx.client_addr[0]
        if policy.report:
            named = verdict.by.named if verdict.by is not None else f"rule {verdict.rule}"
            log.warning("[%s] acl would deny %s %s from %s (%s)", ctx.conn_id,
                        request.method, request.target, client, named)
            return
        # Credentials the request carries name its user in the log, though no rule needed
        # them: a wrong one is not refused (the request is refused anyway), only not named.
        ctx.authenticate(request)
        where = verdict.by.where if verdict.by is not None else f"rule {verdict.rule}"
        denied = Denied(f"{request.method} {request.target} from {client}: [acl] {where}",
                        rule=verdict.rule)
        self._page(denied, ctx, request, verdict)
        raise denied

    def _page(self, refusal: errors.ProxyError, ctx: Context, request: Optional[Request],
              verdict: Verdict) -> None:
        """Give ``refusal`` its error page (the rule's deny_page, or deny_page), if any."""
        if not self.pages:
            return
        fields = PageFields(
            status=refusal.status, reason=HTTPStatus(refusal.status).phrase,
            error=refusal.error, request_id=ctx.conn_id, client=ctx.client_addr[0],
            host=request.host if request is not None else "",
            time=datetime.datetime.fromtimestamp(ctx.decision_time(), datetime.timezone.utc),
            contact=self.contact, rule=verdict.rule)
        name = verdict.by.page if verdict.by is not None else None
        accept = accept_of(request.headers) if request is not None else None
        refusal.page = self.pages.render(name, fields, accept)

    # -- groups ---------------------------------------------------------------------------

    @hookimpl
    def user_groups(self, ctx: Context, user: str) -> Optional[frozenset[str]]:
        holder = self._groups_file
        if holder is None:
            return None
        if not ctx.decide_only:
            holder.refresh()
        groups: dict[str, frozenset[str]] = holder.matcher
        return groups.get(user.lower() if self.fold_case else user)


def _helper_names(config: Config) -> Optional[list[str]]:
    """The helpers ``[external] helpers`` declares (the name before each line's options and
    colon); None when the external plugin is not loaded."""
    if "external" not in config:
        return None
    names = []
    for line in config.section("external").get("helpers", ()):
        words = line.partition(":")[0].split()
        if words:
            names.append(words[0])
    return names


def _helper_check(config: Config, problem: Callable[..., None]
                  ) -> Callable[[Condition, str, int], None]:
    """``check(condition, key, number)``: an ``external NAME`` condition must name a helper
    of ``[external] helpers`` (a problem reported otherwise, at the line ``number`` of
    ``key``)."""
    known = _helper_names(config)

    def check(condition: Condition, key: str, number: int) -> None:
        if condition.kind.name != "external" or condition.text.startswith(("@", "!@")):
            return  # a named list was checked where it is written
        for call in condition.sources.current():
            if known is None:
                problem(key, f"{condition.text}: the external plugin is disabled: no "
                        "helper can answer", number)
            elif call.name not in known:
                problem(key, f"{condition.text}: no helper named {call.name!r} in "
                        "[external] helpers" + did_you_mean(call.name, known)
                        + f" (helpers: {', '.join(known) or 'none'})", number)

    return check


def _located(rule: Rule, config: Config) -> Rule:
    """The rule with where it is written (``geproxy.ini:23``), when the file tells."""
    line = config.line_of(SECTION, "rules", rule.number)
    if not line:
        return rule
    return replace(rule, location=f"{os.path.basename(config.path)}:{line}")
