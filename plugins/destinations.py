"""``destinations``: the SSRF and DNS-rebinding guard around the ``resolve`` hook.

Whatever answered ``resolve`` (a resolver plugin, a DNS cache, the system resolver, or the
system resolver's answer for an IP literal), this wrapper sees the answer last and drops every
address in a denied network before the core connects. The core connects to exactly the
addresses ``resolve`` returns, with no second lookup, so the address checked is the address
connected to: a name that answers a public address once and a private one the next time is
judged on each answer, and never gets through with the private one.

Rules, for each address of an answer:

1. Anything but an IP address in strict syntax (what ``inet_pton`` accepts) is dropped:
   ``127.1``, ``0177.0.0.1``, ``2130706433``, a host name. The connect would read it again,
   as ``inet_aton`` or a name lookup does, and reach another address than the one checked.
2. An IPv6 address that carries an IPv4 address (IPv4-mapped ``::ffff:0:0/96``, NAT64
   ``64:ff9b::/96``, 6to4 ``2002::/16``, IPv4-compatible ``::/96`` but ``::`` and ``::1``,
   and the client of a Teredo ``2001::/32`` address) is judged as both addresses.
3. An address (or the IPv4 address it carries) in an ``allow`` network is kept: allow wins.
   Else one (or whose IPv4 address is) in a ``deny`` network is dropped. Else it is kept.

When nothing is left the request is refused: 403 with ``Proxy-Status: ...;
error=destination_ip_prohibited``, a policy refusal (the core answers 502
``proxy_configuration_error`` when the address was a parent proxy's). The addresses and
networks are parsed once, in ``configure``; a check is a few integer comparisons (a binary
search over merged ranges).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from bisect import bisect_right
from typing import Any, Iterable, Optional, Sequence, Union

from geproxy import Config, ConfigError, Context, OptionRegistry, Resolved, errors, hookimpl

__all__ = ["Destinations", "Policy", "DEFAULT_DENY"]

log = logging.getLogger(__name__)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Networks no client may reach through the proxy unless ``allow`` names them.
DEFAULT_DENY: tuple[str, ...] = (
    # IPv4
    "0.0.0.0/8",           # "this network"; 0.0.0.0 reaches the local host
    "10.0.0.0/8",          # RFC 1918
    "100.64.0.0/10",       # shared address space (carrier-grade NAT)
    "127.0.0.0/8",         # loopback
    "169.254.0.0/16",      # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",       # RFC 1918
    "192.0.0.0/24",        # IETF protocol assignments
    "192.0.2.0/24",        # documentation (TEST-NET-1)
    "192.168.0.0/16",      # RFC 1918
    "198.18.0.0/15",       # benchmarking
    "198.51.100.0/24",     # documentation (TEST-NET-2)
    "203.0.113.0/24",      # documentation (TEST-NET-3)
    "224.0.0.0/4",         # multicast
    "240.0.0.0/4",         # reserved
    "255.255.255.255/32",  # limited broadcast
    # IPv6
    "::1/128",             # loopback
    "::/128",              # unspecified
    "100::/64",            # discard
    "2001:db8::/32",       # documentation
    "fc00::/7",            # unique local
    "fe80::/10",           # link-local
    "fec0::/10",           # site-local (deprecated, still routed in some networks)
    "ff00::/8",            # multicast
)

_MAPPED = 0xFFFF                                   # ::ffff:0:0/96, bits above the IPv4
_NAT64 = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
_SIXTOFOUR = 0x2002                                # 2002::/16
_TEREDO = 0x20010000                               # 2001::/32
_LOW32 = 0xFFFFFFFF
#: Addresses shown in one log line; the rest are counted.
_SHOWN = 8


class _Ranges:
    """A set of integer ranges, merged and sorted once; membership by binary search."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [start for start, _ in merged]
        self._ends = [end for _, end in merged]

    def __contains__(self, value: int) -> bool:
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value <= self._ends[i]


def _embedded_ipv4(value: int) -> Optional[int]:
    """The IPv4 address an IPv6 address carries, as an int; None when it carries none."""
    high = value >> 32
    if high == _MAPPED or high == _NAT64:
        return value & _LOW32
    if high == 0 and value > 1:  # IPv4-compatible; :: and ::1 are not
        return value
    if value >> 112 == _SIXTOFOUR:
        return (value >> 80) & _LOW32
    if value >> 96 == _TEREDO:
        return ~value & _LOW32  # the client's address, bits inverted (RFC 4380 4)
    return None


def parse_address(ip: Any) -> Optional[tuple[int, int]]:
    """``(version, integer)`` of an IP address in strict syntax (an IPv6 zone ``%eth0`` is
    ignored), or None for anything else."""
    try:
        if ":" in ip:
            packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
            return 6, int.from_bytes(packed, "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, TypeError, ValueError):
        return None


class Policy:
    """Denied and allowed networks, compiled for a fast per-address check."""

    def __init__(self, deny: Iterable[Network], allow: Iterable[Network] = ()) -> None:
        self.deny4, self.deny6 = _split(list(deny))
        self.allow4, self.allow6 = _split(list(allow))

    @classmethod
    def from_strings(cls, deny: Iterable[str], allow: Iterable[str] = ()) -> "Policy":
        """For tests and tools: networks as text (ValueError for a bad one)."""
        return cls([_network(n) for n in deny], [_network(n) for n in allow])

    def prohibited(self, ip: Any) -> bool:
        """Whether the proxy must not connect to ``ip`` (a socket address's first item).

        Not strict syntax: prohibited. Allowed (the address, or the IPv4 address it carries):
        not prohibited. Else denied (the address, or the IPv4 address it carries):
        prohibited."""
        parsed = parse_address(ip)
        if parsed is None:
            return True
        version, value = parsed
        if version == 4:
            return value not in self.allow4 and value in self.deny4
        if value in self.allow6:
            return False
        inner = _embedded_ipv4(value)
        if inner is None:
            return value in self.deny6
        if inner in self.allow4:
            return False
        return value in self.deny6 or inner in self.deny4


def _split(networks: Sequence[Network]) -> tuple[_Ranges, _Ranges]:
    four = _Ranges((int(n.network_address), int(n.broadcast_address))
                   for n in networks if n.version == 4)
    six = _Ranges((int(n.network_address), int(n.broadcast_address))
                  for n in networks if n.version == 6)
    return four, six


class Destinations:
    """The ``[destinations]`` section: ``deny`` and ``allow`` networks."""

    name = "destinations"

    def __init__(self) -> None:
        # Guarded from the start: the default policy until configure() builds the real one.
        self.policy = Policy.from_strings(DEFAULT_DENY)

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(self.name)
            .add("deny", "list", " ".join(DEFAULT_DENY),
                 "Networks (CIDR) the proxy never connects to: loopback, private, "
                 "link-local and metadata, special-purpose. Setting it replaces the list.")
            .add("allow", "list", "",
                 "Networks (CIDR) exempt from deny: allow wins over deny.")
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(self.name)
        self.policy = Policy(_networks(config, "deny", section["deny"]),
                             _networks(config, "allow", section["allow"]))

    @hookimpl(wrapper=True, tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Any:
        # A wrapper sees what any plain implementation answered (a cache hit included), and
        # tryfirst puts it outside the other wrappers (a cache's store, a timeout).
        # DNSError, DNSTimeout and the like raised inside pass through untouched.
        addresses = yield
        if not addresses:
            return addresses  # no answer: the core's "no address" error applies
        prohibited = self.policy.prohibited
        kept: list[tuple[Any, ...]] = []
        dropped: list[tuple[Any, ...]] = []
        for address in addresses:
            (dropped if prohibited(address[0]) else kept).append(address)
        if dropped:
            if not kept:
                # The core logs this detail (at info) and sends the client only the status.
                raise errors.DestinationProhibited(
                    f"{host}: every address is prohibited by [destinations]: "
                    f"{_listed(dropped)}")
            log.info("[%s] %s: prohibited addresses dropped: %s; %d left", ctx.conn_id, host,
                     _listed(dropped), len(kept))
        return Resolved(kept, ttl=getattr(addresses, "ttl", None))


def _networks(config: Config, key: str, items: Iterable[str]) -> list[Network]:
    out = []
    for item in items:
        try:
            out.append(_network(item))
        except ValueError as exc:
            raise ConfigError(f"not an IP network or address: {item!r}{exc}",
                              path=config.path, section="destinations", key=key) from None
    return out


def _network(item: str) -> Network:
    """A CIDR or a single address; ValueError with a hint (or none) when it is neither."""
    if "%" in item:  # addresses are judged without their zone, so networks have none
        raise ValueError(" (no %zone here)")
    try:
        return ipaddress.ip_network(item)
    except ValueError:
        pass
    try:  # only the host bits are wrong: say which network was likely meant
        meant = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError("") from None
    raise ValueError(f": host bits set, did you mean {meant}?")


def _listed(addresses: Sequence[tuple[Any, ...]]) -> str:
    shown = " ".join(str(address[0]) for address in addresses[:_SHOWN])
    more = len(addresses) - _SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")
