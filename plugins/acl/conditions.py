"""The conditions of ``[acl]`` rules: what each matches, how its values are read.

A condition is a name and its values (``dst .example.com file:/etc/geproxy/blocked.txt``),
``!`` before the name negating it, or ``@NAME``, a named list of ``[acl] lists``. The values
of one condition OR together: the condition matches when any value does. Values come from
the line and from ``file:`` lists (one value per line), which are re-read when they change.

=========  ===============================================================================
src        the client's address is in one of the networks
dst        the host asked for is one of the host patterns (``HostPatterns``): names,
           ``.domain``, globs, networks for IP-literal hosts
port       the port asked for is one of the ports or ranges
method     the request's method is one of these (case-sensitive)
user       the authenticated user is one of these; ``*`` is any authenticated user
group      the authenticated user is in one of these groups
url_regex  a regular expression (RE2: linear time) finds a match in the absolute URL of a
           plain-HTTP request, or in ``host:port`` of a CONNECT
path       a shell glob matches the whole path (query included) of a plain-HTTP request
           (or of one to the proxy itself); never matches a CONNECT
time       the decision's time is on one of the days and within one of the time ranges:
           ``Mon-Fri 08:00-18:00`` (days and ranges both optional, each ORed)
external   ``external NAME [ARG...]``: the external ACL helper NAME (``[external]``)
           answers OK for the request, the arguments appended to its line
=========  ===============================================================================

A request addressed to the proxy itself (origin-form, no host) has no destination: ``dst``,
``port`` and ``url_regex`` never match it. ``user`` and ``group`` see only a user already
established (a client certificate's): the proxy's own pages are never challenged.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import re2

from geproxy import Context, HostPatterns, Request, errors, parse_port_ranges
from geproxy.hosts import NetworkSet, authority, ip_literal, unmapped

__all__ = ["KINDS", "SQUID_NAMES", "Condition", "Kind", "NeedsUser", "Sources",
           "client_address"]


class NeedsUser(Exception):
    """A condition needs the user, and the request proves none: the answer is a 407."""


def client_address(ctx: Context) -> Any:
    return unmapped(ipaddress.ip_address(ctx.client_addr[0]))


# -- kinds ----------------------------------------------------------------------------------


_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]+")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"([01]?[0-9]|2[0-4]):([0-5][0-9])")


def _methods(values: Sequence[str]) -> frozenset[str]:
    for value in values:
        if not _METHOD.fullmatch(value):
            if _METHOD.fullmatch(value.upper()):
                raise ValueError(f"methods are case-sensitive: write {value.upper()!r}, "
                                 f"not {value!r}")
            raise ValueError(f"not a method: {value!r}")
    return frozenset(values)


def _regex(values: Sequence[str]) -> Any:
    """One RE2 pattern for all ``values``: each is checked alone, for an error naming it."""
    options = re2.Options()
    options.log_errors = False
    for value in values:
        try:
            re2.compile(value, options)
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) \
                else str(exc)
            raise ValueError(f"not a regular expression RE2 takes: {value!r} ({reason})"
                             ) from None
    return re2.compile("|".join(f"(?:{value})" for value in values), options)


def _globs(values: Sequence[str]) -> Any:
    for value in values:
        if not value.startswith(("/", "*", "?", "[")):
            raise ValueError(f"a path glob starts with / (or a wildcard): {value!r}")
    return re.compile("|".join(fnmatch.translate(value) for value in values), re.DOTALL)


def _clock(text: str) -> int:
    match = _CLOCK.fullmatch(text)
    if not match or (match.group(1) == "24" and match.group(2) != "00"):
        raise ValueError(f"not a time of day (HH:MM): {text!r}")
    return int(match.group(1)) * 60 + int(match.group(2))


@dataclass(frozen=True)
class TimeSpec:
    """Days of the week (0 Monday) and minute ranges of the day; empty means any."""

    days: frozenset[int]
    ranges: tuple[tuple[int, int], ...]

    def matches(self, when: datetime.datetime) -> bool:
        if self.days and when.weekday() not in self.days:
            return False
        if not self.ranges:
            return True
        minute = when.hour * 60 + when.minute
        # A range that wraps past midnight (22:00-06:00) is both its evening and its morning.
        return any(start <= minute < end if start < end else minute >= start or minute < end
                   for start, end in self.ranges)


_DAY_NAMES = {name: index for index, day in enumerate(_DAYS)
              for name in (day, ("monday", "tuesday", "wednesday", "thursday", "friday",
                                 "saturday", "sunday")[index])}


def _day(text: str) -> int:
    index = _DAY_NAMES.get(text.lower())
    if index is None:
        raise ValueError(f"not a day (Mon, Tue ... Sun): {text!r}")
    return index


def _time(values: Sequence[str]) -> TimeSpec:
    days: set[int] = set()
    ranges: list[tuple[int, int]] = []
    for value in values:
        if value[:1].isdigit():
            first, sep, last = value.partition("-")
            if not sep:
                raise ValueError(f"a time range is HH:MM-HH:MM: {value!r}")
            start, end = _clock(first), _clock(last)
            if start == end:
                raise ValueError(f"an empty time range: {value!r}")
            ranges.append((start, end))
            continue
        first, sep, last = value.partition("-")
        start = _day(first)
        end = _day(last) if sep else start
        day = start
        for _ in range(7):  # Fri-Mon wraps through the weekend
            days.add(day)
            if day == end:
                break
            day = (day + 1) % 7
    return TimeSpec(frozenset(days), tuple(ranges))


@dataclass(frozen=True)
class External:
    """``external NAME ARG...``: the helper's name and the words after it."""

    name: str
    arguments: tuple[str, ...]


def _external_call(values: Sequence[str]) -> External:
    return External(values[0], tuple(values[1:]))


@dataclass(frozen=True)
class Kind:
    """A condition's name and how its values are built into something that matches."""

    name: str
    #: ``values -> matcher``; raises ValueError naming the bad value. Its values are a
    #: sequence, or any iterable (one pass) when ``streams``.
    build: Callable[..., Any]
    #: Decided by the client's address alone.
    address_only: bool = False
    #: Needs the authenticated user.
    needs_user: bool = False
    #: ``build`` takes its values in one pass (a large file list is streamed into it).
    streams: bool = False


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("src", NetworkSet.parse, address_only=True, streams=True),
    Kind("dst", HostPatterns.parse, streams=True),
    Kind("port", parse_port_ranges),
    Kind("method", _methods),
    Kind("user", frozenset, needs_user=True),
    Kind("group", frozenset, needs_user=True),
    Kind("url_regex", _regex),
    Kind("path", _globs),
    Kind("time", _time),
    Kind("external", _external_call),
)}

#: Squid's ACL types, for the suggestion an unknown condition name gets.
SQUID_NAMES = {
    "dstdomain": "dst", "dstdom_regex": "url_regex", "dst": "dst", "src": "src",
    "srcdomain": "src", "proxy_auth": "user", "proxy_auth_regex": "user",
    "ext_user": "user", "external": "external", "urlpath_regex": "path", "urllogin": "path",
    "localnet": "src", "ssl_ports": "port", "safe_ports": "port",
}


# -- sources of values ----------------------------------------------------------------------


class Sources:
    """The matchers of one condition: its values on the line, built once, and the ``file:``
    lists it names, whose matchers are swapped when the file changes. ``current()`` is
    what to match against now."""

    def __init__(self, inline: Any, files: Sequence[Any] = ()) -> None:
        self.files = tuple(files)
        self._inline_only: tuple[Any, ...] = () if inline is None else (inline,)

    def current(self) -> Sequence[Any]:
        if not self.files:
            return self._inline_only
        found = list(self._inline_only)
        found.extend(lst.matcher for lst in self.files)
        return found



@dataclass(frozen=True)
class Condition:
    """One condition of a rule, negated or not; ``text`` as written."""

    kind: Kind
    sources: Sources = field(compare=False)
    text: str
    negated: bool = False
    #: User names compare in lower case (``[auth] user_case = insensitive``).
    fold_case: bool = True
    #: The zone of ``time`` conditions (``[acl] timezone``); None: the system's.
    tz: Optional[datetime.tzinfo] = None
    _test: Any = field(init=False, repr=False, compare=False)

    @property
    def address_only(self) -> bool:
        return self.kind.address_only

    @property
    def needs_user(self) -> bool:
        return self.kind.needs_user

    def __str__(self) -> str:
        return self.text

    def matches_address(self, address: Any) -> bool:
        """For a ``src`` condition: whether it matches a client at ``address``."""
        found = any(address in networks for networks in self.sources.current())
        return found != self.negated

    def __post_init__(self) -> None:
        # The kind's test, looked up once (frozen: set around the dataclass's guard).
        object.__setattr__(self, "_test", _TESTS[self.kind.name])

    def matches(self, subject: "Subject") -> bool:
        """Whether the request meets it; raises NeedsUser when it needs a user that the
        request does not prove."""
        return self._test(self, subject, self.sources.current()) != self.negated


class Subject:
    """What one decision is about: the request, its context, and what several conditions
    derive from them, worked out once (the host's IP-literal reading, the client's
    address)."""

    __slots__ = ("ctx", "request", "_literal", "_address")

    def __init__(self, ctx: Context, request: Request) -> None:
        self.ctx = ctx
        self.request = request
        self._literal: Any = _UNSET
        self._address: Any = _UNSET

    @property
    def literal(self) -> Any:
        if self._literal is _UNSET:
            self._literal = ip_literal(self.request.host)
        return self._literal

    @property
    def address(self) -> Any:
        if self._address is _UNSET:
            self._address = client_address(self.ctx)
        return self._address


_UNSET: Any = object()


# -- what each kind tests: (condition, subject, matchers) -> bool -------------------------------


def _src(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    address = s.address
    for networks in matchers:
        if address in networks:
            return True
    return False


def _method(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    method = s.request.method
    for methods in matchers:
        if method in methods:
            return True
    return False


def _when(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    when = datetime.datetime.fromtimestamp(s.ctx.decision_time(), c.tz)
    return any(spec.matches(when) for spec in matchers)


def _path(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    request = s.request
    return not request.is_connect and any(glob.match(request.path) for glob in matchers)


# A request addressed to the proxy itself has no host: no destination to match.

def _dst(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    host = s.request.host
    if not host:
        return False
    literal = s.literal
    for patterns in matchers:
        if patterns.matches(host, literal):
            return True
    return False


def _port(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    port = s.request.port
    return bool(s.request.host) and any(lo <= port <= hi for ranges in matchers
                                      for lo, hi in ranges)


def _url_regex(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    request = s.request
    host = request.host
    if not host:
        return False
    subject = authority(host, request.port) if request.is_connect else request.target
    return any(regex.search(subject) is not None for regex in matchers)


def _identity(c: Condition, s: Subject) -> Optional[str]:
    """The user; None when there is none and none can be asked for (the proxy's own pages
    are never challenged: only a user already established, a client certificate's, counts
    for them; and with no plugin able to authenticate anyone, there is no 407 either);
    NeedsUser when one can be asked for."""
    ctx, request = s.ctx, s.request
    host = request.host
    user = ctx.authenticate(request) if host else ctx.user
    if user is None and host and ctx.challenges(request):
        raise NeedsUser(c.text)
    return user


def _user(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    user = _identity(c, s)
    if user is None:
        return False
    key = user.lower() if c.fold_case else user
    return any("*" in names or key in names for names in matchers)


def _group(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    user = _identity(c, s)
    if user is None:
        return False
    groups = s.ctx.groups(user)
    if c.fold_case:
        groups = frozenset(group.lower() for group in groups)
    return any(not names.isdisjoint(groups) for names in matchers)


def _external(c: Condition, s: Subject, matchers: Sequence[Any]) -> bool:
    """The helper's answer (``ctx.external``); a helper whose format needs ``%LOGIN`` asks
    for credentials as ``user`` does (NeedsUser: the 407 and its rule)."""
    try:
        return any(s.ctx.external(s.request, call.name, call.arguments) for call in matchers)
    except errors.AuthenticationRequired:
        raise NeedsUser(c.text) from None


_TESTS: dict[str, Callable[[Condition, Subject, Sequence[Any]], bool]] = {
    "src": _src, "dst": _dst, "port": _port, "method": _method, "user": _user,
    "group": _group, "url_regex": _url_regex, "path": _path, "time": _when,
    "external": _external,
}


def fold(kind: Kind, values: Sequence[str], fold_case: bool) -> list[str]:
    """Values as they are compared: user and group names in lower case when names are
    case-insensitive."""
    if fold_case and kind.needs_user:
        return [value.lower() for value in values]
    return list(values)


def timezone(name: str) -> Optional[datetime.tzinfo]:
    """``[acl] timezone``: an IANA zone name, or "" for the system's (None)."""
    if not name:
        return None
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"not a time zone: {name!r} (an IANA name such as Europe/Berlin)"
                         ) from None
