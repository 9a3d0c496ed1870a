"""A plugin's words for the client: ``details=`` on the errors it raises becomes the
``details`` parameter of Proxy-Status (RFC 9209 section 2.1.5), quoted and sanitized, on
HTTP/1.1, on HTTP/2 and in ``geproxy explain``; the built-in refusals send none.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest

from geproxy import Denied, DNSError, errors, hookimpl
from geproxy.explain import explain
from geproxy.testing import StaticResolver, exchange, head_field, wait_for_records
from geproxy.testing.h2client import H2Client

ROOT = Path(__file__).resolve().parent.parent

#: Every ProxyError a plugin may raise: all but ClientGone, for which nothing is sent.
RAISABLE = [getattr(errors, name) for name in errors.__all__
            if isinstance(getattr(errors, name), type)
            and issubclass(getattr(errors, name), errors.ProxyError)
            and getattr(errors, name) is not errors.ClientGone]


class DenyWith:
    """Refuses every request for a proxy's destination in ``hook``, with ``details``."""

    name = "deny_with"

    def __init__(self, details: str | None, hook: str = "on_request") -> None:
        self.details = details
        self.hook = hook

    def _deny(self, hook: str) -> None:
        if hook == self.hook:
            raise Denied("the log's reason", rule="x", details=self.details)

    @hookimpl
    def on_connect(self, ctx):
        self._deny("on_connect")

    @hookimpl
    def on_request(self, ctx, request):
        if request.host:  # not the proxy's own pages
            self._deny("on_request")

    @hookimpl
    def route(self, ctx, request):
        self._deny("route")

    @hookimpl
    def resolve(self, ctx, host, port):
        self._deny("resolve")

    @hookimpl
    def on_response(self, ctx, request, response):
        self._deny("on_response")


def _status_of(proxy, origin) -> bytes:
    answer = exchange(proxy.address, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n"
                                     f"Host: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert b"the log's reason" not in answer  # the detail stays in the log
    field = head_field(answer, b"proxy-status")
    assert field is not None, answer
    return field


@pytest.mark.parametrize("hook", ["on_connect", "on_request", "route", "resolve",
                                  "on_response"])
def test_a_plugin_denial_with_details_tells_the_client(proxy_factory, origin, hook):
    plugin = DenyWith("blocked by ticket 123", hook)
    proxy = proxy_factory(plugins=[plugin], resolver=StaticResolver(fallthrough=True))
    assert _status_of(proxy, origin) == (
        b'geproxy; error=http_request_denied; details="blocked by ticket 123"')
    record, = wait_for_records(proxy, 1)
    assert (record.status, record.error, record.rule) == (403, "http_request_denied", "x")


def test_a_denial_without_details_sends_none(proxy_factory, origin):
    proxy = proxy_factory(plugins=[DenyWith(None)])
    assert _status_of(proxy, origin) == b"geproxy; error=http_request_denied"


def test_details_go_with_rcode_and_the_via_pseudonym(proxy_factory, origin):
    class NoSuchName:
        @hookimpl(tryfirst=True)
        def resolve(self, ctx, host, port):
            raise DNSError(f"{host}: unknown", rcode="NXDOMAIN",
                           details="not in the partner zone")

    proxy = proxy_factory("[geproxy]\nvia = egress-1\n", plugins=[NoSuchName()])
    answer = exchange(proxy.address, b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n"
                                     b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert head_field(answer, b"proxy-status") == (
        b'egress-1; error=dns_error; rcode="NXDOMAIN"; details="not in the partner zone"')


#: What a plugin gives, and the Proxy-Status parameter the client gets.
QUOTED = {
    "quotes and backslashes": ('say "no" to C:\\temp', r'details="say \"no\" to C:\\temp"'),
    "CR LF": ("line\r\nX-Injected: 1", 'details="line X-Injected: 1"'),
    "controls": ("a\tb\x00c\x7fd\x1b[31m", 'details="a b c d [31m"'),
    "beyond ASCII": ("café ☕ Straße", 'details="caf? ? Stra?e"'),
    "surrounding blanks": ("  \t spaced \n", 'details="spaced"'),
}


@pytest.mark.pure
@pytest.mark.parametrize("given, sent", QUOTED.values(), ids=QUOTED.keys())
def test_details_are_quoted_and_sanitized(given, sent):
    params = Denied("reason", details=given).proxy_status_params()
    assert params == f"error=http_request_denied; {sent}"
    assert all(" " <= c <= "~" for c in params)


@pytest.mark.pure
def test_details_are_bounded():
    params = Denied(details="x" * 1000).proxy_status_params()
    assert params == 'error=http_request_denied; details="' + "x" * 253 + '..."'
    assert len(Denied(details="y" * errors.DETAILS_MAX).details) == errors.DETAILS_MAX
    assert Denied(details="y" * errors.DETAILS_MAX).details == "y" * errors.DETAILS_MAX


@pytest.mark.pure
@pytest.mark.parametrize("given", ["", " ", "\r\n\t"])
def test_details_with_nothing_printable_are_left_out(given):
    assert Denied("reason", details=given).details is None
    assert Denied("reason", details=given).proxy_status_params() == "error=http_request_denied"


@pytest.mark.pure
@pytest.mark.parametrize("cls", RAISABLE, ids=lambda cls: cls.__name__)
def test_every_error_a_plugin_raises_takes_details(cls):
    exc = cls("for the log", details='ask "the desk"')
    assert exc.details == 'ask "the desk"'
    assert exc.proxy_status_params() == f'error={cls.error}; details="ask \\"the desk\\""'
    assert cls("for the log").proxy_status_params() == f"error={cls.error}"


def test_the_client_sees_no_header_a_plugin_smuggled_in(proxy_factory, origin):
    proxy = proxy_factory(plugins=[DenyWith("x\r\nSet-Cookie: a=b\r\n\r\nHTTP/1.1 200 OK")])
    answer = exchange(proxy.address, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n"
                                     f"Host: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head_field(head, b"set-cookie") is None
    assert head_field(head, b"proxy-status") == (
        b'geproxy; error=http_request_denied; details="x Set-Cookie: a=b HTTP/1.1 200 OK"')
    assert body == b"403 Forbidden\n"


# -- the built-in refusals say nothing more -------------------------------------------------


BUILT_IN_REFUSALS = {
    "acl rule": ("[acl]\nconnect_ports = 1-65535\nrules =\n    nobody: deny src 0.0.0.0/0 ::/0\n",
                 "http_request_denied"),
    "acl default": ("[acl]\nconnect_ports = 1-65535\nrules =\n    others: allow src 192.0.2.1\n",
                    "http_request_denied"),
    "connect_ports": ("[acl]\nconnect_ports = 443\n", "http_request_denied"),
    "destinations": ("[destinations]\n", "destination_ip_prohibited"),
}


@pytest.mark.parametrize("ini, error", BUILT_IN_REFUSALS.values(),
                         ids=BUILT_IN_REFUSALS.keys())
def test_built_in_refusals_carry_no_details(proxy_factory, raw_origin, ini, error):
    target = raw_origin(lambda sock: None)
    proxy = proxy_factory(ini)
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode(),
                      until_close=False)
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert head_field(answer, b"proxy-status") == f"geproxy; error={error}".encode()
    assert target.accepted == 0


@pytest.mark.pure
def test_no_built_in_plugin_passes_details():
    """The built-ins' refusals must not tell a client the policy behind them: none of their
    calls names ``details``."""
    sources = sorted((ROOT / "plugins").glob("*.py"))
    assert len(sources) >= 11
    for source in sources:
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                named = [keyword.arg for keyword in node.keywords]
                assert "details" not in named, f"{source.name}:{node.lineno} passes details="


# -- HTTP/2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, hook", [("CONNECT", "on_request"), ("GET", "on_request"),
                                        ("CONNECT", "on_connect")])
def test_details_reach_an_http2_client(proxy_factory, tls_files, origin, kind, hook):
    proxy = proxy_factory("[geproxy]\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n"
                          + tls_files.ini(http2="on"),
                          plugins=[DenyWith('blocked by "ticket" 123', hook)])
    client = H2Client(proxy.tls_address, tls_files.ca_file)
    try:
        if kind == "CONNECT":
            stream = client.connect(f"127.0.0.1:{origin.port}")
            status = stream.wait_head()
            fields, body = dict(stream.headers or []), stream.read_all()
        else:
            status, fields, body = client.request("GET", origin.url("/"))
    finally:
        client.close()
    assert status == 403 and body == b"403 Forbidden\n"
    assert fields["proxy-status"] == (
        'geproxy; error=http_request_denied; details="blocked by \\"ticket\\" 123"')
    assert origin.seen == []


# -- geproxy explain --------------------------------------------------------------------------


PLUGIN = '''
from geproxy import Denied, hookimpl


class Ticketed:
    name = "ticketed"

    @hookimpl
    def on_request(self, ctx, request):
        raise Denied("for the log", rule="ticketed", details="see ticket 123")
'''


def _explain_with(tmp_path, monkeypatch, module: str, text: str, plugins: str) -> list[str]:
    """The lines ``geproxy explain`` prints for a CONNECT refused by the plugins of ``text``
    (saved as ``module``): it must say refused."""
    (tmp_path / f"{module}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "geproxy.ini"
    config.write_text("[geproxy]\nlisten = 127.0.0.1:3128\naccess_log = off\n"
                      f"plugins = {plugins}\n")
    out = io.StringIO()
    assert explain(str(config), "CONNECT", "example.com:443", resolve=False, out=out) == 1
    return out.getvalue().splitlines()


def test_explain_prints_the_details_the_client_would_get(tmp_path, monkeypatch):
    lines = _explain_with(tmp_path, monkeypatch, "ticketed", PLUGIN, "ticketed:Ticketed")
    assert ("answer      403 Forbidden; Proxy-Status: geproxy; error=http_request_denied; "
            'details="see ticket 123"') in lines, lines


WRAPPER = '''
from geproxy import Denied, hookimpl


class Plain:
    name = "plain"

    @hookimpl
    def on_request(self, ctx, request):
        raise Denied("for the log", rule="plain")


class Explains:
    """Adds words for the client to whatever denial comes back."""

    name = "explains"

    @hookimpl(wrapper=True)
    def on_request(self, ctx, request):
        try:
            return (yield)
        except Denied as exc:
            raise Denied(exc.detail, rule=exc.rule, details="ask the desk") from None
'''


def test_explain_sees_a_wrapper_that_only_adds_details(tmp_path, monkeypatch):
    """Details are part of the answer: a wrapper that changes nothing else decides it."""
    lines = _explain_with(tmp_path, monkeypatch, "wrapping", WRAPPER,
                          "wrapping:Plain wrapping:Explains")
    wrapper = next(line for line in lines if line.startswith("  explains "))
    assert wrapper.endswith("<- decides") and "(wrapper) 403 http_request_denied" in wrapper
    assert not next(line for line in lines if line.startswith("  plain ")).endswith("decides")
    assert lines[-2].endswith('; details="ask the desk"'), lines


def test_a_plugins_own_answer_is_recorded_by_its_error_not_by_its_details(proxy_factory,
                                                                           origin):
    """A plugin that answers with a Response of its own names its cause in Proxy-Status;
    the record takes the ``error`` parameter, whatever ``;`` or ``error=`` its quoted
    ``details`` hold."""
    from geproxy import Headers, Response

    class Answers:
        @hookimpl
        def on_request(self, ctx, request):
            if not request.host:
                return None
            return Response(403, Headers([
                ("Proxy-Status", 'geproxy; details="a; error=x"; error=http_request_denied')
            ]), b"no\n")

    proxy = proxy_factory(plugins=[Answers()])
    answer = exchange(proxy.address, f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n"
                      "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 ")
    record, = wait_for_records(proxy, 1)
    assert record.error == "http_request_denied"
