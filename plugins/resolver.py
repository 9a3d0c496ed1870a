"""``resolver``: host names to addresses, through listed nameservers or the system's
resolver, with one time bound on the whole lookup and a choice of address families.

``[resolver] nameservers = system`` (the default) asks gevent's getaddrinfo, so /etc/hosts
and nsswitch apply and the TTL is unknown. A list of addresses (``10.0.0.53
[2001:db8::53]:5353``) sends A and AAAA questions to those servers with dnspython over gevent
sockets: the two questions go out at once, each tries the servers in order (a silent server
gets its share of the time left, SERVFAIL or REFUSED moves on, NXDOMAIN is final), a truncated
UDP answer is asked again over TCP, and CNAME chains are followed inside the answer. A
datagram that is not the answer (another id or question, not a response, garbage: spoofed,
stale or broken) is ignored and the wait goes on (RFC 5452 section 9.1). The TTL of the
result is the smallest TTL of the records used.

IP literals are answered without a lookup. The hook is an ordinary ``resolve``
implementation: it answers before the built-in ``system_resolver`` (``trylast``), and a cache
or a guard can wrap it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import gevent
import gevent.socket

from geproxy import (
    Config,
    ConfigError,
    Context,
    OptionRegistry,
    Resolved,
    errors,
    hookimpl,
)
from geproxy.net.dns import gai_rcode, literal_address

log = logging.getLogger(__name__)

SECTION = "resolver"
DNS_PORT = 53
#: The EDNS0 UDP payload size of DNS Flag Day 2020: no IP fragmentation on common paths.
EDNS_PAYLOAD = 1232

_IPV6_MODES = {"on": "on", "yes": "on", "true": "on", "1": "on",
               "off": "off", "no": "off", "false": "off", "0": "off",
               "prefer": "prefer"}
_RDTYPES = {"on": (dns.rdatatype.A, dns.rdatatype.AAAA),
            "prefer": (dns.rdatatype.AAAA, dns.rdatatype.A),
            "off": (dns.rdatatype.A,)}
_FAMILIES = {"on": (socket.AF_INET, socket.AF_INET6),
             "prefer": (socket.AF_INET6, socket.AF_INET),
             "off": (socket.AF_INET,)}


class _Expired(Exception):
    """Raised by the lookup's gevent.Timeout into the resolving greenlet, and only there."""


@dataclass
class _Outcome:
    """What one question (A or AAAA) came to, over every server it was asked of.

    ``rcode`` is NOERROR (``addresses`` may then be empty: no data), NXDOMAIN, the last failing
    rcode when every server failed (SERVFAIL, REFUSED ...), or None when no server answered.
    """

    rdtype: dns.rdatatype.RdataType
    addresses: list[str] = field(default_factory=list)
    ttl: Optional[int] = None
    rcode: Optional[str] = None
    timed_out: bool = False
    error: str = ""


class Resolver:
    name = "resolver"

    def __init__(self) -> None:
        #: (ip, port) of each nameserver, in the order asked; None for the system resolver.
        self._servers: Optional[list[tuple[str, int]]] = None
        self._ipv6 = "on"
        self._timeout = 3.0

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("nameservers", "list", "system",
                 "system (getaddrinfo: /etc/hosts, nsswitch), or nameserver addresses asked "
                 "in order: 10.0.0.53, 10.0.0.53:5353, [2001:db8::53]:5353.")
            .add("ipv6", "str", "on",
                 "on: ask for A and AAAA, IPv4 addresses first; prefer: IPv6 first; "
                 "off: IPv4 only.")
            .add("timeout", "duration", "3s",
                 "Time for a whole lookup, every server and retry included; past it the "
                 "client gets 504 dns_timeout.", minimum=0.001)
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        self._servers = _parse_nameservers(section["nameservers"], config.path)
        mode = _IPV6_MODES.get(section["ipv6"].lower())
        if mode is None:
            raise ConfigError(f"not on, off or prefer: {section['ipv6']!r}", path=config.path,
                              section=SECTION, key="ipv6")
        self._ipv6 = mode
        self._timeout = section["timeout"]

    @hookimpl
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        literal = literal_address(host, port)
        if literal is not None:
            return Resolved([literal])
        try:
            if self._servers is None:
                return self._system(host, port)
            return self._nameservers(host, port)
        except (errors.DNSError, errors.DNSTimeout) as exc:
            # The detail names the host; the rcode is what the core's own line lacks.
            log.debug("[%s] %s (rcode %s)", ctx.conn_id, exc.detail, exc.rcode or "-")
            raise

    # -- the system resolver ----------------------------------------------------------------

    def _system(self, host: str, port: int) -> Resolved:
        family = socket.AF_INET if self._ipv6 == "off" else socket.AF_UNSPEC
        try:
            # The lookup runs in gevent's resolver; on expiry this greenlet stops waiting.
            with gevent.Timeout(self._timeout, _Expired):
                infos = gevent.socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                                  socket.IPPROTO_TCP)
        except _Expired:
            raise errors.DNSTimeout(f"{host}: no answer within {self._timeout:g}s") from None
        except socket.gaierror as exc:
            raise errors.DNSError(f"{host}: {exc.strerror}", rcode=gai_rcode(exc)) from None
        order = _FAMILIES[self._ipv6]
        # sorted() is stable: getaddrinfo's order (RFC 6724) holds within a family.
        addresses = [info[4] for info in sorted(
            (info for info in infos if info[0] in order), key=lambda info: order.index(info[0]))]
        if not addresses:
            raise errors.DNSError(f"{host}: no addresses", rcode="NOERROR")
        return Resolved(addresses, ttl=None)

    # -- nameservers --------------------------------------------------------------------------

    def _nameservers(self, host: str, port: int) -> Resolved:
        try:
            # Absolute: no search domain of resolv.conf is ever appended.
            qname = dns.name.from_text(host.rstrip(".") + ".")
        except dns.exception.DNSException as exc:
            raise errors.DNSError(f"{host}: not a DNS name: {exc}") from None
        deadline = time.monotonic() + self._timeout
        first, *rest = _RDTYPES[self._ipv6]
        outcomes = {rdtype: _Outcome(rdtype, timed_out=True) for rdtype in _RDTYPES[self._ipv6]}
        servers = self._servers or []
        helpers = [gevent.spawn(_ask, servers, qname, rdtype, deadline) for rdtype in rest]
        try:
            with gevent.Timeout(self._timeout, _Expired):
                outcomes[first] = _ask(servers, qname, first, deadline)
                for helper in helpers:
                    outcome = helper.get()
                    outcomes[outcome.rdtype] = outcome
        except _Expired:
            pass  # the questions still open stay timed out; another may have its addresses
        finally:
            gevent.killall(helpers)
        return _combine(host, port, [outcomes[rdtype] for rdtype in _RDTYPES[self._ipv6]],
                        self._timeout)


def _ask(servers: list[tuple[str, int]], qname: dns.name.Name,
         rdtype: dns.rdatatype.RdataType, deadline: float) -> _Outcome:
    """One question, to each server in turn until one gives a final answer."""
    query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    outcome = _Outcome(rdtype)
    for index, (ip, port) in enumerate(servers):
        left = deadline - time.monotonic()
        if left <= 0:
            outcome.timed_out = True
            break
        # A silent server gets its share of the time left, so the next ones get theirs.
        share = left / (len(servers) - index)
        try:
            response = _udp(query, ip, port, share)
            if response.flags & dns.flags.TC:
                share = max(deadline - time.monotonic(), 0) / (len(servers) - index)
                response = dns.query.tcp(query, ip, timeout=share, port=port)
        except dns.exception.Timeout:
            outcome.timed_out = True
            log.debug("nameserver %s port %d: no answer for %s %s", ip, port, qname,
                      dns.rdatatype.to_text(rdtype))
            continue
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            log.debug("nameserver %s port %d: %s for %s %s", ip, port, outcome.error,
                      qname, dns.rdatatype.to_text(rdtype))
            continue
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return _Outcome(rdtype, rcode="NXDOMAIN")
        if rcode != dns.rcode.NOERROR:
            outcome.rcode = dns.rcode.to_text(rcode)
            log.debug("nameserver %s port %d: %s for %s %s", ip, port, outcome.rcode,
                      qname, dns.rdatatype.to_text(rdtype))
            continue
        if not isinstance(response, dns.message.QueryMessage):  # not an answer to a query
            outcome.error = f"unexpected {type(response).__name__}"
            continue
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as exc:  # a CNAME loop, a malformed answer
            outcome.error = f"{type(exc).__name__}: {exc}"
            continue
        if chain.answer is None:
            return _Outcome(rdtype, rcode="NOERROR")
        return _Outcome(rdtype, [rdata.address for rdata in chain.answer],
                        chain.minimum_ttl, "NOERROR")
    return outcome


def _udp(query: dns.message.Message, ip: str, port: int, timeout: float) -> dns.message.Message:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with gevent.socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        # Connected, so that a closed port (ICMP port unreachable) ends the wait at once.
        # ignore_errors: a datagram that does not answer the query must not end the lookup
        # (ignore_unexpected only drops other sources, which the connect already does).
        sock.connect((ip, port))
        return dns.query.udp(query, ip, timeout=timeout, port=port, ignore_unexpected=True,
                             ignore_errors=True, sock=sock)


def _combine(host: str, port: int, outcomes: list[_Outcome], timeout: float) -> Resolved:
    """The addresses of every question, in the configured family order; or the error that
    says most: NXDOMAIN, a server failure, a timeout, an unreachable server, no data."""
    addresses: list[tuple[Any, ...]] = []
    ttls: list[int] = []
    for outcome in outcomes:
        if outcome.addresses and outcome.ttl is not None:
            v6 = outcome.rdtype == dns.rdatatype.AAAA
            addresses.extend((ip, port, 0, 0) if v6 else (ip, port) for ip in outcome.addresses)
            ttls.append(outcome.ttl)
    if addresses:
        return Resolved(addresses, ttl=min(ttls))
    if any(outcome.rcode == "NXDOMAIN" for outcome in outcomes):
        raise errors.DNSError(f"{host}: no such name", rcode="NXDOMAIN")
    for outcome in outcomes:
        if outcome.rcode not in (None, "NOERROR"):
            raise errors.DNSError(f"{host}: every nameserver failed", rcode=outcome.rcode)
    if any(outcome.timed_out for outcome in outcomes):
        raise errors.DNSTimeout(f"{host}: no answer within {timeout:g}s")
    for outcome in outcomes:
        if outcome.error:
            raise errors.DNSError(f"{host}: no nameserver answered: {outcome.error}")
    raise errors.DNSError(f"{host}: no addresses", rcode="NOERROR")


# -- configuration ---------------------------------------------------------------------------


def _parse_nameservers(items: list[str], path: str) -> Optional[list[tuple[str, int]]]:
    """``system`` (None), or the (ip, port) of each ``ip``, ``ip:port``, ``[ipv6]``,
    ``[ipv6]:port`` item."""
    if [item.lower() for item in items] == ["system"]:
        return None
    if not items:
        raise ConfigError("give nameserver addresses, or system", path=path,
                          section=SECTION, key="nameservers")
    servers = []
    for item in items:
        server = _parse_nameserver(item)
        if server is None:
            raise ConfigError(
                f"not a nameserver: {item!r} (use 10.0.0.53, 10.0.0.53:5353, [2001:db8::53], "
                "[2001:db8::53]:5353, or system alone)",
                path=path, section=SECTION, key="nameservers")
        servers.append(server)
    return servers


def _parse_nameserver(item: str) -> Optional[tuple[str, int]]:
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else str(DNS_PORT)
        version = 6
    else:
        host, sep, port_text = item.partition(":")
        if ":" in port_text:  # a bare IPv6 address, whose port would be ambiguous
            return None
        port_text = port_text if sep else str(DNS_PORT)
        version = 4
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version != version or not (port_text.isascii() and port_text.isdigit()):
        return None
    if not 1 <= int(port_text) <= 65535:
        return None
    return str(address), int(port_text)
