"""The ``resolver`` plugin against a real DNS server on loopback: answers, TTLs, CNAME chains,
failures and their Proxy-Status, timeouts, server fail-over, TCP after truncation, address
family order, IP literals, the system resolver (for ``localhost`` only), and its config.

No test sends a packet beyond loopback: nameservers are the kit's DNSServer, and the system
resolver is only ever asked for ``localhost``.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from geproxy import DEFAULT_PLUGINS, ConfigError, Context, Resolved, errors
from geproxy.policy.plugins import load
from geproxy.testing import DNSServer, StaticResolver, curl, exchange, kit_ini


def _passing() -> StaticResolver:
    """The kit's resolver, passing every name on to the resolver plugin under test."""
    return StaticResolver(fallthrough=True)


#: Once the lead lists the plugin in DEFAULT_PLUGINS, naming it again would register it twice.
BUILT_IN = any(name == "resolver" for name, _ in DEFAULT_PLUGINS)
PLUGIN_LINE = "" if BUILT_IN else "plugins = geproxy_plugins.resolver:Resolver\n"


@pytest.fixture
def more_dns() -> Iterator[Callable[..., DNSServer]]:
    """``more_dns(cls=DNSServer)`` starts another DNS server; all stop at teardown."""
    started: list[DNSServer] = []

    def factory(cls: type = DNSServer) -> DNSServer:
        started.append(cls())
        return started[-1]

    yield factory
    for server in started:
        server.stop()


def _ini(**options: str) -> str:
    lines = "".join(f"{key} = {value}\n" for key, value in options.items())
    return f"[geproxy]\naccess_log = off\n{PLUGIN_LINE}[resolver]\n{lines}"


@pytest.fixture
def resolver(tmp_path: Path) -> Callable[..., Callable[[str, int], Any]]:
    """``resolver(**options)`` loads the plugins as a start does, and returns a function that
    calls the ``resolve`` hook the way the core does (first result wins)."""

    def factory(**options: str) -> Callable[[str, int], Any]:
        path = tmp_path / f"resolver-{len(list(tmp_path.iterdir()))}.ini"
        path.write_text(kit_ini(_ini(**options)))
        pm, config = load(str(path), entry_points=False)
        ctx = Context(client_addr=("127.0.0.1", 40000), server_addr=("127.0.0.1", 3128),
                      config=config)
        return lambda host, port: pm.hook.resolve(ctx=ctx, host=host, port=port)

    return factory


def _get(proxy: Any, host: str, port: int) -> bytes:
    """The head of the proxy's answer to a plain GET for ``http://host:port/``."""
    request = f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    return exchange(proxy.address, request.encode(), until_close=False)


# -- answers ----------------------------------------------------------------------------------


def test_a_name_resolves_and_curl_reaches_the_origin(proxy_factory, dns_server, origin):
    dns_server.add("name.test", "A", "127.0.0.1")
    proxy = proxy_factory(_ini(nameservers=dns_server.nameserver), resolver=_passing())
    out = curl("-x", proxy.url, f"http://name.test:{origin.port}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello\n"
    # Asked once each, as the absolute name: no search domain was appended.
    assert dict(dns_server.queries) == {("name.test", "A"): 1, ("name.test", "AAAA"): 1}


def test_the_ttl_is_the_smallest_of_the_records_used(resolver, dns_server):
    dns_server.add("ttl.test", "A", "127.0.0.1", ttl=300)
    dns_server.add("ttl.test", "A", "127.0.0.2", ttl=200)
    dns_server.add("ttl.test", "AAAA", "::1", ttl=45)
    both = resolver(nameservers=dns_server.nameserver)("ttl.test", 80)
    assert isinstance(both, Resolved)
    assert both == [("127.0.0.1", 80), ("127.0.0.2", 80), ("::1", 80, 0, 0)]
    assert both.ttl == 45
    # Without AAAA, its TTL is not part of the answer.
    ipv4 = resolver(nameservers=dns_server.nameserver, ipv6="off")("ttl.test", 80)
    assert ipv4.ttl == 200


def test_a_cname_chain_is_followed_and_its_ttls_count(resolver, more_dns):
    server = more_dns(DNSServer)
    server.add("alias.test", "CNAME", "middle.test", ttl=100)
    server.add("middle.test", "CNAME", "target.test", ttl=20)
    server.add("target.test", "A", "127.0.0.3", ttl=300)
    server.add("target.test", "AAAA", "::1", ttl=300)
    answer = resolver(nameservers=server.nameserver)("alias.test", 8080)
    assert answer == [("127.0.0.3", 8080), ("::1", 8080, 0, 0)]
    assert answer.ttl == 20
    # One question per type, for the alias only: the chain came inside the answers.
    assert dict(server.queries) == {("alias.test", "A"): 1, ("alias.test", "AAAA"): 1}


def test_a_truncated_udp_answer_is_asked_again_over_tcp(resolver, dns_server):
    dns_server.add("big.test", "A", "127.0.0.1", "127.0.0.2", "127.0.0.3")
    dns_server.truncate = True
    answer = resolver(nameservers=dns_server.nameserver, ipv6="off")("big.test", 443)
    assert answer == [("127.0.0.1", 443), ("127.0.0.2", 443), ("127.0.0.3", 443)]
    assert dns_server.count("big.test", "A") == 2  # UDP, truncated; then TCP


@pytest.mark.parametrize("mode, expected", [
    ("on", [("127.0.0.1", 80), ("::1", 80, 0, 0)]),
    ("prefer", [("::1", 80, 0, 0), ("127.0.0.1", 80)]),
    ("off", [("127.0.0.1", 80)]),
])
def test_ipv6_decides_the_questions_and_the_order(resolver, dns_server, mode, expected):
    dns_server.add("dual.test", "A", "127.0.0.1")
    dns_server.add("dual.test", "AAAA", "::1")
    assert resolver(nameservers=dns_server.nameserver, ipv6=mode)("dual.test", 80) == expected
    assert dns_server.count("dual.test", "AAAA") == (0 if mode == "off" else 1)
    assert dns_server.count("dual.test", "A") == 1


def test_ip_literals_are_answered_without_a_question(proxy_factory, resolver, dns_server,
                                                     origin):
    resolve = resolver(nameservers=dns_server.nameserver)
    v4, v6 = resolve("127.0.0.1", 80), resolve("::1", 80)
    assert (v4, v4.ttl) == ([("127.0.0.1", 80)], None)
    assert (v6, v6.ttl) == ([("::1", 80, 0, 0)], None)
    proxy = proxy_factory(_ini(nameservers=dns_server.nameserver), resolver=_passing())
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    assert not dns_server.queries


# -- failures ---------------------------------------------------------------------------------


def test_nxdomain_answers_502_with_the_rcode_and_logs_it(proxy_factory, dns_server, caplog):
    dns_server.fail("missing.test", "NXDOMAIN")
    proxy = proxy_factory(_ini(nameservers=dns_server.nameserver), resolver=_passing())
    with caplog.at_level(logging.INFO):
        answer = _get(proxy, "missing.test", 80)
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b'\r\nProxy-Status: geproxy; error=dns_error; rcode="NXDOMAIN"\r\n' in answer
    # One line at info for the failure, from the core, naming the name and the rcode.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
             and "missing.test" in r.getMessage()]
    assert len(lines) == 1 and "NXDOMAIN" in lines[0], lines


def test_nxdomain_is_final(resolver, dns_server, more_dns):
    second = more_dns()
    second.add("missing.test", "A", "127.0.0.1")
    dns_server.fail("missing.test", "NXDOMAIN")
    resolve = resolver(nameservers=f"{dns_server.nameserver} {second.nameserver}")
    with pytest.raises(errors.DNSError) as caught:
        resolve("missing.test", 80)
    assert caught.value.rcode == "NXDOMAIN"
    assert not second.queries


def test_a_name_without_addresses_is_a_dns_error(resolver, dns_server):
    dns_server.add("mail.test", "MX", "10 mx.test.")
    with pytest.raises(errors.DNSError) as caught:
        resolver(nameservers=dns_server.nameserver)("mail.test", 80)
    assert caught.value.rcode == "NOERROR"
    assert (caught.value.status, caught.value.error) == (502, "dns_error")


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED"])
def test_a_failing_server_lets_the_next_one_answer(resolver, dns_server, more_dns, rcode):
    second = more_dns()
    second.add("name.test", "A", "127.0.0.1")
    dns_server.fail("name.test", rcode)
    answer = resolver(nameservers=f"{dns_server.nameserver} {second.nameserver}",
                      ipv6="off")("name.test", 80)
    assert answer == [("127.0.0.1", 80)]
    assert dns_server.count("name.test", "A") == 1 and second.count("name.test", "A") == 1


def test_servfail_from_every_server_answers_502_servfail(proxy_factory, dns_server, more_dns):
    second = more_dns()
    dns_server.fail("broken.test", "SERVFAIL")
    second.fail("broken.test", "SERVFAIL")
    proxy = proxy_factory(_ini(nameservers=f"{dns_server.nameserver} {second.nameserver}"),
                          resolver=_passing())
    answer = _get(proxy, "broken.test", 80)
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b'\r\nProxy-Status: geproxy; error=dns_error; rcode="SERVFAIL"\r\n' in answer
    assert second.count("broken.test") == 2  # A and AAAA each reached the second server


def test_a_mute_server_answers_504_dns_timeout(proxy_factory, dns_server):
    dns_server.add("slow.test", "A", "127.0.0.1")
    dns_server.mute = True
    proxy = proxy_factory(_ini(nameservers=dns_server.nameserver, timeout="300ms"),
                          resolver=_passing())
    answer = _get(proxy, "slow.test", 80)
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    assert b"\r\nProxy-Status: geproxy; error=dns_timeout\r\n" in answer
    assert dns_server.count("slow.test", "A") == 1  # the question went out, unanswered


def test_a_mute_first_server_leaves_time_for_the_second(resolver, dns_server, more_dns):
    dns_server.mute = True
    second = more_dns()
    second.add("name.test", "A", "127.0.0.1")
    second.add("name.test", "AAAA", "::1")
    resolve = resolver(nameservers=f"{dns_server.nameserver} {second.nameserver}",
                       timeout="1s")
    assert resolve("name.test", 80) == [("127.0.0.1", 80), ("::1", 80, 0, 0)]
    assert dns_server.count("name.test") == 2 and second.count("name.test") == 2


def _closed_udp_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_a_closed_port_hands_over_to_the_next_server(resolver, dns_server):
    dns_server.add("name.test", "A", "127.0.0.1")
    closed = _closed_udp_port()
    resolve = resolver(nameservers=f"127.0.0.1:{closed} {dns_server.nameserver}", ipv6="off")
    assert resolve("name.test", 80) == [("127.0.0.1", 80)]


def test_only_closed_ports_is_a_dns_error_not_a_timeout(resolver):
    resolve = resolver(nameservers=f"127.0.0.1:{_closed_udp_port()}", timeout="10s")
    with pytest.raises(errors.DNSError) as caught:  # the refusal ends the wait at once
        resolve("name.test", 80)
    assert caught.value.rcode is None


# -- the system resolver ----------------------------------------------------------------------


def test_the_system_resolver_answers_localhost_without_a_ttl(resolver):
    answer = resolver(nameservers="system")("localhost", 8080)
    assert isinstance(answer, Resolved) and answer.ttl is None
    assert ("127.0.0.1", 8080) in answer
    families = [len(address) for address in answer]
    assert families == sorted(families), "IPv4 addresses come first"


def test_the_system_resolver_leaves_ipv6_out_when_off(resolver):
    answer = resolver(nameservers="system", ipv6="off")("localhost", 80)
    assert answer and all(len(address) == 2 for address in answer), answer


# -- configuration ----------------------------------------------------------------------------


def test_nameservers_in_every_form_are_accepted(tmp_path):
    path = tmp_path / "good.ini"
    path.write_text(_ini(nameservers="192.0.2.1 192.0.2.2:5353, [2001:db8::53]\n"
                         "  [2001:db8::54]:5300", ipv6="Prefer"))
    pm, _ = load(str(path), entry_points=False)
    plugin = pm.get_plugin("resolver")
    assert plugin._servers == [("192.0.2.1", 53), ("192.0.2.2", 5353),
                               ("2001:db8::53", 53), ("2001:db8::54", 5300)]
    assert plugin._ipv6 == "prefer"


@pytest.mark.parametrize("value, item", [
    ("192.0.2.1 dns.example", "dns.example"),
    ("2001:db8::53", "2001:db8::53"),
    ("[2001:db8::53", "[2001:db8::53"),
    ("[192.0.2.1]:53", "[192.0.2.1]:53"),
    ("192.0.2.1:0", "192.0.2.1:0"),
    ("192.0.2.1:65536", "192.0.2.1:65536"),
    ("192.0.2.1:dns", "192.0.2.1:dns"),
    ("system 192.0.2.1", "system"),
])
def test_a_bad_nameserver_is_named_in_the_error(tmp_path, value, item):
    path = tmp_path / "bad.ini"
    path.write_text(_ini(nameservers=value))
    with pytest.raises(ConfigError) as caught:
        load(str(path), entry_points=False)
    line = path.read_text().splitlines().index(f"nameservers = {value}") + 1
    assert str(caught.value).startswith(
        f"{path}:{line}: [resolver] nameservers: not a nameserver: {item!r}"), str(caught.value)


@pytest.mark.parametrize("key, value, message", [
    ("nameservers", "", "give nameserver addresses, or system"),
    ("ipv6", "maybe", "not on, off or prefer: 'maybe'"),
    ("timeout", "3 seconds", "not a duration"),
])
def test_other_bad_values_are_named_in_the_error(tmp_path, key, value, message):
    path = tmp_path / "bad.ini"
    path.write_text(_ini(**{key: value}))
    with pytest.raises(ConfigError) as caught:
        load(str(path), entry_points=False)
    line = path.read_text().splitlines().index(f"{key} = {value}") + 1
    assert str(caught.value).startswith(f"{path}:{line}: [resolver] {key}: {message}"), (
        str(caught.value))
