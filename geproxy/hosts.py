"""Host patterns, as the ACL's ``dst`` condition and the parent rules write them.

``HostPatterns.parse(["example.com", ".example.org", "*.cdn.example", "10.0.0.0/8"])``: exact
names, ``.domain`` (the domain and every name below it), shell globs, and IP networks (which
match IP-literal hosts only, never names that resolve into them). Names are compared in
lower case without a trailing dot. ``NetworkSet``: IP networks, asked whether an address is
in one of them. ``RouteRule``: the grammar of the ``[parents] rules`` lines, for the
``parent`` plugin that routes by them and the ``pac`` plugin that writes them into a PAC
file. Part of the public API, for plugins.

Both are built for lists of a million entries (the ACL's ``dst`` and ``src`` read them from
files): a name costs a set lookup per label, an address a binary search in C, whatever the
number of entries; only globs are tried one by one.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

__all__ = ["HostPatterns", "NetworkSet", "RouteRule", "ip_literal", "is_host_name",
           "unmapped", "parse_network", "authority"]


def authority(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets: how a CONNECT target, a listen address
    or a log line spells an address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The characters of a host name; is_host_name holds the label rules.
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-."
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
    # Checked with string methods rather than a regular expression: this runs once per value
    # of a list that may hold a million (a third of the time it took with one). Only the
    # name's characters, then no empty label (a dot first, last or doubled) and no label
    # that starts or ends with "-" (first, last, or beside a dot).
    return (not text.strip(_NAME_CHARS) and text[:1] not in ".-" and text[-1:] not in ".-"
            and ".." not in text and ".-" not in text and "-." not in text)


def ip_literal(host: str) -> Optional[IPAddress]:
    """The address a target host denotes by itself, without DNS; None for a name.

    Besides canonical literals this takes the numeric forms the system resolver turns into
    an IPv4 address without asking DNS (``127.1``, ``2130706433``, ``0x7f.1``), so they cannot
    slip past a ``dst`` network.
    """
    # Every literal holds a ":" (IPv6) or starts with an ASCII digit (IPv4, and inet_aton's
    # forms): a name returns here, without the ValueError ipaddress would raise inside
    # (microseconds, on every request to a name and for every value of a dst list).
    if ":" not in host and not "0" <= host[:1] <= "9":
        return None
    return _literal(host)


@functools.lru_cache(maxsize=4096)
def _literal(host: str) -> Optional[IPAddress]:
    """``ip_literal`` of a host that may be one, memoized: the same few addresses come in
    request after request, and reading one costs ``ipaddress`` several microseconds. A pure
    function of the text; the addresses it returns are immutable."""
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
    """A set of host patterns. Names match names, networks match IP literals.

    The fields hold the patterns as parsed, in the order given (``parse`` lower-cases them
    and drops a trailing dot; a ``.domain`` is kept without its dot). A check looks a name
    up in ``names``, then each name it ends in (``a.b.example``, ``b.example``, ``example``)
    among the domains, then tries the globs one by one; an IP literal is looked up in a
    ``NetworkSet`` of the networks. Both lookup sets are built once, with the object.
    """

    names: frozenset[str]
    domains: tuple[str, ...]
    globs: tuple[str, ...]
    networks: tuple[IPNetwork, ...]
    _domain_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _network_set: "NetworkSet" = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived from the public fields, which stay what they were (frozen: set through
        # object.__setattr__, as dataclasses do themselves).
        object.__setattr__(self, "_domain_set", frozenset(self.domains))
        object.__setattr__(self, "_network_set", NetworkSet(self.networks))

    @classmethod
    def parse(cls, values: Iterable[str]) -> "HostPatterns":
        """Raises ValueError naming the first value that is no pattern. ``values`` is read
        once, in order: a generator over a file's lines saves holding them all."""
        return _parse(values)

    def match(self, host: str) -> bool:
        """Whether ``host`` (a name or an IP literal) is one of these."""
        return self.matches(host, ip_literal(host))

    def matches(self, host: str, literal: Optional[IPAddress]) -> bool:
        """``match``, for a caller that has ``ip_literal(host)`` already: a literal is
        looked up among the networks only, a name (``literal`` None) among the rest."""
        if literal is not None:
            return literal in self._network_set
        name = host.rstrip(".").lower()
        if name in self.names:
            return True
        domains = self._domain_set
        if domains:
            # The name ends in ".domain" exactly when the text after one of its dots is the
            # domain: a lookup per dot, whatever the number of domains.
            if name in domains:
                return True
            dot = name.find(".")
            while dot >= 0:
                if name[dot + 1:] in domains:
                    return True
                dot = name.find(".", dot + 1)
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.globs)


class NetworkSet:
    """IP networks, asked whether an address is in one of them: ``address in networks``.

    The networks are kept as the sorted, disjoint ranges of addresses they cover, one list
    per IP version; a check is a binary search among them (``bisect``, in C): about 17
    comparisons for 100,000 ranges, 4 for 10, and no more for an IPv6 list of many prefix
    lengths. An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``) is checked as the IPv4
    address it maps, as ``unmapped`` says a dual-stack socket reaches it: an IPv4 network
    may match it, an IPv6 network never does. ``len``, ``bool`` and iteration give the
    networks it was built from, in their order, duplicates included. Immutable.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        """Raises TypeError for an item that is no ``ipaddress`` network."""
        self._networks: tuple[IPNetwork, ...] = tuple(networks)
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in self._networks:
            if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise TypeError(f"not an IP network: {network!r}")
            first = int(network.network_address)
            size = 1 << (network.max_prefixlen - network.prefixlen)
            spans[network.version].append((first, first + size - 1))
        self._v4 = _ranges(spans[4])
        self._v6 = _ranges(spans[6])

    @classmethod
    def parse(cls, values: Iterable[str]) -> "NetworkSet":
        """Addresses and networks as ``parse_network`` reads them (``10.0.0.0/8``,
        ``192.0.2.7``, ``2001:db8::/32``); raises ValueError naming the first bad value.
        ``values`` is read once, in order (a generator over a file's lines will do)."""
        return cls(parse_network(value) for value in values)

    def __contains__(self, address: object) -> bool:
        """Raises TypeError for anything but an ``ipaddress`` address: a string or a
        network would otherwise be silently in no network."""
        if isinstance(address, ipaddress.IPv4Address):
            number, (firsts, lasts) = int(address), self._v4
        elif isinstance(address, ipaddress.IPv6Address):
            number = int(address)
            if number >> 32 == 0xFFFF:  # ::ffff:0:0/96, IPv4-mapped
                number, (firsts, lasts) = number & 0xFFFFFFFF, self._v4
            else:
                firsts, lasts = self._v6
        else:
            raise TypeError(f"not an IP address: {address!r}")
        # The last range that starts at or below the address holds it, or none does.
        index = bisect.bisect_right(firsts, number)
        return index > 0 and number <= lasts[index - 1]

    def __len__(self) -> int:
        return len(self._networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __repr__(self) -> str:
        return f"<NetworkSet of {len(self._networks)} networks>"


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


def _ranges(spans: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The addresses the (first, last) spans cover, as the firsts and the lasts of sorted,
    disjoint ranges that do not touch. Two networks are either disjoint or one holds the
    other, so a span overlaps the range before it only by starting inside it."""
    spans.sort()
    firsts: list[int] = []
    lasts: list[int] = []
    for first, last in spans:
        if lasts and first <= lasts[-1] + 1:
            if last > lasts[-1]:
                lasts[-1] = last
        else:
            firsts.append(first)
            lasts.append(last)
    return tuple(firsts), tuple(lasts)


def _parse(values: Iterable[str]) -> HostPatterns:
    # Once per value of lists of up to a million: string methods, no regular expression but
    # for globs.
    names: set[str] = set()
    domains: list[str] = []
    globs: list[str] = []
    networks: list[IPNetwork] = []
    for value in values:
        text = value.lower()
        if text[-1:] == ".":
            text = text.rstrip(".")
        # The bulk of a long list, first: a .domain. Without "/" or ":" it is no network,
        # and no literal starts with a dot; any other value starting with one is a glob
        # (".*.example") or a mistake.
        if text[:1] == "." and "/" not in text and ":" not in text:
            domain = text[1:]
            if is_host_name(domain):
                domains.append(domain)
                continue
        elif "/" in text or ":" in text:
            networks.append(parse_network(text))
            continue
        literal = ip_literal(text)
        if literal is not None:
            networks.append(ipaddress.ip_network(literal))
        elif ("*" in text or "?" in text or "[" in text) and _GLOB.fullmatch(text):
            globs.append(text)
        elif is_host_name(text):
            names.add(text)
        else:
            raise ValueError(f"not a host name, .domain, glob or IP network: {value!r}")
    return HostPatterns(frozenset(names), tuple(domains), tuple(globs), tuple(networks))

