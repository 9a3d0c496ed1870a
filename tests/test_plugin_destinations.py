"""The ``destinations`` plugin: the SSRF and DNS-rebinding guard around ``resolve``.

End-to-end tests run a real proxy with real clients (curl, raw sockets). Resolver answers may
name any address, but the proxy only ever connects to loopback: every test proxy has an
outermost ``resolve`` wrapper (:class:`LoopbackOnly`) that fails the request before any
connect if an address other than loopback got past the guard, so a broken guard cannot send a
packet off this host. Denied addresses that must be *connectable* (to prove nothing connected)
are loopback ones: 127.0.0.2 with ``allow = 127.0.0.1/32``, IPv4-mapped loopback, 0.0.0.0.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gevent
import gevent.server
import pluggy
import pytest
from geproxy_plugins.destinations import DEFAULT_DENY, Destinations, Policy

from geproxy import DEFAULT_PLUGINS, ConfigError, Context, Resolved, errors, hookimpl
from geproxy.policy import hookspecs
from geproxy.policy.plugins import load
from geproxy.testing import StaticResolver, curl, head_field, wait_for_records

BUILT_IN = any(name == "destinations" for name, _ in DEFAULT_PLUGINS)
PROHIBITED = b"geproxy; error=destination_ip_prohibited"
ALLOW_LOOPBACK = "[destinations]\nallow = 127.0.0.0/8 ::1\n"
#: Only 127.0.0.1 (and ::1) allowed: 127.0.0.2 stays denied and connectable, for twins.
ALLOW_ONE = "[destinations]\nallow = 127.0.0.1/32 ::1\n"
DEFAULTS = "[destinations]\n"


# -- helpers --------------------------------------------------------------------------------


def _safe(ip: Any) -> bool:
    """Whether connecting to ``ip`` stays on this host."""
    try:
        address = ipaddress.ip_address(str(ip).partition("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or str(address) == "0.0.0.0"


class LoopbackOnly:
    """The tests' tripwire, outside the guard: the addresses handed to the core, per call."""

    name = "loopback_only"

    def __init__(self) -> None:
        self.passed: list[list[tuple[Any, ...]]] = []

    @hookimpl(wrapper=True, tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Any:
        addresses = yield
        unsafe = [a for a in addresses or () if not _safe(a[0])]
        if unsafe:
            raise RuntimeError(f"the guard let {unsafe} through: refusing to connect")
        self.passed.append([a[:2] for a in addresses or ()])
        return addresses


class ScriptedResolver(StaticResolver):
    """Answers each name in ``script`` from its list, one answer per call (a rebinding DNS
    server does exactly this); other names as StaticResolver does."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        super().__init__()
        self.script = script

    @hookimpl(tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        if host not in self.script:
            return StaticResolver.resolve(self, ctx, host, port)
        self.queries[host] = self.queries.get(host, 0) + 1
        answer = self.script[host].pop(0)
        return Resolved([(a, port, 0, 0) if ":" in a else (a, port) for a in answer], ttl=0)


def _start(proxy_factory: Callable[..., Any], ini: str,
           resolver: Optional[StaticResolver] = None) -> tuple[Any, LoopbackOnly]:
    tripwire = LoopbackOnly()
    guard = [] if BUILT_IN else [Destinations()]
    proxy = proxy_factory(ini, plugins=[*guard, tripwire], resolver=resolver)
    # pluggy calls the last hookimpl first: the tripwire must be the outermost wrapper.
    impls = proxy.server.pm.hook.resolve.get_hookimpls()
    assert impls[-1].plugin_name == "loopback_only", [i.plugin_name for i in impls]
    assert "destinations" in [i.plugin_name for i in impls]
    return proxy, tripwire


class Listeners:
    """Tiny HTTP servers on one port at several loopback addresses. Each answers any request
    with the address it was reached at, and counts its accepted connections."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.accepted: Counter[str] = Counter()
        socks = _bind_same_port(hosts)
        self.port = socks[0].getsockname()[1]
        self.servers = [gevent.server.StreamServer(sock, self._handle) for sock in socks]
        for server in self.servers:
            server.start()

    def _handle(self, sock: socket.socket, address: Any) -> None:
        host = sock.getsockname()[0]
        self.accepted[host] += 1
        data = b""
        with gevent.Timeout(10, False):
            while b"\r\n\r\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    return
                data += piece
            body = f"served by {host}\n".encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(timeout=1)


def _bind_same_port(hosts: Sequence[str]) -> list[socket.socket]:
    for _ in range(50):  # a port free on the first address may be taken on another
        socks: list[socket.socket] = []
        try:
            for host in hosts:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                socks.append(sock)
                sock.bind((host, socks[0].getsockname()[1] if len(socks) > 1 else 0))
                sock.listen(16)
            return socks
        except OSError:
            for sock in socks:
                sock.close()
    pytest.skip(f"no port free on all of {hosts}")


@pytest.fixture
def listeners() -> Iterator[Callable[..., Listeners]]:
    started: list[Listeners] = []

    def factory(*hosts: str) -> Listeners:
        started.append(Listeners(hosts))
        return started[-1]

    yield factory
    for server in started:
        server.stop()


def _ask(address: tuple[str, int], data: bytes) -> bytes:
    """Send one request; return the whole answer (head and Content-Length body)."""
    sock = socket.create_connection(address, timeout=10)
    try:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                return answer
            answer += piece
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head_field(head, b"content-length") or 0)
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
        return head + b"\r\n\r\n" + body
    finally:
        sock.close()



def _fetch(proxy: Any, url: str, tunnel: bool) -> tuple[str, bytes]:
    """curl through the proxy, plain or (``tunnel``) through CONNECT: the status the proxy
    answered (the CONNECT's, else the response's) and the body."""
    out = curl("-g", *(["-p"] if tunnel else []), "-w", "\n%{http_connect} %{http_code}",
               "-x", proxy.url, url, timeout=30)
    body, _, codes = out.stdout.rpartition(b"\n")
    connect_code, code = codes.decode().split()
    if tunnel and connect_code != "200":
        return connect_code, body
    return code, body


TUNNEL = pytest.mark.parametrize("tunnel", [True, False], ids=["CONNECT", "GET"])


# -- end to end -----------------------------------------------------------------------------


def test_loopback_literals_are_prohibited_by_default(proxy_factory, origin, raw_origin):
    proxy, tripwire = _start(proxy_factory, DEFAULTS)
    server = raw_origin(lambda sock: sock.sendall(b"never"))

    answer = _ask(proxy.address, f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n\r\n".encode())
    # A policy refusal, not an upstream fault: 403, as the ACL's are.
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert head_field(answer, b"proxy-status") == PROHIBITED
    assert answer.endswith(b"\r\n\r\n403 Forbidden\n")  # no host, address or rule
    assert server.accepted == 0

    answer = _ask(proxy.address, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n"
                                 "Host: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert head_field(answer, b"proxy-status") == PROHIBITED
    assert head_field(answer, b"connection") is None  # the client may go on
    assert origin.seen == []

    assert _fetch(proxy, origin.url("/"), tunnel=True)[0] == "403"
    assert _fetch(proxy, origin.url("/"), tunnel=False)[0] == "403"
    assert origin.seen == [] and server.accepted == 0
    assert tripwire.passed == []  # nothing reached the core's connect

    records = wait_for_records(proxy, 4)
    assert [(r.method, r.status, r.error, r.upstream_addr) for r in records] == [
        ("CONNECT", 403, "destination_ip_prohibited", None),
        ("GET", 403, "destination_ip_prohibited", None)] * 2


@TUNNEL
def test_a_name_resolving_to_loopback_is_prohibited(proxy_factory, origin, tunnel, caplog):
    caplog.set_level(logging.INFO)
    proxy, _ = _start(proxy_factory, DEFAULTS)
    proxy.resolver.add("evil.test", "127.0.0.1")
    status, _ = _fetch(proxy, origin.url("/", host="evil.test"), tunnel)
    assert status == "403"
    assert origin.seen == []
    assert proxy.resolver.queries["evil.test"] == 1
    # The reason is in the log once, with the host and the address; the client saw neither.
    lines = [r.getMessage() for r in caplog.records if "evil.test" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "destination_ip_prohibited" in (
        lines[0]), lines
    assert wait_for_records(proxy, 1)[0].error == "destination_ip_prohibited"


@TUNNEL
def test_allow_exempts_loopback(proxy_factory, origin, tunnel):
    proxy, tripwire = _start(proxy_factory, ALLOW_LOOPBACK)
    proxy.resolver.add("evil.test", "127.0.0.1")
    assert _fetch(proxy, origin.url("/", host="evil.test"), tunnel) == ("200", b"hello\n")
    assert _fetch(proxy, origin.url("/"), tunnel) == ("200", b"hello\n")  # literal too
    assert len(origin.seen) == 2
    assert tripwire.passed == [[("127.0.0.1", origin.port)]] * 2


@TUNNEL
def test_ipv6_loopback_is_prohibited_unless_allowed(proxy_factory, listeners, tunnel):
    server = listeners("::1")
    denied, _ = _start(proxy_factory, DEFAULTS)
    allowed, _ = _start(proxy_factory, ALLOW_LOOPBACK)
    for proxy in (denied, allowed):
        proxy.resolver.add("six.test", "::1")
    for url in (f"http://six.test:{server.port}/", f"http://[::1]:{server.port}/"):
        assert _fetch(denied, url, tunnel)[0] == "403"
        assert server.accepted["::1"] == 0
    for url in (f"http://six.test:{server.port}/", f"http://[::1]:{server.port}/"):
        assert _fetch(allowed, url, tunnel) == ("200", b"served by ::1\n")
    assert server.accepted["::1"] == 2


@TUNNEL
@pytest.mark.parametrize("answer, allow, served", [
    (["10.0.0.1", "127.0.0.1"], ALLOW_LOOPBACK, "127.0.0.1"),
    (["127.0.0.2", "127.0.0.1"], ALLOW_ONE, "127.0.0.1"),
    (["::ffff:127.0.0.2", "::1", "169.254.169.254"], ALLOW_ONE, "::1"),
], ids=["private+loopback", "denied+allowed loopback", "mapped+v6+metadata"])
def test_mixed_answers_connect_only_to_allowed_addresses(proxy_factory, listeners, caplog,
                                                         answer, allow, served, tunnel):
    caplog.set_level(logging.INFO, logger="geproxy_plugins.destinations")
    server = listeners("127.0.0.1", "127.0.0.2", "::1")
    proxy, tripwire = _start(proxy_factory, allow)
    proxy.resolver.add("mixed.test", *answer)
    status, body = _fetch(proxy, f"http://mixed.test:{server.port}/", tunnel)
    assert (status, body) == ("200", f"served by {served}\n".encode())
    # The denied loopback twin (127.0.0.2, also behind ::ffff:127.0.0.2) is never connected.
    assert server.accepted == Counter({served: 1})
    assert tripwire.passed == [[(served, server.port)]]
    assert wait_for_records(proxy, 1)[0].upstream_addr == (served, server.port)
    dropped = [r for r in caplog.records if r.name == "geproxy_plugins.destinations"]
    assert len(dropped) == 1 and dropped[0].levelno == logging.INFO
    message = dropped[0].getMessage()
    assert "mixed.test" in message and all(a in message for a in answer if a != served)


LITERALS = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "169.254.169.254", "10.0.0.1",
            "[::1]", "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[64:ff9b::7f00:1]",
            "[2002:7f00:1::]", "[::127.0.0.1]", "[fe80::1]"]


@TUNNEL
@pytest.mark.parametrize("literal", LITERALS)
def test_prohibited_literals_are_never_connected(proxy_factory, listeners, literal, tunnel):
    # 0.0.0.0 and the IPv4-mapped loopback reach these listeners if they are connected to.
    server = listeners("127.0.0.1", "::1")
    proxy, tripwire = _start(proxy_factory, DEFAULTS)
    answer = _ask(proxy.address, (
        f"CONNECT {literal}:{server.port} HTTP/1.1\r\n\r\n" if tunnel else
        f"GET http://{literal}:{server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert head_field(answer, b"proxy-status") == PROHIBITED
    assert sum(server.accepted.values()) == 0
    assert tripwire.passed == []


@TUNNEL
def test_rebinding_is_judged_on_every_resolution(proxy_factory, listeners, tunnel):
    """A name answering an allowed address, then a denied one, and so on: each answer is
    checked, one resolution per request, and the connection goes to the address checked."""
    server = listeners("127.0.0.1", "127.0.0.2")
    resolver = ScriptedResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]] * 3})
    # No pooling, so every plain request resolves again, as a tunnel does.
    proxy, tripwire = _start(proxy_factory, "upstream_keepalive = 0\n" + ALLOW_ONE, resolver)
    answers = [_fetch(proxy, f"http://rebind.test:{server.port}/", tunnel) for _ in range(6)]
    assert [status for status, _ in answers] == ["200", "403"] * 3
    assert answers[0][1] == answers[2][1] == answers[4][1] == b"served by 127.0.0.1\n"
    assert resolver.queries["rebind.test"] == 6  # no second lookup behind the check
    assert server.accepted == Counter({"127.0.0.1": 3})
    assert tripwire.passed == [[("127.0.0.1", server.port)]] * 3


# -- the hook wrapper, without sockets ------------------------------------------------------


def _manager(*plugins: Any) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(Destinations(), name="destinations")
    for plugin in plugins:
        pm.register(plugin)
    return pm


def _resolve(pm: pluggy.PluginManager, host: str = "a.test") -> Any:
    ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 2), config=None)
    return pm.hook.resolve(ctx=ctx, host=host, port=443)


class _Answer:
    """A resolver answering ``answer`` (or raising it), counting its calls."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    def _answer(self) -> Any:
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    @hookimpl
    def resolve(self, ctx: Context, host: str, port: int) -> Any:
        return self._answer()


class _CacheHit(_Answer):
    """Answers first, as a DNS cache's hit does."""

    @hookimpl(tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Any:
        return self._answer()


@pytest.mark.pure
def test_ttl_and_order_are_kept():
    answer = Resolved([("93.184.216.34", 443), ("10.0.0.1", 443),
                       ("2606:2800:220:1::1", 443, 0, 0), ("1.1.1.1", 443)], ttl=42)
    result = _resolve(_manager(_Answer(answer)))
    assert isinstance(result, Resolved) and result.ttl == 42
    assert result == [("93.184.216.34", 443), ("2606:2800:220:1::1", 443, 0, 0),
                      ("1.1.1.1", 443)]
    assert answer[1] == ("10.0.0.1", 443)  # the resolver's own list is left alone
    plain = _resolve(_manager(_Answer([("1.1.1.1", 443)])))
    assert plain == [("1.1.1.1", 443)] and plain.ttl is None


@pytest.mark.pure
def test_a_cache_hit_from_a_tryfirst_implementation_is_judged_too():
    cache = _CacheHit(Resolved([("127.0.0.1", 443)], ttl=30))
    resolver = _Answer([("93.184.216.34", 443)])
    with pytest.raises(errors.DestinationProhibited) as caught:
        _resolve(_manager(resolver, cache), host="cached.test")
    assert (cache.calls, resolver.calls) == (1, 0)
    assert caught.value.status == 403 and caught.value.error == "destination_ip_prohibited"
    assert "cached.test" in caught.value.detail and "127.0.0.1" in caught.value.detail


@pytest.mark.pure
@pytest.mark.parametrize("exc", [errors.DNSError("x", rcode="NXDOMAIN"),
                                 errors.DNSTimeout("y")])
def test_resolver_errors_pass_through_untouched(exc):
    with pytest.raises(type(exc)) as caught:
        _resolve(_manager(_Answer(exc)))
    assert caught.value is exc


@pytest.mark.pure
@pytest.mark.parametrize("answer", [None, []])
def test_no_answer_is_left_to_the_core(answer):
    assert _resolve(_manager(_Answer(answer))) == answer


@pytest.mark.pure
def test_the_detail_lists_a_bounded_number_of_addresses():
    answer = [(f"10.0.0.{i}", 443) for i in range(1, 101)]
    with pytest.raises(errors.DestinationProhibited) as caught:
        _resolve(_manager(_Answer(answer)))
    assert "10.0.0.8 (and 92 more)" in caught.value.detail
    assert "10.0.0.9" not in caught.value.detail


# -- the matching function ------------------------------------------------------------------

DEFAULT = Policy.from_strings(DEFAULT_DENY)

PUBLIC = ["93.184.216.34", "2606:2800:220:1::1", "1.1.1.1", "8.8.8.8", "2001:4860:4860::8888",
          # next to the denied ranges
          "1.0.0.0", "9.255.255.255", "11.0.0.0", "100.63.255.255", "100.128.0.0",
          "126.255.255.255", "128.0.0.0", "169.253.255.255", "169.255.0.0", "172.15.255.255",
          "172.32.0.0", "191.255.255.255", "192.0.1.0", "192.0.3.0", "192.167.255.255",
          "192.169.0.0", "198.17.255.255", "198.20.0.0", "198.51.99.255", "198.51.101.0",
          "203.0.112.255", "203.0.114.0", "223.255.255.255",
          "::2:0:0:0", "100::1:0:0:0:0", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::",
          "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe00::1", "fe7f::1", "2400:cb00::1",
          # IPv4 inside IPv6, when the IPv4 address is public
          "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1", "::93.184.216.34",
          "2001:0:4136:e378:8000:63bf:a247:27dd",  # Teredo client 93.184.216.34 (inverted)
          # zones are ignored
          "2606:2800:220:1::1%eth0"]

DENIED_V4 = [str(a) for net in DEFAULT_DENY if ":" not in net
             for a in (ipaddress.ip_network(net)[0], ipaddress.ip_network(net)[-1])]
DENIED_V6 = [str(a) for net in DEFAULT_DENY if ":" in net
             for a in (ipaddress.ip_network(net)[0], ipaddress.ip_network(net)[-1])]
EMBEDDED = ["::ffff:127.0.0.1", "::ffff:10.1.2.3", "::ffff:169.254.169.254", "::ffff:0.0.0.0",
            "::ffff:192.168.0.1", "::ffff:255.255.255.255",
            "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::10.0.0.1", "64:ff9b::ac10:1",
            "2002:7f00:1::", "2002:a9fe:a9fe:1234::5", "2002:c0a8:101::1", "2002:a00:1::",
            "::127.0.0.1", "::10.0.0.1", "::169.254.169.254", "::0.0.0.2",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo client 127.0.0.1 (inverted)
            "2001:0:4136:e378:8000:63bf:f5ff:fffe"]  # Teredo client 10.0.0.1
NOT_STRICT = ["0177.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "127.000.000.001",
                 "010.0.0.1", "localhost", "example.com", "", " 8.8.8.8", "8.8.8.8 ",
                 "[::1]", "1.2.3.4.5", None, b"8.8.8.8", 134744072]


@pytest.mark.pure
@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are_allowed(ip):
    assert not DEFAULT.prohibited(ip)


@pytest.mark.pure
@pytest.mark.parametrize("ip", DENIED_V4 + DENIED_V6 + ["169.254.169.254", "fd00:ec2::254",
                                                        "100.100.100.200", "::1%lo"])
def test_every_default_range_is_denied_from_first_to_last(ip):
    assert DEFAULT.prohibited(ip)


@pytest.mark.pure
@pytest.mark.parametrize("ip", EMBEDDED)
def test_denied_ipv4_inside_ipv6_is_denied(ip):
    assert DEFAULT.prohibited(ip)


@pytest.mark.pure
@pytest.mark.parametrize("ip", NOT_STRICT, ids=repr)
def test_anything_but_an_address_in_strict_syntax_is_dropped(ip):
    """The connect would read ``0177.0.0.1`` or ``127.1`` as 127.0.0.1 (inet_aton)."""
    assert DEFAULT.prohibited(ip)


@pytest.mark.pure
def test_allow_wins_over_deny_and_covers_the_embedded_forms():
    policy = Policy.from_strings(DEFAULT_DENY, ["127.0.0.0/8", "::1"])
    for ip in ("127.0.0.1", "127.255.255.255", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1",
               "93.184.216.34"):
        assert not policy.prohibited(ip), ip
    for ip in ("10.0.0.1", "::ffff:10.0.0.1", "::2", "0.0.0.0", "169.254.169.254", "fe80::1"):
        assert policy.prohibited(ip), ip
    nat64 = Policy.from_strings(DEFAULT_DENY, ["64:ff9b::/96"])  # an IPv6 allow wins too
    assert not nat64.prohibited("64:ff9b::a00:1") and nat64.prohibited("::ffff:10.0.0.1")


@pytest.mark.pure
def test_added_deny_networks_cover_both_families_and_embedded_forms():
    policy = Policy.from_strings([*DEFAULT_DENY, "93.184.216.0/24", "2606:2800::/32",
                                  "::ffff:8.8.8.0/120"])
    for ip in ("93.184.216.34", "::ffff:93.184.216.34", "64:ff9b::5db8:d822",
               "2606:2800:220:1::1", "::ffff:8.8.8.8"):
        assert policy.prohibited(ip), ip
    assert not policy.prohibited("8.8.8.8")  # the IPv6 entry does not deny the IPv4 form
    empty = Policy.from_strings([])
    assert not empty.prohibited("127.0.0.1") and not empty.prohibited("::ffff:10.0.0.1")
    assert empty.prohibited("127.1")  # still not strict syntax


@pytest.mark.pure
def test_matching_agrees_with_ipaddress_on_overlapping_networks():
    """Overlapping, nested and adjacent networks, merged once: every answer is what a plain
    scan over the networks gives."""
    rng = random.Random(2024)
    deny = ["10.0.0.0/8", "10.1.0.0/16", "10.255.255.255/32", "11.0.0.0/8", "12.0.0.0/7",
            "200.1.2.0/24", "200.1.3.0/24", "2001:db8::/32", "2001:db8:1::/48", "fc00::/7"]
    allow = ["10.1.2.0/24", "12.0.0.0/32", "2001:db8:1:2::/64"]
    policy = Policy.from_strings(deny, allow)
    deny_nets = [ipaddress.ip_network(n) for n in deny]
    allow_nets = [ipaddress.ip_network(n) for n in allow]
    samples: list[Any] = []
    for net in deny_nets + allow_nets:
        first, last = int(net[0]), int(net[-1])
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        top = 2 ** net.max_prefixlen - 1
        for value in (first - 1, first, last, last + 1, rng.randint(first, last)):
            if 0 <= value <= top:
                samples.append(cls(value))
    samples += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(500)]
    for address in samples:
        if address.version == 6 and _has_embedded(address):
            continue  # judged by its IPv4 form as well: covered above
        expected = (not any(address in n for n in allow_nets)
                    and any(address in n for n in deny_nets))
        assert policy.prohibited(str(address)) == expected, address


def _has_embedded(address: ipaddress.IPv6Address) -> bool:
    value = int(address)
    return (value >> 32 in (0, 0xFFFF, int(ipaddress.IPv6Address("64:ff9b::")) >> 32)
            or value >> 112 == 0x2002 or value >> 96 == 0x20010000)


# -- configuration --------------------------------------------------------------------------


def _write(tmp_path: Path, section: str) -> Path:
    plugins = "" if BUILT_IN else "plugins = geproxy_plugins.destinations:Destinations\n"
    path = tmp_path / "geproxy.ini"
    path.write_text(f"[geproxy]\naccess_log = off\n{plugins}[destinations]\n{section}")
    return path


@pytest.mark.parametrize("key, value, message", [
    ("allow", "127.0.0.0/8 10.0.0.0/33", "not an IP network or address: '10.0.0.0/33'"),
    ("allow", "::1, localhost", "not an IP network or address: 'localhost'"),
    ("deny", "10.0.0.1/8", "not an IP network or address: '10.0.0.1/8': host bits set, "
                           "did you mean 10.0.0.0/8?"),
    ("deny", "fe80::/10 fe80::%eth0/64",
     "not an IP network or address: 'fe80::%eth0/64' (no %zone here)"),
])
def test_a_bad_network_stops_the_start_naming_section_and_key(tmp_path, key, value, message):
    path = _write(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), entry_points=False)
    line = path.read_text().splitlines().index(f"{key} = {value}") + 1
    assert str(caught.value) == f"{path}:{line}: [destinations] {key}: {message}"


def test_configuration_is_parsed_once_into_the_policy(tmp_path):
    path = _write(tmp_path, "deny =\n    # replaces the default list\n    93.184.216.0/24\n"
                            "    fd00::/8\nallow = 93.184.216.34\n")
    pm, config = load(str(path), entry_points=False)
    assert config["destinations"]["deny"] == ["93.184.216.0/24", "fd00::/8"]
    policy = pm.get_plugin("destinations").policy
    assert policy.prohibited("93.184.216.35") and policy.prohibited("fd00::1")
    assert not policy.prohibited("93.184.216.34")
    assert not policy.prohibited("127.0.0.1")  # deny replaced the defaults

    pm, _ = load(str(_write(tmp_path, "")), entry_points=False)
    policy = pm.get_plugin("destinations").policy
    assert all(policy.prohibited(ip) for ip in DENIED_V4 + DENIED_V6)
