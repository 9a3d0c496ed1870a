"""``parent``: parent proxies, with rules for what goes direct, and failover.

The ``[parents]`` section (docs/configuration.md has the full reference)::

    [parents]
    parents = http://egress:s3cret@10.40.0.9:3128 http://10.40.0.10:3128
    retry_after = 30s
    rules =
        direct .corp.example 10.0.0.0/8
        parent all

Squid's ``cache_peer ... parent`` with ``never_direct`` and ``always_direct``, tinyproxy's
``Upstream``. With no parents (the default) ``route`` answers ``None``: everything is direct.
With parents and no rules, everything goes through them. With rules, the first rule whose
patterns match the target's host decides, ``direct`` or ``parent``; no match is direct. The
patterns are those of ``geproxy.HostPatterns``: ``*`` matches every *name*, networks match IP
literals, and the keyword ``all`` matches every target, names and IP literals alike.

A request sent to the parents gets every parent that is up, in the configured order; the core
tries them one after the other. Never direct: when none is up, ``route`` answers an empty list
and the client gets 502 ``connection_refused``. A parent is *down* once an attempt through it
failed without an answer from it (it refused the connection, timed out, closed, or its name
did not resolve); it is left out for ``retry_after``, then offered again, and it is up once a
connection through it succeeded. A parent that answered a CONNECT with a non-2xx status (407,
403, 503 ...) is alive: it said no to one request, and stays up, while the core goes on to the
next parent for that request. Parent states are per process (per worker) and start all up.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from geproxy import (
    Config,
    ConfigError,
    Context,
    OptionRegistry,
    Record,
    Request,
    Route,
    RouteRule,
    errors,
    hookimpl,
)
from geproxy.hosts import is_host_name

__all__ = ["Parent", "Rule", "parse_parent", "parse_rules"]

log = logging.getLogger(__name__)

SECTION = "parents"
#: ctx.stash key: the plugin's name.
STASH = "parent"
DEFAULT_RETRY_AFTER = "30s"

_PORT = re.compile(r"[0-9]{1,5}")


# -- parsing --------------------------------------------------------------------------------


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostport}"


def _decode(text: str, what: str) -> str:
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} is not UTF-8 once percent-decoded") from None


def _host(text: str) -> str:
    """The host of a parent URL: a name, an IPv4 address, or an IPv6 one in brackets."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if "%" in inner:
            raise ValueError("IPv6 zone ids are not supported")
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
    if ":" in text:
        raise ValueError("IPv6 addresses go in brackets: http://[2001:db8::5]:3128")
    host = text.lower().rstrip(".")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"not an IPv4 address: {text!r}") from None
    if not is_host_name(host):
        raise ValueError(f"not a host name or IP address: {text!r}")
    return host


def parse_parent(url: str) -> Route:
    """``http://[user:password@]host:port[/]`` as a Route; raises ValueError saying what is
    wrong (never showing the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("not a URL: write http://[user:password@]host:port")
    if scheme.lower() != "http":
        raise ValueError(f"{scheme}:// parents are not supported: only http:// (the parent "
                         f"is spoken to in plain HTTP; CONNECT tunnels still carry TLS)")
    if rest.endswith("/"):
        rest = rest[:-1]
    if any(c in rest for c in "/?#"):
        raise ValueError("a parent URL has no path, query or fragment")
    userinfo, at, hostport = rest.rpartition("@")
    username = password = ""
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = _decode(user_text, "user name")
        password = _decode(password_text, "password")
        if ":" in username:
            raise ValueError("a user name cannot contain ':' (Basic authentication)")
        if not username and not colon:
            raise ValueError("empty user information before '@'")
    host_text, colon, port_text = hostport.rpartition(":")
    if not colon or hostport.endswith("]") or (
            host_text.startswith("[") and not host_text.endswith("]")):
        raise ValueError("the port is missing: write http://host:port")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"not a port (1-65535): {port_text!r}")
    if not host_text:
        raise ValueError("the host is missing")
    return Route(_host(host_text), int(port_text), username, password)


#: One line of ``rules`` (the grammar is ``geproxy.RouteRule``'s, which ``pac`` reads too).
Rule = RouteRule


def parse_rules(lines: Sequence[str]) -> tuple[RouteRule, ...]:
    """Every line of ``rules``; raises ValueError starting with ``line N``."""
    return RouteRule.parse_lines(lines)


# -- state ----------------------------------------------------------------------------------


def label(route: Route) -> str:
    """``host:port`` of a parent, IPv6 in brackets; never its credentials."""
    return route.authority


@dataclass
class _Down:
    """A parent left out of the routes until ``until`` (the plugin's clock)."""

    since: float
    until: float


@dataclass
class _Attempt:
    """The routes offered to one request, and those of them that failed (ctx.stash)."""

    routes: list[Route]
    failed: set[Route] = field(default_factory=set)

    def __str__(self) -> str:  # what geproxy explain prints: never the credentials
        offered = ", ".join(label(r) for r in self.routes) or "none (every parent is down)"
        failed = ", ".join(label(r) for r in self.routes if r in self.failed)
        return f"parents offered: {offered}" + (f"; failed: {failed}" if failed else "")

    __repr__ = __str__


# -- the plugin -----------------------------------------------------------------------------


class Parent:
    name = "parent"

    def __init__(self) -> None:
        #: The parents, in order; empty: every request is direct.
        self.parents: tuple[Route, ...] = ()
        self.rules: tuple[RouteRule, ...] = ()
        self.retry_after = 30.0
        #: The time source for retry_after; tests put a fake clock here.
        self.clock: Callable[[], float] = time.monotonic
        #: The parents that are down now, or waiting for a try that succeeds.
        self.down: dict[Route, _Down] = {}

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("parents", "list", "",
                 "Parent proxies, tried in order: http://[user:password@]host:port, "
                 "percent-encoded user and password, IPv6 in brackets. Empty: all direct.")
            .add("rules", "lines", "",
                 "Ordered rules, one per line, first match wins: direct|parent followed by "
                 "host patterns or all; no match goes direct. Empty: everything goes to the "
                 "parents (when there are any).")
            .add("retry_after", "duration", DEFAULT_RETRY_AFTER,
                 "A parent that could not be reached is left out for this long, then tried "
                 "again.", minimum=0)
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        parents: list[Route] = []
        for item in section["parents"]:
            try:
                route = parse_parent(item)
            except ValueError as exc:
                raise ConfigError(f"{redacted(item)}: {exc}", path=config.path,
                                  section=SECTION, key="parents") from None
            if any((p.host, p.port) == (route.host, route.port) for p in parents):
                raise ConfigError(f"{label(route)} is given twice", path=config.path,
                                  section=SECTION, key="parents")
            parents.append(route)
        try:
            rules = parse_rules(section["rules"])
        except ValueError as exc:
            raise ConfigError(str(exc), path=config.path, section=SECTION,
                              key="rules") from None
        if not parents and any(rule.via_parent for rule in rules):
            raise ConfigError("a rule sends requests to the parents, but parents is empty",
                              path=config.path, section=SECTION, key="rules")
        if parents and rules and not any(rule.via_parent for rule in rules):
            log.warning("%s: [parents] no rule says parent: the parents are never used",
                        config.path)
        self.parents = tuple(parents)
        self.rules = rules
        self.retry_after = section["retry_after"]
        self.down = {}

    @hookimpl
    def parent_proxies(self) -> list[Route]:
        # The core checks them against the destination guard at each load.
        return list(self.parents)

    def via_parents(self, host: str) -> bool:
        """Whether requests for ``host`` go to the parents (by the rules)."""
        if not self.rules:
            return bool(self.parents)
        for rule in self.rules:
            if rule.matches(host):
                return rule.via_parent
        return False

    def up(self) -> list[Route]:
        """The parents to offer now, in order: those not down, and those whose retry_after
        has passed (a try decides whether they are up again)."""
        if not self.down:
            return list(self.parents)
        now = self.clock()
        return [p for p in self.parents if p not in self.down or self.down[p].until <= now]

    # trylast: a route plugin of the operator's own (a partner's proxy) decides first.
    @hookimpl(trylast=True)
    def route(self, ctx: Context, request: Request) -> Optional[list[Route]]:
        if not self.parents or not self.via_parents(request.host):
            ctx.stash.pop(STASH, None)
            return None
        routes = self.up()
        ctx.stash[STASH] = _Attempt(routes)
        # Never direct: an empty list answers 502 connection_refused ("every parent proxy
        # is down").
        return routes

    @hookimpl
    def route_failed(self, ctx: Context, request: Request, route: Route,
                     error: errors.ProxyError) -> None:
        if route not in self.parents:
            return  # another plugin's route
        attempt = ctx.stash.get(STASH)
        if isinstance(attempt, _Attempt):
            attempt.failed.add(route)
        if isinstance(error, errors.ParentRefused):
            return  # the parent is alive: it refused this one request
        if isinstance(error, errors.ParentProhibited):
            return  # not down: this proxy's configuration forbids it, which no wait cures
        now = self.clock()
        state = self.down.get(route)
        if state is None:
            self.down[route] = _Down(since=now, until=now + self.retry_after)
            log.warning("[%s] parent proxy %s is down, left out for %gs: %s", ctx.conn_id,
                        label(route), self.retry_after, error.detail or error.error)
        elif state.until <= now:
            state.until = now + self.retry_after
            log.info("[%s] parent proxy %s is still down, next try in %gs: %s", ctx.conn_id,
                     label(route), self.retry_after, error.detail or error.error)
        # Otherwise it is down already: this attempt began before it was marked.

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        attempt = ctx.stash.pop(STASH, None)
        if not isinstance(attempt, _Attempt) or not self.down or record.connect_time is None:
            return
        # A new connection was made: by the first route offered that did not fail.
        used = next((r for r in attempt.routes if r not in attempt.failed), None)
        state = self.down.pop(used, None) if used is not None else None
        if used is not None and state is not None:
            log.info("[%s] parent proxy %s is up again, after %.0fs", ctx.conn_id,
                     label(used), self.clock() - state.since)
