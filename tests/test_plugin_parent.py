"""The ``parent`` plugin: parent proxies, direct/parent rules, failover, configuration errors.

End-to-end cases go through a real parent on loopback: Debian's tinyproxy, started by the test
in the foreground with a generated configuration, or a second geproxy when the test must see
what reaches the parent (tinyproxy cannot tell). Parsing and the rule walk are also checked by
calling the plugin directly.
"""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gevent
import pytest
from geproxy_plugins.parent import Parent, parse_parent, parse_rules, redacted

from geproxy import (
    DEFAULT_PLUGINS,
    ConfigError,
    Context,
    Headers,
    HostPatterns,
    Request,
    Route,
    RouteRule,
    hookimpl,
)
from geproxy.policy.plugins import load
from geproxy.testing import (
    Proxy,
    StaticResolver,
    curl,
    exchange,
    free_port,
    require_tool,
    wait_for_records,
)

PARENT_IS_BUILTIN = any(name == "parent" for name, _ in DEFAULT_PLUGINS)


def _plugins(*others: Any) -> list[Any]:
    """Parent() and ``others``; once it is a built-in, the built-in reads [parents]."""
    return [*others] if PARENT_IS_BUILTIN else [Parent(), *others]


def _parent_plugin(proxy: Proxy) -> Parent:
    plugin = proxy.server.pm.get_plugin("parent")
    assert isinstance(plugin, Parent)
    return plugin


def _ini(parents: str = "", rules: Optional[str] = None, **options: str) -> str:
    text = f"[parents]\nparents = {parents}\n"
    if rules is not None:
        text += "rules =\n" + textwrap.indent(textwrap.dedent(rules).strip(), "    ") + "\n"
    return text + "".join(f"{key} = {value}\n" for key, value in options.items())


def _child(proxy_factory: Callable[..., Proxy], parents: str, rules: Optional[str] = None,
           plugins: tuple[Any, ...] = (), core: str = "", **options: str) -> Proxy:
    """A proxy whose [parents] are ``parents``; ``core`` goes in its [geproxy] section."""
    resolver = StaticResolver({"origin.test": ["127.0.0.1"], "direct.test": ["127.0.0.1"],
                               "a.direct.test": ["127.0.0.1"]})
    return proxy_factory(f"[geproxy]\n{core}" + _ini(parents, rules, **options),
                         plugins=_plugins(*plugins), resolver=resolver)



def _connect(proxy: Proxy, authority: str) -> bytes:
    return exchange(proxy.address, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
                    .encode(), until_close=False)


# -- a real parent: tinyproxy ---------------------------------------------------------------


@dataclass
class Tinyproxy:
    process: subprocess.Popen
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    """``tinyproxy(auth=None)`` runs tinyproxy in the foreground on a free loopback port,
    every CONNECT port allowed, ``auth`` (user, password) required when given."""
    binary = require_tool("tinyproxy")
    started: list[Tinyproxy] = []

    def start(auth: Optional[tuple[str, str]] = None) -> Tinyproxy:
        port = free_port()
        conf = tmp_path / f"tinyproxy-{len(started)}.conf"
        lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 30", "MaxClients 50",
                 "LogLevel Critical", "Allow 127.0.0.1"]  # no ConnectPort: every port
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf.write_text("\n".join(lines) + "\n")
        log_file = open(tmp_path / f"tinyproxy-{len(started)}.log", "wb")
        try:
            process = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log_file.close()
        server = Tinyproxy(process, port)
        started.append(server)
        deadline = time.monotonic() + 10
        while True:  # bounded: until its port accepts
            assert process.poll() is None, f"tinyproxy exited with {process.returncode}"
            try:
                socket.create_connection(server.address, timeout=1).close()
                return server
            except OSError:
                assert time.monotonic() < deadline, "tinyproxy did not listen in time"
                gevent.sleep(0.02)

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


# -- no parents: nothing happens ------------------------------------------------------------


def _request(host: str, port: int = 443, method: str = "CONNECT") -> Request:
    target = f"{host}:{port}" if method == "CONNECT" else f"http://{host}:{port}/"
    return Request(method, target, "HTTP/1.1", Headers(frozen=True), "http", host, port, "/")


def _ctx() -> Context:
    return Context(client_addr=("127.0.0.1", 40000), server_addr=("127.0.0.1", 3128),
                   config=None)


@pytest.mark.pure
def test_without_parents_every_request_is_direct():
    plugin = Parent()  # never configured: the defaults
    assert plugin.route(_ctx(), _request("example.com")) is None


def test_the_default_configuration_routes_nothing(proxy_factory, origin):
    proxy = proxy_factory(plugins=_plugins())
    assert _parent_plugin(proxy).parents == ()
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    assert wait_for_records(proxy, 1)[0].upstream_addr == ("127.0.0.1", origin.port)


# -- through tinyproxy ----------------------------------------------------------------------


def test_connect_and_plain_requests_go_through_tinyproxy(proxy_factory, tinyproxy, origin,
                                                         tls_origin, ca_file):
    parent = tinyproxy()
    child = _child(proxy_factory, f"http://127.0.0.1:{parent.port}")
    out = curl("-p", "-x", child.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    out = curl("--cacert", ca_file, "-x", child.url, tls_origin.url("/echo"))
    assert b'"path": "/echo"' in out.stdout, out.stderr
    out = curl("-x", child.url, origin.url("/echo"))
    assert b'"path": "/echo"' in out.stdout, out.stderr
    assert "tinyproxy" in origin.seen[-1].headers.get("via", "")
    records = wait_for_records(child, 3)
    assert [r.upstream_addr for r in records] == [parent.address] * 3
    assert [r.status for r in records] == [200, 200, 200]


def test_credentials_for_the_parent(proxy_factory, tinyproxy, origin):
    """user:password from the URL, percent-decoded, are what the parent checks; wrong
    ones fail, and the parent, which answered, is not marked down."""
    parent = tinyproxy(auth=("egress", "s3cr-et"))  # tinyproxy takes [-._a-zA-Z0-9] only
    good = _child(proxy_factory, f"http://egress:s3cr%2Det@127.0.0.1:{parent.port}")
    out = curl("-p", "-x", good.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    out = curl("-x", good.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr

    bad = _child(proxy_factory, f"http://egress:wrong@127.0.0.1:{parent.port}")
    answer = _connect(bad, f"127.0.0.1:{origin.port}")
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b"Proxy-Status: geproxy; error=connection_refused\r\n" in answer
    assert not _parent_plugin(bad).down
    out = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", bad.url, origin.url("/"))
    # A plain request gets the parent's own refusal, relayed (tinyproxy: 401 or 407).
    assert out.stdout in (b"401", b"407"), out.stderr
    assert not _parent_plugin(bad).down


def test_rules_send_some_targets_direct(proxy_factory, tinyproxy, origin):
    """``direct .direct.test`` goes straight to the origin; ``parent all`` takes the rest,
    IP literals included (tinyproxy resolves no test names: the routed target is one)."""
    parent = tinyproxy()
    child = _child(proxy_factory, f"http://127.0.0.1:{parent.port}",
                   rules="direct .direct.test\nparent all")
    for url in (origin.url("/", host="a.direct.test"), origin.url("/")):
        out = curl("-x", child.url, url)
        assert out.stdout == b"hello\n", out.stderr
        out = curl("-p", "-x", child.url, url)
        assert out.stdout == b"hello\n", out.stderr
    records = wait_for_records(child, 4)
    origin_addr = ("127.0.0.1", origin.port)
    assert [r.upstream_addr for r in records] == [origin_addr] * 2 + [parent.address] * 2


def test_failover_to_the_next_parent_and_back(proxy_factory, tinyproxy, origin,
                                              fake_clock, caplog):
    """A parent that refuses is marked down and the next one is used; it is left out for
    retry_after, then tried again, and is up again once a connection through it works."""
    caplog.set_level(logging.INFO, logger="geproxy_plugins.parent")
    first_port = free_port()  # nothing listens here yet
    parent = tinyproxy()
    failed: list[tuple[int, str]] = []

    class Failures:
        @hookimpl
        def route_failed(self, ctx, request, route, error):
            failed.append((route.port, error.error))

    child = _child(proxy_factory,
                   f"http://127.0.0.1:{first_port} http://127.0.0.1:{parent.port}",
                   plugins=(Failures(),), retry_after="30s")
    plugin = _parent_plugin(child)
    plugin.clock = fake_clock
    for flag in ("-p", "", "-p"):
        out = curl(*([flag] if flag else []), "-x", child.url, origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    assert failed == [(first_port, "connection_refused")]  # then left out
    assert [p.port for p in plugin.down] == [first_port]

    fake_clock.advance(30)  # tried again, and down again
    out = curl("-x", child.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    assert failed == [(first_port, "connection_refused")] * 2
    assert wait_for_records(child, 4)[-1].upstream_addr == parent.address

    # The first parent comes back: after retry_after, requests go to it again.
    back = proxy_factory(f"listen = 127.0.0.1:{first_port}\nvia = first-parent\n")
    fake_clock.advance(30)
    out = curl("-p", "-x", child.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    assert wait_for_records(child, 5)[-1].upstream_addr == back.address
    assert not plugin.down
    assert len(failed) == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "geproxy_plugins.parent"]
    assert [m.split("] ", 1)[1].split(",")[0] for m in messages] == [
        f"parent proxy 127.0.0.1:{first_port} is down",
        f"parent proxy 127.0.0.1:{first_port} is still down",
        f"parent proxy 127.0.0.1:{first_port} is up again",
    ]
    assert [r.levelname for r in caplog.records if r.name == "geproxy_plugins.parent"] == [
        "WARNING", "INFO", "INFO"]


def test_a_parent_that_times_out_is_marked_down(proxy_factory, tinyproxy, origin, blackhole):
    parent = tinyproxy()
    child = _child(proxy_factory,
                   f"http://127.0.0.1:{blackhole} http://127.0.0.1:{parent.port}",
                   core="connect_timeout = 250ms\n")
    out = curl("-p", "-x", child.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    assert [p.port for p in _parent_plugin(child).down] == [blackhole]
    assert wait_for_records(child, 1)[0].upstream_addr == parent.address


def test_every_parent_down_answers_502(proxy_factory, fake_clock):
    """Never direct: when every parent failed, and while all are down, the client gets 502
    connection_refused; nothing is sent direct."""
    dead = [free_port(), free_port()]
    child = _child(proxy_factory, " ".join(f"http://127.0.0.1:{p}" for p in dead))
    plugin = _parent_plugin(child)
    plugin.clock = fake_clock
    target = f"127.0.0.1:{free_port()}"
    for _ in range(2):  # both tried and failed; then both left out
        answer = _connect(child, target)
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        assert b"Proxy-Status: geproxy; error=connection_refused\r\n" in answer
        out = curl("-s", "-i", "-x", child.url, f"http://{target}/")
        assert out.stdout.startswith(b"HTTP/1.1 502 "), out.stdout
        assert b"Proxy-Status: geproxy; error=connection_refused\r\n" in out.stdout
    assert sorted(p.port for p in plugin.down) == sorted(dead)
    assert plugin.up() == []


# -- what reaches the parent (a geproxy as parent shows it) -----------------------------------


def _watched_parent(proxy_factory: Callable[..., Proxy], ini: str = "") -> tuple[Proxy, list]:
    seen: list[tuple[str, str, Optional[str]]] = []

    class Watch:
        @hookimpl
        def on_request(self, ctx, request):
            seen.append((request.method, request.target,
                         request.headers.get("proxy-authorization")))

    resolver = StaticResolver({"origin.test": ["127.0.0.1"], "blocked.test": ["127.0.0.1"]})
    parent = proxy_factory("via = parent-proxy\n" + ini, plugins=[Watch()], resolver=resolver)
    return parent, seen


def test_the_clients_credentials_never_reach_the_parent(proxy_factory, origin):
    parent, seen = _watched_parent(proxy_factory)
    child = _child(proxy_factory, f"http://e%40corp:p%40ss%3Aw0rd@127.0.0.1:{parent.port}")
    for flag in ("-p", ""):
        out = curl(*([flag] if flag else []), "-U", "client:secret", "-x", child.url,
                   origin.url("/echo", host="origin.test"))
        assert b'"path": "/echo"' in out.stdout, out.stderr
        assert b"proxy-authorization" not in out.stdout
    credentials = "Basic " + base64.b64encode(b"e@corp:p@ss:w0rd").decode()
    assert seen == [
        ("CONNECT", f"origin.test:{origin.port}", credentials),
        ("GET", origin.url("/echo", host="origin.test"), credentials),
    ]


def test_a_parent_that_answers_no_stays_up(proxy_factory, origin):
    """A parent that denies one CONNECT (403) is alive: the request fails (502), the parent
    is not marked down, and the next request goes through it."""
    acl = "[acl]\nconnect_ports = 1-65535\nrules =\n    deny dst .blocked.test\n    allow all\n"
    parent, seen = _watched_parent(proxy_factory, acl)
    child = _child(proxy_factory, f"http://127.0.0.1:{parent.port}")
    answer = _connect(child, f"blocked.test:{origin.port}")
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert not _parent_plugin(child).down
    out = curl("-p", "-x", child.url, origin.url("/", host="origin.test"))
    assert out.stdout == b"hello\n", out.stderr
    assert [method for method, _, _ in seen] == ["CONNECT", "CONNECT"]


def test_an_ipv6_parent(proxy_factory, origin):
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    finally:
        probe.close()
    parent = proxy_factory("listen = [::1]:0\nvia = parent-proxy\n")
    child = _child(proxy_factory, f"http://[::1]:{parent.port}")
    out = curl("-p", "-x", child.url, origin.url("/"))
    assert out.stdout == b"hello\n", out.stderr
    assert wait_for_records(child, 1)[0].upstream_addr == ("::1", parent.port)


# -- the rule walk and parsing, without sockets ----------------------------------------------


def _configured(parents: str, rules: Optional[str] = None) -> Parent:
    plugin = Parent()
    plugin.parents = tuple(parse_parent(p) for p in parents.split())
    plugin.rules = parse_rules((rules or "").splitlines())
    return plugin


@pytest.mark.pure
@pytest.mark.parametrize("rules, host, via_parent", [
    (None, "example.com", True),
    (None, "10.1.2.3", True),
    ("parent *", "example.com", True),
    ("parent *", "192.0.2.1", False),  # * is names only
    ("parent all", "192.0.2.1", True),
    ("parent * 0.0.0.0/0 ::/0", "2001:db8::1", True),
    ("direct .internal.example 10.0.0.0/8\nparent all", "a.internal.example", False),
    ("direct .internal.example 10.0.0.0/8\nparent all", "internal.example", False),
    ("direct .internal.example 10.0.0.0/8\nparent all", "10.9.8.7", False),
    ("direct .internal.example 10.0.0.0/8\nparent all", "example.com", True),
    ("parent .partner.example", "example.com", False),  # no match: direct
    ("parent .partner.example", "api.partner.example", True),
    ("direct all\nparent all", "example.com", False),  # first match wins
])
def test_rules(rules, host, via_parent):
    plugin = _configured("http://p1.example:3128 http://p2.example:3128", rules)
    routes = plugin.route(_ctx(), _request(host))
    if via_parent:
        assert routes == [Route("p1.example", 3128), Route("p2.example", 3128)]
    else:
        assert routes is None


@pytest.mark.pure
def test_down_parents_are_left_out_until_retry_after(fake_clock):
    from geproxy import errors

    plugin = _configured("http://p1.example:3128 http://p2.example:3128")
    plugin.clock = fake_clock
    first, second = plugin.parents
    ctx, request = _ctx(), _request("example.com")
    assert plugin.route(ctx, request) == [first, second]
    plugin.route_failed(ctx, request, first, errors.ConnectTimeout("p1: no answer"))
    plugin.route_failed(ctx, request, Route("other.example", 1), errors.ConnectRefused("x"))
    assert plugin.route(ctx, request) == [second]
    fake_clock.advance(29.9)
    assert plugin.route(ctx, request) == [second]
    fake_clock.advance(0.1)
    assert plugin.route(ctx, request) == [first, second]  # its turn again, first in order
    refused = errors.ParentRefused("parent p2.example answered CONNECT with 407",
                                   parent_status=407)
    plugin.route_failed(ctx, request, second, refused)
    assert list(plugin.down) == [first]


@pytest.mark.pure
@pytest.mark.parametrize("url, route", [
    ("http://127.0.0.1:3128", Route("127.0.0.1", 3128)),
    ("http://Proxy.Example.:8080/", Route("proxy.example", 8080)),
    ("HTTP://[2001:DB8::5]:3128", Route("2001:db8::5", 3128)),
    ("http://egress:s3cret@p.example:3128", Route("p.example", 3128, "egress", "s3cret")),
    ("http://e%40corp:p%40ss%3Aw%2C0rd%20@p.example:1", Route("p.example", 1, "e@corp",
                                                              "p@ss:w,0rd ")),
    ("http://egress@p.example:1", Route("p.example", 1, "egress", "")),
    ("http://us%C3%A9r:x@[::1]:65535", Route("::1", 65535, "usér", "x")),
])
def test_parent_urls(url, route):
    assert parse_parent(url) == route


@pytest.mark.pure
def test_passwords_are_not_shown():
    assert redacted("http://egress:s3cret@p.example:3128") == "http://egress:***@p.example:3128"
    assert redacted("http://p.example:3128") == "http://p.example:3128"
    plugin = _configured("http://egress:s3cret@p1.example:3128 http://[::1]:3128")
    ctx = _ctx()
    plugin.route(ctx, _request("example.com"))
    assert str(ctx.stash["parent"]) == "parents offered: p1.example:3128, [::1]:3128"


# -- configuration errors --------------------------------------------------------------------


def _load(tmp_path: Path, ini: str) -> Any:
    path = tmp_path / "geproxy.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n" + ini)
    return load(str(path), objects=_plugins(), entry_points=False)


@pytest.mark.parametrize("value, problem", [
    ("https://p.example:3128", "https:// parents are not supported"),
    ("socks5://p.example:1080", "socks5:// parents are not supported"),
    ("p.example:3128", "not a URL"),
    ("http://p.example", "the port is missing"),
    ("http://p.example:0", "not a port"),
    ("http://p.example:http", "not a port"),
    ("http://p.example:3128/proxy", "no path"),
    ("http://::1:3128", "IPv6 addresses go in brackets"),
    ("http://[::1]", "the port is missing"),
    ("http://[nothing]:3128", "not an IPv6 address"),
    ("http://p_ex!ample:3128", "not a host name"),
    ("http://1.2.3:3128", "not an IPv4 address"),
    ("http://a%3Ab:c@p.example:3128", "cannot contain ':'"),
    ("http://x:%FF@p.example:3128", "not UTF-8"),
    ("http://p.example:3128 http://p.example:3128", "given twice"),
])
def test_bad_parents_stop_the_start(tmp_path, value, problem):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[parents]\nparents = {value}\n")
    assert (info.value.section, info.value.key) == ("parents", "parents")
    assert problem in str(info.value)
    assert "[parents] parents: " in str(info.value)


def test_a_bad_parent_url_does_not_show_its_password(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "[parents]\nparents = https://egress:s3cret@p.example:3128\n")
    assert "s3cret" not in str(info.value) and "egress:***@" in str(info.value)


@pytest.mark.parametrize("rules, problem", [
    ("via .example.com", "line 1: a rule starts with direct or parent: 'via .example.com'"),
    ("parent all\nproxy all", "line 2: a rule starts with direct or parent"),
    ("direct", "nothing to match"),
    ("direct all .example.com", "all stands alone"),
    ("direct 10.1.2.3/8", "host bits set"),
    ("direct exa$mple.com", "not a host name"),
])
def test_bad_rules_stop_the_start(tmp_path, rules, problem):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _ini("http://127.0.0.1:3128", rules))
    assert (info.value.section, info.value.key) == ("parents", "rules")
    assert problem in str(info.value)


def test_a_parent_rule_needs_parents(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _ini("", "direct .corp.example\nparent all"))
    assert (info.value.section, info.value.key) == ("parents", "rules")
    assert "parents is empty" in str(info.value)


def test_rules_that_never_use_the_parents_are_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="geproxy_plugins.parent")
    _load(tmp_path, _ini("http://127.0.0.1:3128", "direct .corp.example"))
    assert any("the parents are never used" in r.getMessage() for r in caplog.records)


def test_retry_after_is_a_duration(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "[parents]\nretry_after = soon\n")
    assert (info.value.section, info.value.key) == ("parents", "retry_after")


@pytest.mark.pure
def test_the_rule_grammar_is_public():
    """geproxy.RouteRule is what the [parents] rules are made of."""
    rule = RouteRule.parse("direct .corp.example, 10.0.0.0/8")
    assert rule == RouteRule(False, HostPatterns.parse([".corp.example", "10.0.0.0/8"]),
                             "direct .corp.example, 10.0.0.0/8")
    assert rule.matches("a.corp.example") and rule.matches("10.1.2.3")
    assert not rule.matches("example.com")
    everything = RouteRule.parse("parent all")
    assert everything.via_parent and everything.patterns is None
    assert everything.matches("example.com") and everything.matches("192.0.2.1")
    assert parse_rules(["direct .a.example", "parent all"]) == RouteRule.parse_lines(
        ["direct .a.example", "", "parent all"])
    with pytest.raises(ValueError, match=r"^line 3: a rule starts with direct or parent: "
                                         r"'via all'$"):
        RouteRule.parse_lines(["direct .a.example", "", "via all"])
