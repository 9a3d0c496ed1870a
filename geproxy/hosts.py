"""Host patterns, as the ACL's ``dst`` condition and the parent rules write them.

``HostPatterns.parse(["example.com", ".example.org", "*.cdn.example", "10.0.0.0/8"])``: exact
names, ``.domain`` (the domain and every name below it), shell globs, and IP networks (which
match IP-literal hosts only, never names that resolve into them). Names are compared in
lower case without a trailing dot. ``RouteRule``: the grammar of the ``[parents] rules``
lines, for the ``parent`` plugin that routes by them and the ``pac`` plugin that writes them
into a PAC file. Part of the public API, for plugins.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

__all__ = ["HostPatterns", "NetworkSet", "RouteRule", "ip_literal", "is_host_name", "unmapped",
           "parse_network", "authority"]


def authority(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets: how a CONNECT target, a listen address
    or a log line spells an address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_GLOB = re.compile(r"[a-z0-9_.*?!\[\]-]+")
#: What inet_aton could take for an IPv4 address: 127.1, 2130706433, 0x7f.0.0.1, 0177.0.0.1.
_NUMERIC_HOST = re.compile(r"[0-9][0-9a-fx.]*")


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:10.1.2.3`` is 10.1.2.3: a dual-stack socket reaches the IPv4 host."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a host name as the options write one: dot-separated labels of
    lower-case letters, digits, ``-`` and ``_``, no label starting or ending with ``-``."""
    return _NAME.fullmatch(text) is not None


def ip_literal(host: str) -> Optional[IPAddress]:
    """The address a target host denotes by itself, without DNS; None for a name.

    Besides canonical literals this takes the numeric forms the system resolver turns into
    an IPv4 address without asking DNS (``127.1``, ``2130706433``, ``0x7f.1``), so they cannot
    slip past a ``dst`` network.
    """
    try:
        return unmapped(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        return _inet_aton(host)
    return None


def _inet_aton(host: str) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address inet_aton(3) reads in ``host``: one to four parts, each decimal,
    octal (a leading 0) or hexadecimal (0x), the last filling the bytes left (``127.1`` is
    127.0.0.1). Written out here so that this module needs no socket (and stays below the
    network layer); tests hold it to the C library's."""
    parts = host.split(".")
    if len(parts) > 4:
        return None
    values = []
    for part in parts:
        text = part.lower()
        if text.startswith("0x"):
            digits, base = text[2:], 16
        elif len(text) > 1 and text.startswith("0"):
            digits, base = text[1:], 8
        else:
            digits, base = text, 10
        if not digits or not all(c in "0123456789abcdef"[:base] for c in digits):
            return None
        values.append(int(digits, base))
    last = values.pop()
    if any(value > 255 for value in values) or last >= 1 << (8 * (4 - len(values))):
        return None
    number = last
    for index, value in enumerate(values):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


@dataclass(frozen=True)
class HostPatterns:
    """A set of host patterns. Names match names, networks match IP literals."""

    names: frozenset[str]
    domains: tuple[str, ...]
    globs: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, values: Sequence[str]) -> "HostPatterns":
        """Raises ValueError naming the first value that is no pattern."""
        return _parse(values)

    def match(self, host: str) -> bool:
        """Whether ``host`` (a name or an IP literal) is one of these."""
        return self.matches(host, ip_literal(host))

    def matches(self, host: str, literal: Optional[IPAddress]) -> bool:
        if literal is not None:
            return any(literal in network for network in self.networks)
        name = host.rstrip(".").lower()
        if name in self.names:
            return True
        if any(name == domain or name.endswith("." + domain) for domain in self.domains):
            return True
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.globs)


@dataclass(frozen=True)
class RouteRule:
    """One line of ``[parents] rules``: ``direct`` or ``parent``, then the host patterns of
    the targets it decides for (``HostPatterns``), or ``all`` alone for every target, names
    and IP literals alike. In a list, the first rule that matches a host decides."""

    #: True for ``parent`` (through the parent proxies), False for ``direct``.
    via_parent: bool
    #: The hosts it matches; None for ``all``.
    patterns: Optional[HostPatterns]
    #: The line as written.
    text: str

    #: The words a rule starts with.
    ACTIONS = ("direct", "parent")

    def matches(self, host: str) -> bool:
        """Whether the rule decides for ``host`` (a name or an IP literal)."""
        return self.patterns is None or self.patterns.match(host)

    @classmethod
    def parse(cls, text: str) -> "RouteRule":
        """One line; raises ValueError saying what is wrong with it."""
        words = [word for word in re.split(r"[\s,]+", text.strip()) if word]
        if not words or words[0] not in cls.ACTIONS:
            raise ValueError("a rule starts with direct or parent")
        action, values = words[0], words[1:]
        if not values:
            raise ValueError(f"nothing to match: write '{action} all' or give host patterns")
        if "all" in values:
            if values != ["all"]:
                raise ValueError("all stands alone: no patterns go with it")
            return cls(action == "parent", None, text)
        return cls(action == "parent", HostPatterns.parse(values), text)

    @classmethod
    def parse_lines(cls, lines: Sequence[str]) -> tuple["RouteRule", ...]:
        """Every line of a ``rules`` value (a ``lines`` option), in order, blank lines left
        out; raises ValueError starting with ``line N`` (counting every line given)."""
        rules = []
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                rules.append(cls.parse(text))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}: {text!r}") from None
        return tuple(rules)


def parse_network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {value!r}") from None
    raise ValueError(f"{value!r} has host bits set (did you mean {loose}?)")


def _parse(values: Sequence[str]) -> HostPatterns:
    names: set[str] = set()
    domains: list[str] = []
    globs: list[str] = []
    networks: list[IPNetwork] = []
    for value in values:
        text = value.lower().rstrip(".")
        if "/" in text or ":" in text:
            networks.append(parse_network(text))
            continue
        literal = ip_literal(text)
        if literal is not None:
            networks.append(ipaddress.ip_network(literal))
        elif text.startswith(".") and _NAME.fullmatch(text[1:]):
            domains.append(text[1:])
        elif any(c in text for c in "*?[") and _GLOB.fullmatch(text):
            globs.append(text)
        elif _NAME.fullmatch(text):
            names.add(text)
        else:
            raise ValueError(f"not a host name, .domain, glob or IP network: {value!r}")
    return HostPatterns(frozenset(names), tuple(domains), tuple(globs), tuple(networks))


class NetworkSet:
    """IP networks, for membership tests: ``address in networks``."""

    def __init__(self, networks: Sequence[IPNetwork] = ()) -> None:
        self._networks = tuple(networks)

    @classmethod
    def parse(cls, values: Sequence[str]) -> "NetworkSet":
        return cls([parse_network(value) for value in values])

    def __contains__(self, address: object) -> bool:
        return any(address in network for network in self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._networks)
