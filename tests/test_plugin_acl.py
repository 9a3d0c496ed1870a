"""The ``acl`` plugin: connect_ports, ordered rules, connect-time decisions, report mode.

End-to-end cases run a real proxy on loopback (the client is always 127.0.0.1); matching of
other client addresses is checked by calling the plugin's hooks with a Context, as the
connection handler does.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any, Optional

import gevent
import pytest
from geproxy_plugins.acl import ACL

from geproxy import DEFAULT_PLUGINS, ConfigError, Context, Denied, Headers, Request, hookimpl
from geproxy.policy.plugins import load
from geproxy.testing import StaticResolver, curl, exchange, wait_for_records

NAMES = ("origin.test", "other.test", "exact.test", "sub.exact.test", "example.test",
         "a.b.example.test", "notexample.test", "web-1.glob.test", "web.glob.test")

ACL_IS_BUILTIN = any(name == "acl" for name, _ in DEFAULT_PLUGINS)


def _plugins(*others: Any) -> list[Any]:
    """ACL() and ``others``; once ACL is a built-in, the built-in reads the [acl] section."""
    return [*others] if ACL_IS_BUILTIN else [ACL(), *others]


def _ini(rules: Optional[str] = None, **options: str) -> str:
    text = "[acl]\n"
    if rules is not None:
        text += "rules =\n" + textwrap.indent(textwrap.dedent(rules).strip(), "    ") + "\n"
    return text + "".join(f"{key} = {value}\n" for key, value in options.items())


def _start(proxy_factory, rules: Optional[str] = None, plugins: tuple[Any, ...] = (),
           **options: str):
    resolver = StaticResolver({name: ["127.0.0.1"] for name in NAMES})
    return proxy_factory(_ini(rules, **options), plugins=_plugins(*plugins), resolver=resolver)


def _ask(proxy, method: str, target: str, *fields: str) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += "".join(f"{field}\r\n" for field in fields)
    return exchange(proxy.address, (head + "\r\n").encode())


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _denied_properly(answer: bytes) -> bool:
    return (answer.startswith(b"HTTP/1.1 403 ")
            and b"\r\nProxy-Status: geproxy; error=http_request_denied\r\n" in answer)


# -- connect_ports ------------------------------------------------------------------------


def test_connect_outside_connect_ports_is_denied_whatever_the_rules(proxy_factory, raw_origin):
    proxy = _start(proxy_factory, "allow all")
    other = raw_origin(lambda sock: None)  # listening: only the policy can keep it untouched
    answer = _ask(proxy, "CONNECT", f"127.0.0.1:{other.port}")
    assert _denied_properly(answer), answer
    assert answer.endswith(b"\r\n\r\n403 Forbidden\n")  # the rule stays in the log
    [record] = wait_for_records(proxy, 1)
    assert (record.method, record.status, record.rule) == ("CONNECT", 403, "connect_ports")
    assert other.accepted == 0


@pytest.mark.parametrize("ports", ["443 {port}", "1-65535", "80,{port}-{port}"])
def test_connect_inside_connect_ports_tunnels(proxy_factory, origin, ports):
    proxy = _start(proxy_factory, connect_ports=ports.format(port=origin.port))
    out = curl("-p", "-x", proxy.url, origin.url("/"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello\n"
    [record] = wait_for_records(proxy, 1)
    assert (record.method, record.status, record.rule) == ("CONNECT", 200, None)


# -- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("rules, status, rule", [
    ("allow dst origin.test\ndeny dst origin.test", 200, None),
    ("deny dst origin.test\nallow dst origin.test", 403, "line 1"),
])
def test_first_match_wins(proxy_factory, origin, rules, status, rule):
    proxy = _start(proxy_factory, rules)
    answer = _ask(proxy, "GET", origin.url("/", host="origin.test"))
    assert _status(answer) == status, answer
    [record] = wait_for_records(proxy, 1)
    assert record.rule == rule
    assert len(origin.seen) == (1 if status == 200 else 0)


def test_deny_all_and_the_implicit_deny(proxy_factory, origin):
    explicit = _start(proxy_factory, "allow dst origin.test\ndeny all")
    implicit = _start(proxy_factory, "allow dst origin.test")
    for proxy, rule in ((explicit, "line 2"), (implicit, "default")):
        assert _status(_ask(proxy, "GET", origin.url("/", host="origin.test"))) == 200
        answer = _ask(proxy, "GET", origin.url("/", host="other.test"))
        assert _denied_properly(answer), answer
        assert [r.rule for r in wait_for_records(proxy, 2)] == [None, rule]
    assert len(origin.seen) == 2


def test_dst_names_domains_globs_and_addresses(proxy_factory, origin):
    proxy = _start(proxy_factory, """
        exact: allow dst Exact.Test.
        domain: allow dst .example.test
        # a comment line inside the value is skipped
        glob: allow dst web-*.glob.test
        ip: allow dst 127.0.0.0/8
        deny all
    """)
    expected = {
        "exact.test": 200, "EXACT.test.": 200, "sub.exact.test": 403,
        "example.test": 200, "a.b.example.test": 200, "notexample.test": 403,
        "web-1.glob.test": 200, "web.glob.test": 403,
        "127.0.0.1": 200, "10.9.9.9": 403,
        "other.test": 403,  # resolves to 127.0.0.1, but networks match only IP literals
    }
    seen = {host: _status(_ask(proxy, "GET", origin.url("/", host=host))) for host in expected}
    assert seen == expected
    records = wait_for_records(proxy, len(expected))
    assert {r.rule for r in records} == {None, "line 5"}
    assert len(origin.seen) == list(expected.values()).count(200)


def test_port_ranges(proxy_factory, origin):
    port = origin.port
    proxy = _start(proxy_factory, f"allow port 8000-8100,{port - 1}-{port + 1}\ndeny all")
    assert _status(_ask(proxy, "GET", origin.url("/"))) == 200
    assert _denied_properly(_ask(proxy, "GET", "http://127.0.0.1:81/"))
    assert [r.rule for r in wait_for_records(proxy, 2)] == [None, "line 2"]


def test_methods_are_matched_case_sensitively_connect_included(proxy_factory, origin):
    proxy = _start(proxy_factory, """
        tunnels: deny method CONNECT
        reads: allow method GET HEAD
        deny all
    """, connect_ports=f"443 {origin.port}")
    url = origin.url("/")
    assert _denied_properly(_ask(proxy, "CONNECT", f"127.0.0.1:{origin.port}"))
    assert _status(_ask(proxy, "GET", url)) == 200
    assert _status(_ask(proxy, "HEAD", url)) == 200
    assert _denied_properly(_ask(proxy, "POST", url, "Content-Length: 0"))
    assert [r.rule for r in wait_for_records(proxy, 4)] == ["tunnels", None, None, "line 3"]


class HeaderUser:
    """Stands in for an authentication plugin: ctx.user from X-Test-User."""

    name = "header_user"

    @hookimpl(tryfirst=True)
    def on_request(self, ctx: Context, request: Request) -> None:
        ctx.user = request.headers.get("X-Test-User")


def test_user_rules_never_match_without_a_user(proxy_factory, origin):
    proxy = _start(proxy_factory, """
        bob: deny user bob
        alice: allow user alice
        deny all
    """, plugins=(HeaderUser(),))
    url = origin.url("/")
    assert _status(_ask(proxy, "GET", url, "X-Test-User: alice")) == 200
    assert _denied_properly(_ask(proxy, "GET", url, "X-Test-User: bob"))
    # Names compare case-insensitively by default ([auth] user_case = insensitive).
    assert _status(_ask(proxy, "GET", url, "X-Test-User: Alice")) == 200
    assert _denied_properly(_ask(proxy, "GET", url, "X-Test-User: carol"))
    # No plugin offers a way to authenticate: no 407, "deny user bob" does not match.
    assert _denied_properly(_ask(proxy, "GET", url))
    assert [r.rule for r in wait_for_records(proxy, 5)] == [None, "bob", None, "line 3",
                                                            "line 3"]


def test_rule_ids_go_to_the_record_never_to_the_client(proxy_factory, origin):
    proxy = _start(proxy_factory, "no-post: deny method POST\nallow all")
    answer = _ask(proxy, "POST", origin.url("/"), "Content-Length: 0")
    assert _denied_properly(answer), answer
    assert answer.endswith(b"\r\n\r\n403 Forbidden\n")
    assert b"no-post" not in answer and b"acl" not in answer.lower()
    [record] = wait_for_records(proxy, 1)
    assert (record.status, record.error, record.rule) == (403, "http_request_denied", "no-post")
    assert origin.seen == []


# -- where the decision is made ----------------------------------------------------------


@pytest.mark.parametrize("rules, rule", [
    ("remote: deny src 10.0.0.0/8\nlo: deny src 127.0.0.1\nallow all", "lo"),
    ("deny all", "line 1"),
    ("allow src 10.0.0.0/8 dst origin.test", "default"),  # no rule can match 127.0.0.1
])
@pytest.mark.parametrize("refuse", ["answer", "close"])
def test_a_client_decided_by_its_address_is_refused_at_connect(proxy_factory, origin,
                                                               rules, rule, refuse):
    """answer (the default): its first request gets 403, then the close; close: the
    connection is closed before a byte is read."""
    proxy = _start(proxy_factory, rules, refuse_at_connect=refuse)
    answer = _ask(proxy, "GET", origin.url("/"))
    [record] = wait_for_records(proxy, 1)
    if refuse == "answer":
        assert _denied_properly(answer) and b"\r\nConnection: close\r\n" in answer, answer
        assert (record.method, record.status) == ("GET", 403)
    else:
        assert answer == b""
        assert (record.method, record.status) == ("-", 0)
    assert (record.error, record.close_reason, record.rule) == (
        "http_request_denied", "denied", rule)
    assert origin.seen == []


def test_a_mixed_rule_set_decides_each_request(proxy_factory, origin):
    proxy = _start(proxy_factory, "deny src 10.0.0.0/8\nallow dst origin.test\ndeny all")
    pipelined = (f"GET {origin.url('/', host='origin.test')} HTTP/1.1\r\nHost: x\r\n\r\n"
                 f"GET {origin.url('/', host='other.test')} HTTP/1.1\r\nHost: x\r\n"
                 "Connection: close\r\n\r\n").encode()
    answer = exchange(proxy.address, pipelined)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert _denied_properly(answer[answer.index(b"HTTP/1.1 403 "):])
    first, second = wait_for_records(proxy, 2)
    assert first.ctx is second.ctx  # one connection, two decisions
    assert (first.rule, second.rule) == (None, "line 3")


def test_requests_to_the_proxy_itself_are_not_matched_by_dst_or_port(proxy_factory):
    by_default = _start(proxy_factory)
    by_dst = _start(proxy_factory, "allow dst *\nallow port 1-65535\ndeny all")
    by_src = _start(proxy_factory, "allow src 127.0.0.1\ndeny all")
    healthz = "GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode()
    assert exchange(by_default.address, healthz).startswith(b"HTTP/1.1 200 ")
    assert _denied_properly(exchange(by_dst.address, healthz))
    assert exchange(by_src.address, healthz).startswith(b"HTTP/1.1 200 ")
    assert wait_for_records(by_dst, 1)[0].rule == "line 3"


# -- report mode --------------------------------------------------------------------------


@pytest.mark.parametrize("rules, rule", [
    ("lo: deny src 127.0.0.1", "lo"),  # would be refused at connect
    ("only: allow dst nothing.test", "default"),  # would be refused per request
])
def test_report_mode_logs_and_lets_through(proxy_factory, origin, caplog, rules, rule):
    caplog.set_level(logging.WARNING, logger="geproxy_plugins.acl")
    proxy = _start(proxy_factory, rules, mode="report")
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    out = curl("-p", "-x", proxy.url, origin.url("/"))  # port not in connect_ports
    assert out.returncode == 0 and out.stdout == b"hello\n", out.stderr
    records = wait_for_records(proxy, 2)
    assert [(r.status, r.rule) for r in records] == [(200, None), (200, None)]
    lines = [r.getMessage() for r in caplog.records if "would deny" in r.getMessage()]
    assert len(lines) == 2, lines
    assert f"GET {origin.url('/')} from 127.0.0.1 (rule {rule})" in lines[0]
    assert f"CONNECT 127.0.0.1:{origin.port} from 127.0.0.1 (rule connect_ports)" in lines[1]
    assert all(r.levelno == logging.WARNING for r in caplog.records
               if "would deny" in r.getMessage())


# -- matching other clients: the hooks called directly -----------------------------------


def _load_acl(tmp_path: Path, section: str) -> tuple[ACL, Any]:
    path = tmp_path / "acl.ini"
    plugins = "" if ACL_IS_BUILTIN else "plugins = geproxy_plugins.acl:ACL\n"
    path.write_text(f"[geproxy]\n{plugins}access_log = off\n{section}")
    pm, config = load(str(path), entry_points=False)
    return pm.get_plugin("acl"), config


def _ctx(config: Any, client: str) -> Context:
    return Context(client_addr=(client, 5555), server_addr=("127.0.0.1", 3128), config=config)


def _request(method: str, host: str = "", port: int = 80) -> Request:
    headers = Headers(frozen=True)
    if method == "CONNECT":
        return Request(method, f"{host}:{port}", "HTTP/1.1", headers, "", host, port, "")
    if not host:
        return Request(method, "/healthz", "HTTP/1.1", headers, "", "", 0, "/healthz")
    return Request(method, f"http://{host}:{port}/", "HTTP/1.1", headers, "http", host, port,
                   "/")


def _verdict(acl: ACL, ctx: Context, request: Request) -> Optional[str]:
    """None when allowed, else the rule id that denied."""
    try:
        assert acl.on_request(ctx, request) is None
    except Denied as exc:
        return exc.rule or "?"
    return None


def _at_connect(acl: ACL, ctx: Context) -> Optional[str]:
    denied = acl.on_connect(ctx)
    return None if denied is None else denied.rule


def test_default_rules_allow_loopback_only(tmp_path):
    acl, config = _load_acl(tmp_path, "")
    for client in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        ctx = _ctx(config, client)
        assert _at_connect(acl, ctx) is None, client
        assert _verdict(acl, ctx, _request("GET", "example.test")) is None
    for client in ("10.1.2.3", "192.168.1.1", "2001:db8::1", "::ffff:10.1.2.3"):
        assert _at_connect(acl, _ctx(config, client)) == "default", client
    assert _verdict(acl, _ctx(config, "127.0.0.1"), _request("CONNECT", "a.test", 22)) == (
        "connect_ports")
    assert _verdict(acl, _ctx(config, "127.0.0.1"), _request("CONNECT", "a.test", 563)) is None


def test_src_matches_ipv4_mapped_clients_and_decides_at_connect(tmp_path):
    acl, config = _load_acl(tmp_path, _ini("""
        deny src 10.0.0.0/8
        allow dst .example.test
        deny all
    """))
    for client in ("10.1.2.3", "::ffff:10.1.2.3"):
        assert _at_connect(acl, _ctx(config, client)) == "line 1", client
    ctx = _ctx(config, "192.168.1.1")
    assert _at_connect(acl, ctx) is None  # depends on the destination: per request
    assert _verdict(acl, ctx, _request("GET", "www.example.test")) is None
    assert _verdict(acl, ctx, _request("GET", "other.test")) == "line 3"
    # Without on_connect (no plan in the stash yet) the same answers.
    assert _verdict(acl, _ctx(config, "192.168.1.1"), _request("GET", "other.test")) == "line 3"
    assert _verdict(acl, _ctx(config, "10.1.2.3"), _request("GET", "example.test")) == "line 1"


def test_rules_whose_src_excludes_a_client_do_not_delay_its_verdict(tmp_path):
    acl, config = _load_acl(tmp_path, _ini("""
        corp: allow src 10.0.0.0/8 2001:db8::/32 dst .corp.test
        lab: allow src 192.168.0.0/16
        deny all
    """))
    assert _at_connect(acl, _ctx(config, "172.16.0.1")) == "line 3"
    assert _at_connect(acl, _ctx(config, "192.168.7.7")) is None  # lab, decided at connect
    for client in ("10.1.2.3", "2001:db8::5"):
        ctx = _ctx(config, client)
        assert _at_connect(acl, ctx) is None
        assert _verdict(acl, ctx, _request("GET", "www.corp.test")) is None
        assert _verdict(acl, ctx, _request("GET", "www.example.test")) == "line 3"


def test_requests_to_the_proxy_itself_skip_dst_and_port_rules(tmp_path):
    acl, config = _load_acl(tmp_path, _ini("""
        allow dst *
        allow port 1-65535
        lb: allow src 10.0.0.0/8 method GET
        deny all
    """))
    assert _verdict(acl, _ctx(config, "10.1.2.3"), _request("GET")) is None
    assert _verdict(acl, _ctx(config, "10.1.2.3"), _request("POST")) == "line 4"
    assert _verdict(acl, _ctx(config, "192.168.1.1"), _request("GET")) == "line 4"
    assert _verdict(acl, _ctx(config, "192.168.1.1"), _request("GET", "a.test")) is None


def test_a_client_can_be_given_the_proxy_itself_and_no_destination(tmp_path):
    acl, config = _load_acl(tmp_path, _ini("""
        lb-no-egress: deny src 10.9.0.0/24 dst * 0.0.0.0/0 ::/0  # every name, every literal
        lb-health: allow src 10.9.0.0/24
    """))
    ctx = _ctx(config, "10.9.0.7")
    assert _at_connect(acl, ctx) is None
    assert _verdict(acl, ctx, _request("GET")) is None
    for request in (_request("GET", "a.test"), _request("GET", "192.0.2.1"),
                    _request("GET", "2001:db8::1"), _request("CONNECT", "a.test", 443)):
        assert _verdict(acl, ctx, request) == "lb-no-egress", request


def test_globs_take_character_classes_and_empty_connect_ports_allow_no_tunnel(tmp_path):
    acl, config = _load_acl(tmp_path, _ini("allow dst cdn[0-9]*.example.net",
                                           connect_ports=""))
    ctx = _ctx(config, "127.0.0.1")
    assert _verdict(acl, ctx, _request("GET", "cdn12.example.net")) is None
    assert _verdict(acl, ctx, _request("GET", "cdnx.example.net")) == "default"
    assert _verdict(acl, ctx, _request("CONNECT", "cdn1.example.net", 443)) == "connect_ports"


@pytest.mark.parametrize("host", ["169.254.169.254", "::ffff:169.254.169.254", "2852039166",
                                  "0xa9.0xfe.0xa9.0xfe", "169.254.43518", "10.1", "10.1.2.3"])
def test_dst_networks_match_every_spelling_of_an_ip_literal(tmp_path, host):
    acl, config = _load_acl(tmp_path, _ini("""
        meta: deny dst 169.254.169.254, 10.0.0.0/8
        allow all
    """))
    assert _verdict(acl, _ctx(config, "127.0.0.1"), _request("GET", host)) == "meta"
    assert _verdict(acl, _ctx(config, "127.0.0.1"), _request("GET", "169.254.169.254.test")) is (
        None)


def test_port_ranges_are_inclusive(tmp_path):
    acl, config = _load_acl(tmp_path, _ini("allow port 80 8000-8999\ndeny all"))
    ctx = _ctx(config, "127.0.0.1")
    allowed = [port for port in (79, 80, 81, 7999, 8000, 8999, 9000)
               if _verdict(acl, ctx, _request("GET", "a.test", port)) is None]
    assert allowed == [80, 8000, 8999]


def test_empty_rules_deny_everyone_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="geproxy_plugins.acl")
    acl, config = _load_acl(tmp_path, "[acl]\nrules =\n")
    assert _at_connect(acl, _ctx(config, "127.0.0.1")) == "default"
    assert any("every client is denied" in r.getMessage() for r in caplog.records)


# -- configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize("line, problem", [
    ("permit all", "a rule starts with allow or deny"),
    ("allow", "nothing to match"),
    ("allow all src 10.0.0.0/8", "all stands alone"),
    ("allow dest example.com", "unknown condition 'dest'; did you mean 'dst'?"),
    ("allow src", "src needs at least one value"),
    ("allow src 10.0.0.300", "not an IP address or network: '10.0.0.300'"),
    ("allow src 10.1.2.3/8", "has host bits set (did you mean 10.0.0.0/8?)"),
    ("allow src 10.0.0.0/8 src 192.168.0.0/16", "src given twice"),
    ("allow dst http://example.com/", "not an IP address or network"),
    ("allow dst exa$mple.com", "not a host name, .domain, glob or IP network"),
    ("allow port 0", "not a port or a port range"),
    ("allow port 70000", "not a port or a port range"),
    ("allow port 90-80", "not a port or a port range"),
    ("allow port https", "not a port or a port range"),
    ("allow method get", "methods are case-sensitive: write 'GET'"),
    ("default: deny all", "the rule id 'default' is reserved"),
    ("ok: deny all", "the rule id 'ok' is given twice"),
])
def test_a_bad_rule_stops_the_start_naming_its_line(tmp_path, line, problem):
    path = tmp_path / "acl.ini"
    section = _ini(f"ok: allow src 127.0.0.1\n{line}")
    with pytest.raises(ConfigError) as caught:
        _load_acl(tmp_path, section)
    assert (caught.value.section, caught.value.key, caught.value.line) == ("acl", "rules", 2)
    message = str(caught.value)
    assert message.startswith(f"{path}"), message
    assert "[acl] rules: " in message, message
    assert problem in message and repr(line) in message, message


@pytest.mark.parametrize("key, value", [
    ("connect_ports", "443 https"), ("connect_ports", "0"), ("connect_ports", "65536"),
    ("connect_ports", "600-500"), ("mode", "block"),
])
def test_a_bad_option_stops_the_start_naming_its_key(tmp_path, key, value):
    path = tmp_path / "acl.ini"
    with pytest.raises(ConfigError) as caught:
        _load_acl(tmp_path, _ini(**{key: value}))
    assert (caught.value.section, caught.value.key) == ("acl", key)
    assert str(caught.value).startswith(f"{path}: [acl] {key}: "), str(caught.value)


def test_max_connections_per_client(proxy_factory, origin):
    """Over the limit, that client's requests get 503 and are closed; others go on, and the
    count goes down as connections close."""
    ini = ("[acl]\nconnect_ports = 1-65535\nrules = allow src 127.0.0.1\n"
           "max_connections_per_client = 2\n")
    proxy = proxy_factory(ini)
    request = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
    held = [proxy.connect() for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(request)
            assert sock.recv(1000).startswith(b"HTTP/1.1 200 ")
        third = exchange(proxy.address, request)
        assert third.startswith(b"HTTP/1.1 503 ")
        assert b"error=connection_limit_reached" in third
    finally:
        for sock in held:
            sock.close()
    for _ in range(500):  # the two close: the client may connect again
        answer = exchange(proxy.address, request, until_close=False)
        if answer.startswith(b"HTTP/1.1 200 "):
            break
        gevent.sleep(0.01)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_connection_only_decided_is_not_counted_per_client(tmp_path):
    """``ctx.decide_only`` (geproxy explain): no count toward max_connections_per_client,
    so dry runs leave no open connection behind and never push a client over its limit."""
    from geproxy.errors import TooManyConnections

    acl, config = _load_acl(tmp_path, "[acl]\nmax_connections_per_client = 1\n"
                                      "rules = allow all\n")
    request = _request("GET", "origin.test")
    for _ in range(3):
        ctx = _ctx(config, "192.0.2.7")
        ctx.decide_only = True
        assert _at_connect(acl, ctx) is None
        assert _verdict(acl, ctx, request) is None
    served = _ctx(config, "192.0.2.7")
    assert _at_connect(acl, served) is None
    assert _verdict(acl, served, request) is None  # the first one counted: within the limit
    second = _ctx(config, "192.0.2.7")
    acl.on_connect(second)
    with pytest.raises(TooManyConnections):
        acl.on_request(second, request)
