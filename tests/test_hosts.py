"""geproxy.hosts: numeric IPv4 forms read without a socket, held to the C library's inet_aton
(what a resolver would make of the same text); HostPatterns, which looks names up by label
and networks by prefix length, held to the scan it replaced (kept here as the reference);
NetworkSet."""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
import socket
from typing import Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geproxy.hosts import (
    HostPatterns,
    NetworkSet,
    ip_literal,
    is_host_name,
    parse_network,
    unmapped,
)

_PART = st.one_of(
    st.integers(0, 2**32).map(str),
    st.integers(0, 2**32).map(lambda n: "0" + format(n, "o")),
    st.integers(0, 2**32).map(lambda n: "0x" + format(n, "x")),
    st.sampled_from(["", "0", "0x", "00", "08", "0x1g", "1a", "256", "4294967296"]),
)


def _libc(text: str):
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=5).map(".".join))
def test_numeric_forms_read_as_inet_aton_reads_them(text: str) -> None:
    if not text[:1].isdigit():
        return  # not a numeric host: ip_literal reads it as a name (None), as it did before
    assert ip_literal(text) == _libc(text)


def test_known_numeric_forms() -> None:
    assert ip_literal("127.1") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("2130706433") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("017700000001") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("1.2.3.256") is None
    assert ip_literal("1.2.3.4.5") is None
    assert ip_literal("example.com") is None


# -- HostPatterns against the scan it replaced ---------------------------------------------

# The parse and the match as they were before names were looked up by label: a regular
# expression per value, ip_literal tried on every value, every domain and network scanned.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_GLOB = re.compile(r"[a-z0-9_.*?!\[\]-]+")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _reference_parse(values: list[str]) -> tuple[frozenset[str], tuple[str, ...],
                                                 tuple[str, ...], tuple[Network, ...]]:
    names: set[str] = set()
    domains: list[str] = []
    globs: list[str] = []
    networks: list[Network] = []
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
    return frozenset(names), tuple(domains), tuple(globs), tuple(networks)


def _reference_match(fields: tuple[frozenset[str], tuple[str, ...], tuple[str, ...],
                                   tuple[Network, ...]], host: str) -> bool:
    names, domains, globs, networks = fields
    literal = ip_literal(host)
    if literal is not None:
        return any(literal in network for network in networks)
    name = host.rstrip(".").lower()
    if name in names:
        return True
    if any(name == domain or name.endswith("." + domain) for domain in domains):
        return True
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


# Few labels, so that generated hosts and patterns meet; with upper case, a dotless i with
# a dot (its lower case is two characters), a Kelvin sign (whose lower case is "k"), digits
# that make IPv4 forms, glob characters and what no name may hold.
_LABELS = st.sampled_from(["a", "b", "example", "com", "x-y", "_s", "1", "10", "0x7f", "127",
                           "256", "-a", "a-", "", "A", "Example", "\u0130", "\u212a", "*",
                           "?", "[ab]", "[!a]", "a b", "a--b", "é"])
_NAMES = st.lists(_LABELS, min_size=1, max_size=5).map(".".join)
_VALUES = st.one_of(
    _NAMES,
    _NAMES.map(lambda name: "." + name),
    _NAMES.map(lambda name: name + "."),
    _NAMES.map(lambda name: "." + name + ".."),
    st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "127.0.0.1", "::1", "::ffff:10.1.2.3",
                     "2001:DB8::/32", "::ffff:10.0.0.0/104", "0.0.0.0/0", "::/0", "10.1",
                     "0x7f.1", "1.2.3.4/32", "a/b", ":", ".", "..", "", "1.2.3.4.5"]),
)
_HOSTS = st.one_of(
    _NAMES, _NAMES.map(lambda name: name + "."), _NAMES.map(lambda name: "www." + name),
    st.sampled_from(["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1", "::1", "127.0.0.1",
                     "0x7f.0.0.1", "10.1", "192.0.2.1", "fe80::1%eth0", "a..example.com",
                     ".example.com", "EXAMPLE.COM."]))


def _outcome(values: list[str]) -> object:
    """What parse made of values: the fields, or the value its ValueError names."""
    try:
        patterns = HostPatterns.parse(values)
    except ValueError as exc:
        return ("error", str(exc))
    return (patterns.names, patterns.domains, patterns.globs, patterns.networks)


@settings(max_examples=800, deadline=None)
@given(st.lists(_VALUES, max_size=6))
def test_parse_takes_and_refuses_what_the_regular_expressions_did(values: list[str]) -> None:
    try:
        expected: object = _reference_parse(values)
    except ValueError as exc:
        expected = ("error", str(exc))
    assert _outcome(values) == expected


# Valid patterns only, and hosts made from them (a label or two in front, a trailing dot, upper
# case), so that most checks have something to find.
_GOOD_LABELS = st.sampled_from(["a", "b", "example", "com", "x-y", "_s", "1", "10", "0x7f",
                                "A", "Example", "\u212a"])
_GOOD_NAMES = st.lists(_GOOD_LABELS, min_size=1, max_size=4).map(".".join)
_GOOD_VALUES = st.one_of(
    _GOOD_NAMES, _GOOD_NAMES.map(lambda name: "." + name),
    _GOOD_NAMES.map(lambda name: "*." + name), _GOOD_NAMES.map(lambda name: name + "?"),
    st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "2001:db8::/32", "::ffff:10.0.0.0/104",
                     "0.0.0.0/0", "::/0", "10.1"]))


@settings(max_examples=800, deadline=None)
@given(st.lists(_GOOD_VALUES, max_size=8), st.data())
def test_match_answers_as_the_scan_did(values: list[str], data: st.DataObject) -> None:
    fields = _reference_parse(values)
    patterns = HostPatterns.parse(values)
    made = [st.just(value.lstrip(".*").rstrip("?")) for value in values]
    around = st.one_of(_HOSTS, *made).flatmap(lambda host: st.sampled_from(
        [host, "www." + host, "a.b." + host, host + ".", "x" + host, host.upper()]))
    for host in data.draw(st.lists(around, min_size=1, max_size=8)):
        assert patterns.match(host) == _reference_match(fields, host), (values, host)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="abz09_-.A*\u0130\u212a \n", max_size=12))
def test_is_host_name_is_the_regular_expression(text: str) -> None:
    assert is_host_name(text) == (_NAME.fullmatch(text) is not None)


def test_domains_match_by_whole_labels() -> None:
    patterns = HostPatterns.parse([".corp.example", "exact.example", "*.cdn.example",
                                   "10.0.0.0/8"])
    for host in ["corp.example", "a.corp.example", "a.b.corp.example", "CORP.Example.",
                 "a..corp.example", "exact.example", "x.cdn.example", "10.9.8.7",
                 "::ffff:10.9.8.7"]:
        assert patterns.match(host), host
    for host in ["notcorp.example", "corp.example.com", "example", "www.exact.example",
                 "cdn.example", "11.0.0.1", "corp", ""]:
        assert not patterns.match(host), host


def test_the_fields_stay_what_they_were() -> None:
    """names a frozenset, the rest tuples in the order given: plugins (pac) read them, and
    the lookup sets built from them stay out of equality and repr."""
    patterns = HostPatterns.parse(["b.example", ".Office.Example.", ".a.example", "*.x",
                                   "10.0.0.0/8", "::1"])
    assert patterns.names == frozenset({"b.example"})
    assert patterns.domains == ("office.example", "a.example")
    assert patterns.globs == ("*.x",)
    assert patterns.networks == (ipaddress.ip_network("10.0.0.0/8"),
                                 ipaddress.ip_network("::1/128"))
    assert patterns == HostPatterns.parse(["b.example", ".office.example", ".a.example",
                                           "*.x", "10.0.0.0/8", "::1"])
    assert "_domain_set" not in repr(patterns)
    # Built directly, or replaced, the lookup sets follow the fields.
    direct = HostPatterns(frozenset(), ("corp.example",), (),
                          (ipaddress.ip_network("192.0.2.0/24"),))
    assert direct.match("a.corp.example") and direct.match("192.0.2.9")
    replaced = dataclasses.replace(direct, domains=("other.example",))
    assert replaced.match("other.example") and not replaced.match("corp.example")


# -- NetworkSet ----------------------------------------------------------------------------

def _net(text: str) -> Network:
    return ipaddress.ip_network(text)


def _address(text: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    return ipaddress.ip_address(text)


def test_network_set_lengths_zero_and_full() -> None:
    everything4 = NetworkSet([_net("0.0.0.0/0")])
    assert _address("0.0.0.0") in everything4 and _address("255.255.255.255") in everything4
    assert _address("::ffff:1.2.3.4") in everything4  # IPv4-mapped: the IPv4 address
    assert _address("::1") not in everything4
    everything6 = NetworkSet([_net("::/0")])
    assert _address("::") in everything6 and _address("ffff::1") in everything6
    assert _address("1.2.3.4") not in everything6
    assert _address("::ffff:1.2.3.4") not in everything6  # it is 1.2.3.4, an IPv4 address
    one = NetworkSet([_net("192.0.2.7/32"), _net("2001:db8::7/128")])
    assert _address("192.0.2.7") in one and _address("192.0.2.6") not in one
    assert _address("192.0.2.8") not in one
    assert _address("2001:db8::7") in one and _address("2001:db8::6") not in one
    assert _address("2001:db8::7%eth0") in one  # a scope does not count, as in ipaddress


def test_network_set_mixed() -> None:
    networks = NetworkSet.parse(["10.0.0.0/8", "192.0.2.0/24", "192.0.2.128/25", "::1",
                                 "2001:db8::/32", "fe80::/10", "203.0.113.5"])
    inside = ["10.255.0.1", "192.0.2.1", "192.0.2.200", "::1", "2001:db8:ffff::1", "fe80::1",
              "203.0.113.5", "::ffff:10.1.2.3", "::ffff:203.0.113.5"]
    outside = ["11.0.0.1", "192.0.3.1", "::2", "2001:db9::1", "203.0.113.6", "127.0.0.1",
               "::ffff:11.0.0.1", "::a00:1"]  # ::a00:1: 10.0.0.1's number, not mapped
    for text in inside:
        assert _address(text) in networks, text
    for text in outside:
        assert _address(text) not in networks, text
    assert len(networks) == 7 and networks
    assert list(networks)[0] == _net("10.0.0.0/8") and list(networks)[-1] == _net("203.0.113.5/32")


def test_network_set_nested_adjacent_and_at_the_ends() -> None:
    """The ranges a set searches are merged: what nests, touches or reaches the last address
    is still found, and the gaps between are not."""
    networks = NetworkSet.parse(["10.0.0.0/8", "10.1.0.0/16", "10.0.0.5", "11.0.0.0/8",
                                 "13.0.0.0/8", "255.255.255.255", "ffff::/16",
                                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "0.0.0.0"])
    for text in ["10.0.0.0", "10.1.2.3", "10.0.0.5", "11.255.255.255", "13.0.0.0",
                 "255.255.255.255", "0.0.0.0", "ffff::1",
                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]:
        assert _address(text) in networks, text
    for text in ["9.255.255.255", "12.0.0.0", "12.255.255.255", "14.0.0.0", "0.0.0.1",
                 "255.255.255.254", "fffe:ffff::1", "::"]:
        assert _address(text) not in networks, text


def test_network_set_mapped_addresses_are_their_ipv4_address() -> None:
    """As unmapped() says and every caller did before checking: a mapped network, written as
    IPv6, never matches, since every address in it is checked as an IPv4 address."""
    networks = NetworkSet.parse(["::ffff:10.0.0.0/104"])
    assert _address("::ffff:10.1.2.3") not in networks
    assert _address("10.1.2.3") not in networks
    assert unmapped(_address("::ffff:10.1.2.3")) == _address("10.1.2.3")


def test_network_set_empty_and_errors() -> None:
    empty = NetworkSet()
    assert not empty and len(empty) == 0 and list(empty) == []
    assert _address("1.2.3.4") not in empty and _address("::") not in empty
    for bad, message in [("10.0.0.1/8", "'10.0.0.1/8' has host bits set (did you mean "
                                        "10.0.0.0/8?)"),
                         ("a.example", "not an IP address or network: 'a.example'"),
                         ("10.0.0.0/33", "not an IP address or network: '10.0.0.0/33'")]:
        with pytest.raises(ValueError) as caught:
            NetworkSet.parse(["192.0.2.0/24", bad])
        assert str(caught.value) == message
    with pytest.raises(TypeError):
        "10.1.2.3" in NetworkSet.parse(["10.0.0.0/8"])  # noqa: B015
    with pytest.raises(TypeError):
        NetworkSet(["10.0.0.0/8"])  # type: ignore[list-item]


def _networks(version: int) -> st.SearchStrategy[Network]:
    width = 32 if version == 4 else 128
    kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network

    def make(number: int, length: int) -> Network:
        return kind((number >> (width - length) << (width - length), length))

    # Lengths near the ends and a few in between, numbers mostly in one corner so that
    # networks nest and addresses fall in them.
    lengths = st.sampled_from([0, 1, 7, 8, 9, 16, 24, 31, 32] if version == 4 else
                              [0, 1, 32, 48, 64, 96, 104, 127, 128])
    numbers = st.one_of(st.integers(0, 2**width - 1), st.integers(0, 2**12),
                        st.integers(2**width - 2**12, 2**width - 1),
                        st.integers(0, 2**32 - 1).map(lambda n: (0xFFFF << 32) | n)
                        if version == 6 else st.integers(0, 2**32 - 1))
    return st.builds(make, numbers, lengths)


_ADDRESSES = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**12).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.integers(0, 2**12).map(ipaddress.IPv6Address),
    st.integers(0, 2**32 - 1).map(lambda n: ipaddress.IPv6Address((0xFFFF << 32) | n)),
    st.integers(0, 2**12).map(lambda n: ipaddress.IPv6Address((0xFFFF << 32) | n)),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(_networks(4), _networks(6)), max_size=12),
       st.lists(_ADDRESSES, min_size=1, max_size=12))
def test_network_set_answers_as_a_scan_of_unmapped_addresses(
        networks: list[Network], addresses: list[ipaddress.IPv4Address]) -> None:
    found = NetworkSet(networks)
    assert list(found) == networks and len(found) == len(networks)
    for address in addresses:
        expected = any(unmapped(address) in network for network in networks)
        assert (address in found) == expected, (networks, address)

