"""dnscache: hits make no query, TTLs and their clamps, negative caching, serve-stale, one query
for concurrent misses, the bound on entries; against the kit's real DNS server on loopback."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import gevent
import pytest
from geproxy_plugins.dnscache import DNSCache

from geproxy import DEFAULT_PLUGINS, ConfigError, Context, Resolved, errors, hookimpl
from geproxy.net.dns import literal_address
from geproxy.policy.plugins import load
from geproxy.testing import curl

pytestmark = pytest.mark.timeout(15)


class DNSPythonResolver:
    """A small resolver plugin for these tests: one A query to the ``dns_server`` fixture.

    Answers ``Resolved(addresses, ttl=min TTL)`` (a plain list when ``report_ttl`` is off, as
    a resolver that cannot tell the TTL does), raises DNSError with the rcode, or DNSTimeout.
    IP literals and ``localhost`` are left to the system resolver.
    """

    name = "dnspython_resolver"

    def __init__(self, server, timeout=2.0, report_ttl=True):
        self.server = server
        self.timeout = timeout
        self.report_ttl = report_ttl

    @hookimpl
    def resolve(self, ctx, host, port):
        if host == "localhost" or literal_address(host, port) is not None:
            return None
        where, server_port = self.server.address
        query = dns.message.make_query(host, "A")
        try:
            response = dns.query.udp(query, where, timeout=self.timeout, port=server_port)
        except dns.exception.Timeout:
            raise errors.DNSTimeout(f"{host}: no answer in {self.timeout}s") from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            text = dns.rcode.to_text(rcode)
            raise errors.DNSError(f"{host}: {text}", rcode=text)
        addresses, ttls = [], []
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.A:
                ttls.append(rrset.ttl)
                addresses.extend((rdata.address, port) for rdata in rrset)
        if not self.report_ttl:
            return addresses
        return Resolved(addresses, ttl=min(ttls) if ttls else None)


class NoStaticResolver:
    """Takes the place of the kit's StaticResolver (tryfirst, NXDOMAIN for unknown names)."""

    name = "static_resolver"
    queries: dict = {}


def launch(proxy_factory, dns_server, kind, dnscache="", geproxy="", timeout=2.0):
    """A proxy whose names go through dnscache to the DNS server; returns (proxy, plugin).

    ``kind`` is the resolver behind the cache: ``resolver`` (the built-in, asking the DNS
    server), ``dnspython`` (DNSPythonResolver) or ``no_ttl`` (the same, reporting no TTL).
    Built-ins that would answer or refuse instead (the resolver when it is not the one under
    test, the destination guard that refuses loopback) are disabled when they are among the
    defaults."""
    defaults = {name for name, _ in DEFAULT_PLUGINS}
    off = ["destinations"] + ([] if kind == "resolver" else ["resolver"])
    disable = " ".join(name for name in off if name in defaults)
    plugins = []
    ini = f"[geproxy]\ndisable = {disable}\n{geproxy}[dnscache]\n{dnscache}"
    if kind == "resolver":
        if "resolver" not in defaults:
            plugins.append(importlib.import_module("geproxy_plugins.resolver").Resolver())
        ini += (f"[resolver]\nnameservers = {dns_server.nameserver}\nipv6 = off\n"
                f"timeout = {timeout}s\n")
    else:
        plugins.append(DNSPythonResolver(dns_server, timeout, report_ttl=kind != "no_ttl"))
    if "dnscache" not in defaults:
        plugins.append(DNSCache())
    proxy = proxy_factory(ini, plugins=plugins, resolver=NoStaticResolver())
    return proxy, proxy.server.pm.get_plugin("dnscache")


@pytest.fixture(params=["dnspython", "resolver"])
def start(request, proxy_factory, dns_server):
    """``start(dnscache="", geproxy="", timeout=2.0)``: :func:`launch`, once with the test's
    own resolver and once with the built-in ``resolver`` (when it exists)."""
    if request.param == "resolver" and importlib.util.find_spec(
            "geproxy_plugins.resolver") is None:
        pytest.skip("no built-in resolver plugin yet")

    def starter(dnscache="", geproxy="", timeout=2.0):
        return launch(proxy_factory, dns_server, request.param, dnscache, geproxy, timeout)

    return starter


def lookup(proxy, host, port=80):
    ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 2),
                  config=proxy.server.config)
    return proxy.server.hooks.resolve(ctx, host, port)


def lookup_error(proxy, host, kind=errors.DNSError):
    with pytest.raises(kind) as caught:
        lookup(proxy, host)
    return caught.value


def test_a_hit_makes_no_query(start, dns_server, origin):
    dns_server.add("cached.test", "A", "127.0.0.1", ttl=300)
    # No upstream pool: the second request resolves again, and must find the entry.
    proxy, cache = start(geproxy="upstream_keepalive = 0\n")
    url = f"http://cached.test:{origin.port}/"
    for _ in range(2):
        out = curl("-x", proxy.url, url)
        assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    assert len(origin.seen) == 2
    assert dns_server.count("cached.test", "A") == 1
    assert (cache.misses, cache.hits, cache.size) == (1, 1, 1)


def test_a_hit_is_paired_with_the_port_asked_for(start, dns_server):
    dns_server.add("ports.test", "A", "127.0.0.7", "127.0.0.8", ttl=300)
    proxy, _ = start()
    assert lookup(proxy, "ports.test", 443) == [("127.0.0.7", 443), ("127.0.0.8", 443)]
    assert lookup(proxy, "ports.test", 8080) == [("127.0.0.7", 8080), ("127.0.0.8", 8080)]
    assert dns_server.count("ports.test") == 1


def test_expiry_follows_the_record_ttl(start, dns_server, fake_clock):
    dns_server.add("ttl.test", "A", "127.0.0.1", ttl=30)
    proxy, cache = start()
    cache.clock = fake_clock
    lookup(proxy, "ttl.test")
    fake_clock.advance(20)
    ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 2),
                  config=proxy.server.config)
    hit = proxy.server.pm.hook.resolve(ctx=ctx, host="ttl.test", port=80)
    assert hit.ttl == pytest.approx(10)  # what is left of the record's TTL
    assert dns_server.count("ttl.test") == 1
    fake_clock.advance(9.5)
    lookup(proxy, "ttl.test")
    assert dns_server.count("ttl.test") == 1
    # 30 s after the answer, not after the hit at 20 s: a hit is not stored again.
    fake_clock.advance(1)
    dns_server.set("ttl.test", "A", "127.0.0.2", ttl=30)
    assert lookup(proxy, "ttl.test") == [("127.0.0.2", 80)]
    assert dns_server.count("ttl.test") == 2
    assert (cache.misses, cache.hits) == (2, 2)


def test_ttls_are_clamped_to_min_ttl_and_max_ttl(start, dns_server, fake_clock):
    dns_server.add("short.test", "A", "127.0.0.1", ttl=1)
    dns_server.add("long.test", "A", "127.0.0.1", ttl=86400)
    proxy, cache = start("min_ttl = 10s\nmax_ttl = 100s\n")
    cache.clock = fake_clock
    lookup(proxy, "short.test")
    lookup(proxy, "long.test")
    fake_clock.advance(9)
    lookup(proxy, "short.test")
    assert dns_server.count("short.test") == 1  # lives min_ttl, not 1 s
    fake_clock.advance(2)
    lookup(proxy, "short.test")
    assert dns_server.count("short.test") == 2
    fake_clock.advance(88)  # 99 s after the first answer
    lookup(proxy, "long.test")
    assert dns_server.count("long.test") == 1
    fake_clock.advance(2)
    lookup(proxy, "long.test")
    assert dns_server.count("long.test") == 2  # lives max_ttl, not a day


def test_default_ttl_applies_when_the_resolver_gives_no_ttl(proxy_factory, dns_server,
                                                          fake_clock):
    dns_server.add("nottl.test", "A", "127.0.0.1", ttl=3600)
    proxy, cache = launch(proxy_factory, dns_server, "no_ttl", "default_ttl = 20s\n")
    cache.clock = fake_clock
    lookup(proxy, "nottl.test")
    fake_clock.advance(19)
    lookup(proxy, "nottl.test")
    assert dns_server.count("nottl.test") == 1
    fake_clock.advance(2)
    lookup(proxy, "nottl.test")
    assert dns_server.count("nottl.test") == 2  # 20 s, not the record's hour
    # The system resolver (asked only for localhost) reports no TTL either.
    assert lookup(proxy, "localhost")
    misses = cache.misses
    fake_clock.advance(19)
    lookup(proxy, "localhost")
    assert cache.misses == misses
    fake_clock.advance(2)
    lookup(proxy, "localhost")
    assert cache.misses == misses + 1


def test_a_down_server_serves_a_stale_answer(start, dns_server, origin, fake_clock,
                                             caplog):
    dns_server.add("stale.test", "A", "127.0.0.1", ttl=60)
    proxy, cache = start("stale_ttl = 10m\n",
                         geproxy="upstream_keepalive = 0\n", timeout=0.3)
    cache.clock = fake_clock
    url = f"http://stale.test:{origin.port}/"
    assert curl("-x", proxy.url, url).stdout == b"hello\n"
    fake_clock.advance(120)  # expired a minute ago
    dns_server.mute = True
    with caplog.at_level(logging.WARNING, logger="geproxy_plugins.dnscache"):
        out = curl("-x", proxy.url, url)
        assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
        assert curl("-p", "-x", proxy.url, url).stdout == b"hello\n"  # CONNECT too
    assert dns_server.count("stale.test") == 3  # each lookup asked, and got no answer
    assert cache.stale == 2
    assert "serving stale answer for stale.test" in caplog.text
    # Past stale_ttl, the timeout is the answer.
    fake_clock.advance(600)
    out = curl("-i", "-x", proxy.url, url)
    assert out.stdout.startswith(b"HTTP/1.1 504 "), out.stdout
    assert b"error=dns_timeout" in out.stdout
    assert cache.stale == 2


def test_servfail_serves_stale_and_recovery_refreshes(start, dns_server, fake_clock):
    dns_server.add("flaky.test", "A", "127.0.0.1", ttl=60)
    proxy, cache = start()
    cache.clock = fake_clock
    lookup(proxy, "flaky.test")
    fake_clock.advance(61)
    dns_server.fail("flaky.test", "SERVFAIL")
    assert lookup(proxy, "flaky.test") == [("127.0.0.1", 80)]
    assert cache.stale == 1
    dns_server.rcodes.clear()
    dns_server.set("flaky.test", "A", "127.0.0.9", ttl=60)
    assert lookup(proxy, "flaky.test") == [("127.0.0.9", 80)]  # asked again, and stored
    assert lookup(proxy, "flaky.test") == [("127.0.0.9", 80)]
    assert dns_server.count("flaky.test") == 3
    assert cache.stale == 1


def test_nxdomain_is_cached_negatively_and_never_served_stale(start, dns_server,
                                                             fake_clock):
    dns_server.add("gone.test", "A", "127.0.0.1", ttl=60)
    proxy, cache = start("negative_ttl = 30s\n")
    cache.clock = fake_clock
    lookup(proxy, "gone.test")
    fake_clock.advance(61)  # expired, so a stale entry exists
    dns_server.fail("gone.test", "NXDOMAIN")
    assert lookup_error(proxy, "gone.test").rcode == "NXDOMAIN"
    assert cache.stale == 0
    assert dns_server.count("gone.test") == 2
    fake_clock.advance(29)
    error = lookup_error(proxy, "gone.test")  # from the cache: an equivalent error
    assert type(error) is errors.DNSError and error.rcode == "NXDOMAIN"
    assert dns_server.count("gone.test") == 2
    fake_clock.advance(2)
    lookup_error(proxy, "gone.test")
    assert dns_server.count("gone.test") == 3
    assert cache.stale == 0


def test_a_name_left_without_addresses_is_not_served_stale(start, dns_server, fake_clock):
    """NOERROR with no record of the type asked is an answer too (RFC 8767 serves stale only
    when the servers fail or cannot be reached)."""
    dns_server.add("moved.test", "A", "127.0.0.1", ttl=60)
    proxy, cache = start()
    cache.clock = fake_clock
    lookup(proxy, "moved.test")
    fake_clock.advance(61)
    del dns_server.records[("moved.test", "A")]
    dns_server.add("moved.test", "AAAA", "::1")  # the name exists, with no A record
    lookup_error(proxy, "moved.test")
    lookup_error(proxy, "moved.test")
    assert dns_server.count("moved.test", "A") == 2  # the no-data answer is cached
    assert cache.stale == 0


def test_servfail_without_stale_is_cached_but_timeouts_are_not(start, dns_server,
                                                               fake_clock):
    dns_server.fail("broken.test", "SERVFAIL")
    proxy, cache = start("negative_ttl = 30s\n", timeout=0.2)
    cache.clock = fake_clock
    assert lookup_error(proxy, "broken.test").rcode == "SERVFAIL"
    assert lookup_error(proxy, "broken.test").rcode == "SERVFAIL"
    assert dns_server.count("broken.test") == 1
    dns_server.mute = True
    for _ in range(2):
        lookup_error(proxy, "silent.test", errors.DNSTimeout)
    assert dns_server.count("silent.test") == 2
    assert cache.size == 1  # the SERVFAIL only


def test_concurrent_misses_make_one_query(start, dns_server):
    dns_server.add("busy.test", "A", "127.0.0.1", ttl=300)
    dns_server.fail("nope.test", "NXDOMAIN")
    dns_server.delay = 0.2  # every lookup arrives while the first is in flight
    proxy, cache = start()
    found = [gevent.spawn(lookup, proxy, "busy.test", 1000 + i) for i in range(100)]
    missing = [gevent.spawn(lookup, proxy, "nope.test") for _ in range(20)]
    gevent.joinall(found + missing, timeout=10)
    assert [g.value for g in found] == [[("127.0.0.1", 1000 + i)] for i in range(100)]
    assert all(isinstance(g.exception, errors.DNSError) and g.exception.rcode == "NXDOMAIN"
               for g in missing)
    assert dns_server.count("busy.test", "A") == 1
    assert dns_server.count("nope.test", "A") == 1
    assert (cache.misses, cache.hits) == (2, 118)


def test_concurrent_misses_share_a_stale_answer(start, dns_server, fake_clock):
    dns_server.add("shared.test", "A", "127.0.0.1", ttl=60)
    proxy, cache = start(timeout=0.3)
    cache.clock = fake_clock
    lookup(proxy, "shared.test")
    fake_clock.advance(61)
    dns_server.mute = True
    lookups = [gevent.spawn(lookup, proxy, "shared.test", 443) for _ in range(10)]
    gevent.joinall(lookups, timeout=10)
    assert [g.value for g in lookups] == [[("127.0.0.1", 443)]] * 10
    assert dns_server.count("shared.test") == 2
    assert cache.stale == 10


def test_the_cache_never_exceeds_max_entries(start, dns_server):
    names = [f"n{i}.test" for i in range(50)]
    for i, name in enumerate(names):
        dns_server.add(name, "A", f"127.0.1.{i}", ttl=300)
    proxy, cache = start("max_entries = 10\n")
    for name in names:
        lookup(proxy, name)
        assert cache.size <= 10
    assert len(cache) == 10
    assert cache.evictions == 40
    for name in names[-10:]:  # the most recently used are the ones kept
        lookup(proxy, name)
    assert sum(dns_server.count(name) for name in names) == 50
    lookup(proxy, names[0])
    assert dns_server.count(names[0]) == 2
    assert cache.evictions == 41


def test_ip_literals_are_not_cached(start, dns_server):
    proxy, cache = start()
    assert lookup(proxy, "127.0.0.1", 8080) == [("127.0.0.1", 8080)]
    assert lookup(proxy, "::1", 8080) == [("::1", 8080, 0, 0)]
    assert (cache.size, cache.hits, cache.misses) == (0, 0, 0)


def test_other_errors_pass_through_and_release_the_name(start, dns_server,
                                                        fake_clock):
    """A non-DNS error is not an outage: no stale answer, nothing cached, no waiter stuck."""

    class Refuser:
        name = "refuser"
        armed = True

        @hookimpl
        def resolve(self, host):
            if self.armed:
                raise errors.DestinationProhibited(f"{host}: refused")

    dns_server.add("guarded.test", "A", "127.0.0.1", ttl=60)
    refuser = Refuser()
    refuser.armed = False
    proxy, cache = start()
    proxy.server.pm.register(refuser)  # registered last: asked before the resolver
    cache.clock = fake_clock
    lookup(proxy, "guarded.test")
    fake_clock.advance(61)
    refuser.armed = True
    lookup_error(proxy, "guarded.test", errors.DestinationProhibited)
    assert cache.stale == 0
    refuser.armed = False
    assert lookup(proxy, "guarded.test") == [("127.0.0.1", 80)]
    assert dns_server.count("guarded.test") == 2


def test_a_hit_still_passes_the_guards_outside(start, dns_server):
    """A guard (a tryfirst wrapper, outside the cache) sees cached answers too, and its
    refusal reaches the client untouched."""

    class Guard:
        name = "guard"

        @hookimpl(wrapper=True, tryfirst=True)
        def resolve(self, host):
            addresses = yield
            if ("127.0.0.5", 80) in addresses:
                raise errors.DestinationProhibited(f"{host}: refused")
            return addresses

    dns_server.add("inside.test", "A", "127.0.0.5", ttl=300)
    proxy, cache = start()
    proxy.server.pm.register(Guard())
    for _ in range(2):
        lookup_error(proxy, "inside.test", errors.DestinationProhibited)
    assert dns_server.count("inside.test") == 1
    assert (cache.misses, cache.hits, cache.stale) == (1, 1, 0)


def test_min_ttl_above_max_ttl_stops_the_start(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[geproxy]\naccess_log = off\n[dnscache]\nmin_ttl = 2m\nmax_ttl = 60s\n")
    objects = [] if "dnscache" in dict(DEFAULT_PLUGINS) else [DNSCache()]
    with pytest.raises(ConfigError) as caught:
        load(str(path), objects=objects, entry_points=False)
    assert (caught.value.section, caught.value.key) == ("dnscache", "min_ttl")
    assert str(caught.value) == f"{path}:4: [dnscache] min_ttl: must not be above max_ttl (60s)"


def test_a_lookup_only_decided_is_not_counted(start, dns_server):
    """``ctx.decide_only`` (geproxy explain): answered from and into the cache as any
    lookup, but no hit or miss is counted, and ctx.dns_cache says nothing."""
    dns_server.add("dry.test", "A", "127.0.0.1", ttl=300)
    proxy, cache = start()
    for _ in range(2):
        ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 2),
                      config=proxy.server.config, decide_only=True)
        assert proxy.server.hooks.resolve(ctx, "dry.test", 80) == [("127.0.0.1", 80)]
        assert ctx.dns_cache is None and "dnscache" not in ctx.stash
    assert (cache.hits, cache.misses) == (0, 0)
    assert dns_server.count("dry.test") == 1  # the second was a hit, not counted
    lookup(proxy, "dry.test")
    assert (cache.hits, cache.misses) == (1, 0)
