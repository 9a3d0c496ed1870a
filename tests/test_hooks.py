"""The hook core: exact call order, contracts, and the built-ins registered like any plugin."""

from __future__ import annotations

import inspect
import socket

import pytest

from geproxy import DEFAULT_PLUGINS, Route, hookimpl
from geproxy.policy import hookspecs
from geproxy.policy.plugins import plugin_names
from geproxy.testing import HookRecorder, curl, exchange, wait_for_records


def test_hook_order_for_connect(proxy_factory, origin):
    recorder = HookRecorder()
    proxy = proxy_factory(plugins=[recorder])
    proxy.resolver.add("origin.test", "127.0.0.1")
    out = curl("-p", "-x", proxy.url, origin.url("/", host="origin.test"))
    assert out.returncode == 0, out.stderr
    wait_for_records(proxy, 1)
    assert recorder.calls == [
        ("on_connect", "127.0.0.1"),
        ("on_request", f"CONNECT origin.test:{origin.port}"),
        ("route", "origin.test"),
        ("resolve", f"origin.test:{origin.port}"),
        ("on_close", "CONNECT 200"),
    ]


def test_hook_order_on_a_tls_listener(proxy_factory, origin, tls_files):
    """on_connect before the handshake (a client refused by address costs no TLS), then
    on_tls_handshake, then the request as on a plain listener."""
    recorder = HookRecorder()
    proxy = proxy_factory("[geproxy]\nlisten = tls://127.0.0.1:0\n" + tls_files.ini(),
                          plugins=[recorder])
    proxy.resolver.add("origin.test", "127.0.0.1")
    out = curl("-p", "-x", proxy.tls_url, "--proxy-cacert", tls_files.ca_file,
               origin.url("/", host="origin.test"))
    assert out.returncode == 0, out.stderr
    wait_for_records(proxy, 1)
    assert recorder.calls == [
        ("on_connect", "127.0.0.1"),
        ("on_tls_handshake", "ok"),
        ("on_request", f"CONNECT origin.test:{origin.port}"),
        ("route", "origin.test"),
        ("resolve", f"origin.test:{origin.port}"),
        ("on_close", "CONNECT 200"),
    ]


def test_hook_order_for_a_plain_get(proxy_factory, origin):
    recorder = HookRecorder()
    proxy = proxy_factory(plugins=[recorder])
    proxy.resolver.add("origin.test", "127.0.0.1")
    out = curl("-x", proxy.url, origin.url("/", host="origin.test"))
    assert out.returncode == 0, out.stderr
    wait_for_records(proxy, 1)
    assert recorder.calls == [
        ("on_connect", "127.0.0.1"),
        ("on_request", f"GET {origin.url('/', host='origin.test')}"),
        ("route", "origin.test"),
        ("resolve", f"origin.test:{origin.port}"),
        ("on_response", "200"),
        ("on_close", "GET 200"),
    ]


def test_a_reused_upstream_connection_skips_resolve(proxy_factory, origin):
    recorder = HookRecorder()
    proxy = proxy_factory(plugins=[recorder])
    url = origin.url("/")
    out = curl("-x", proxy.url, url, url)  # one client connection, two requests
    assert out.stdout == b"hello\nhello\n"
    wait_for_records(proxy, 2)
    assert recorder.names.count("resolve") == 1
    assert recorder.names.count("on_request") == 2


def test_on_response_may_edit_headers(proxy_factory, origin):
    class Stamp:
        @hookimpl
        def on_response(self, ctx, request, response):
            response.headers.set("X-Checked-By", "policy")
            response.headers.set("Content-Length", "1")  # framing stays the core's

    proxy = proxy_factory(plugins=[Stamp()])
    out = curl("-i", "-x", proxy.url, origin.url("/"))
    assert b"X-Checked-By: policy\r\n" in out.stdout
    assert out.stdout.endswith(b"\r\n\r\nhello\n")
    assert b"Content-Length: 6\r\n" in out.stdout


def test_on_close_observers_are_isolated(proxy_factory, origin):
    seen = []

    class Broken:
        @hookimpl
        def on_close(self, ctx, record):
            raise RuntimeError("observer bug")

    class Counter:
        @hookimpl
        def on_close(self, record):  # an impl may take only the arguments it needs
            seen.append(record.status)

    proxy = proxy_factory(plugins=[Counter(), Broken()])
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.stdout == b"hello\n"
    wait_for_records(proxy, 1)
    assert seen == [200]


def test_builtin_plugins_are_registered_by_name(proxy):
    names = plugin_names(proxy.server.pm)
    for name, _ in DEFAULT_PLUGINS:
        assert name in names


def test_each_server_numbers_its_connections_from_one(proxy_factory, origin):
    """Connection ids are the server's, not the process's: two servers in one process each
    count their own connections from c1."""
    first, second = proxy_factory(), proxy_factory()
    for proxy in (first, second, first):
        out = curl("-sS", "-x", proxy.url, origin.url("/"))
        assert out.returncode == 0, out.stderr
        wait_for_records(proxy, 1)
    assert [record.ctx.conn_id for record in wait_for_records(first, 2)] == ["c1", "c2"]
    assert [record.ctx.conn_id for record in wait_for_records(second, 1)] == ["c1"]
    assert first.server.next_conn_id() == "c3"


def test_every_hook_has_a_contract():
    """Each hookspec documents when it is called and what its return values mean."""
    specs = [obj for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(obj, "geproxy_spec")]
    assert {spec.__name__ for spec in specs} == {
        "add_options", "configure", "unconfigure", "on_connect", "on_request", "route",
        "route_failed", "resolve", "on_tunnel_data", "on_response", "on_close",
        "reopen_logs", "on_disconnect", "on_tls_handshake", "on_progress", "on_reload",
        "parent_proxies", "prepare_workers", "on_worker_exit", "authenticate",
        "auth_challenge", "user_groups", "external_acl"}
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert "Called" in doc, spec.__name__
        assert "Must not" in doc or "must not" in doc, spec.__name__


def test_route_through_a_parent_proxy(proxy_factory, origin):
    """``route`` returning a Route sends CONNECT to the parent, and plain requests to it in
    absolute-form, with the parent's credentials; the client's own never leave."""
    seen_by_parent = []

    class Watch:
        @hookimpl
        def on_request(self, ctx, request):
            seen_by_parent.append((request.method, request.target,
                                   request.headers.get("proxy-authorization")))

    parent = proxy_factory("via = parent-proxy\n", plugins=[Watch()])  # names must differ

    class ViaParent:
        @hookimpl
        def route(self, ctx, request):
            return Route(parent.address[0], parent.port, "egress", "s3cret")

    child = proxy_factory(plugins=[ViaParent()])
    out = curl("-p", "-x", child.url, origin.url("/echo"))
    assert out.returncode == 0 and b'"path": "/echo"' in out.stdout, out.stderr
    out = curl("-x", child.url, "-U", "client:secret", origin.url("/echo"))
    assert out.returncode == 0, out.stderr
    assert "proxy-authorization" not in out.stdout.decode()
    credentials = "Basic ZWdyZXNzOnMzY3JldA=="
    assert seen_by_parent == [
        ("CONNECT", f"127.0.0.1:{origin.port}", credentials),
        ("GET", origin.url("/echo"), credentials),
    ]
    assert wait_for_records(child, 2)[-1].upstream_addr == parent.address


def test_plugins_from_the_entry_point_group(tmp_path, monkeypatch):
    """An installed distribution offering a ``geproxy`` entry point is loaded at start."""
    (tmp_path / "stamp_plugin.py").write_text(
        "from geproxy import hookimpl\n"
        "class Stamp:\n"
        "    @hookimpl\n"
        "    def on_response(self, ctx, request, response):\n"
        "        response.headers.set('X-Stamped', 'entry-point')\n")
    dist = tmp_path / "stamp_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stamp-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[geproxy]\nstamp = stamp_plugin:Stamp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from geproxy.policy.plugins import load

    path = tmp_path / "ep.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n")
    pm, _ = load(str(path))
    assert "stamp" in plugin_names(pm)
    assert type(pm.get_plugin("stamp")).__name__ == "Stamp"
    assert len(pm.hook.on_response.get_hookimpls()) == 1


def test_on_close_wrappers_are_refused(tmp_path):
    class Wrapping:
        @hookimpl(wrapper=True)
        def on_close(self, ctx, record):
            return (yield)

    from geproxy.errors import ConfigError
    from geproxy.policy.plugins import load

    path = tmp_path / "w.ini"
    path.write_text("[geproxy]\naccess_log = off\n")
    with pytest.raises(ConfigError, match="on_close may not be a wrapper"):
        load(str(path), objects=[Wrapping()], entry_points=False)


def test_routes_are_tried_in_order_and_failures_reported(proxy_factory, origin):
    """``route`` may return several routes: a failing parent is reported through
    ``route_failed`` and the next one is tried; when all fail the client gets the last error."""
    parent = proxy_factory("via = parent-proxy\n")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    failed = []

    class Parents:
        routes = [Route("127.0.0.1", dead_port), Route(parent.address[0], parent.port)]

        @hookimpl
        def route(self, ctx, request):
            return self.routes

        @hookimpl
        def route_failed(self, ctx, request, route, error):
            failed.append((route.port, error.error))

    plugin = Parents()
    child = proxy_factory(plugins=[plugin])
    for flag in ("-p", ""):
        out = curl(*([flag] if flag else []), "-x", child.url, origin.url("/"))
        assert out.stdout == b"hello\n", out.stderr
    assert failed == [(dead_port, "connection_refused")] * 2
    assert wait_for_records(child, 2)[-1].upstream_addr == parent.address
    plugin.routes = [Route("127.0.0.1", dead_port)]
    answer = exchange(child.address, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n"
                      .encode(), until_close=False)
    assert answer.startswith(b"HTTP/1.1 502 ") and b"error=connection_refused" in answer


def test_reopen_logs_and_on_reload_reach_every_plugin_whatever_one_raises(proxy_factory):
    """Both are isolated: a plugin that fails to reopen its file, or to note a reload, does
    not keep another from doing so (the access log among them)."""
    calls: list[str] = []

    class Fails:
        @hookimpl
        def reopen_logs(self):
            raise OSError("disk gone")

        @hookimpl
        def on_reload(self, config, error):
            raise RuntimeError("broken observer")

    class Notes:
        @hookimpl
        def reopen_logs(self):
            calls.append("reopen")

        @hookimpl
        def on_reload(self, config, error):
            calls.append(f"reload {error}")

    # Registered after Notes, Fails is called before it: the order that would lose Notes.
    proxy = proxy_factory(plugins=[Notes(), Fails()])
    proxy.server.reopen_logs()
    proxy.server.refused("a reason")
    assert calls == ["reopen", "reload a reason"]
