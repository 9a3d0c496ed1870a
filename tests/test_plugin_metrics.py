"""The metrics plugin: counters and histograms after real traffic, read from /metrics on the
admin listener with prometheus_client's own parser."""

from __future__ import annotations

import socket
import threading

import gevent
import prometheus_client
import requests
from geproxy_plugins.metrics import MULTIPROC_ENV, Metrics
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from geproxy import Config, Context, Record, Resolved, hookimpl
from geproxy.testing import StaticResolver, curl, recv_all, wait_for_records

ADMIN = "admin_listen = 127.0.0.1:0\n"


def _samples(proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    host, port = proxy.server.admin_address
    answer = requests.get(f"http://{host}:{port}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _echo_once(sock: socket.socket) -> None:
    sock.sendall(recv_all(sock))


def test_counts_after_traffic(proxy_factory, origin, raw_origin):
    resolver = StaticResolver({"origin.test": ["127.0.0.1"]})
    proxy = proxy_factory(ADMIN, resolver=resolver)
    for path in ("/", "/", "/status/404"):
        out = curl("-x", proxy.url, origin.url(path, host="origin.test"))
        assert out.returncode == 0, out.stderr
    out = curl("-x", proxy.url, "http://nowhere.test/")
    assert out.returncode == 0 and b"502" in out.stdout
    server = raw_origin(_echo_once)
    sock = proxy.connect()
    try:
        target = f"127.0.0.1:{server.port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() +
                     b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"x" * 1000)
    wait_for_records(proxy, 5)

    samples = _samples(proxy)
    requests_total = {labels: value for (name, labels), value in samples.items()
                      if name == "geproxy_requests_total"}
    assert requests_total == {
        (("method", "GET"), ("status", "200")): 2,
        (("method", "GET"), ("status", "404")): 1,
        (("method", "GET"), ("status", "502")): 1,
        (("method", "CONNECT"), ("status", "200")): 1,
    }
    assert samples[("geproxy_connections_total", ())] == 5
    assert samples[("geproxy_requests_in_flight", ())] == 0
    assert samples[("geproxy_errors_total", (("error", "dns_error"),))] == 1
    # The CONNECT head and its answer are counted with the tunnel's bytes.
    assert 1000 < samples[("geproxy_tunnel_bytes_total", (("direction", "up"),))] < 1200
    assert 1000 < samples[("geproxy_tunnel_bytes_total", (("direction", "down"),))] < 1200
    # Upstream connects: the first GET (the next two reuse its pooled connection) and the
    # tunnel; the failed lookup has no time.
    assert samples[("geproxy_resolve_seconds_count", ())] == 2
    assert samples[("geproxy_connect_seconds_count", ())] == 2
    assert samples[("geproxy_connect_seconds_bucket", (("le", "+Inf"),))] == 2
    assert ("geproxy_resolve_seconds_sum", ()) in samples


def test_acl_denials_by_rule(proxy_factory, origin):
    ini = ADMIN + "[acl]\nrules =\n    no-404: deny dst 127.0.0.1 port 1\n    allow all\n"
    proxy = proxy_factory(ini)
    out = curl("-x", proxy.url, "http://127.0.0.1:1/")
    assert out.returncode == 0 and b"403" in out.stdout
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.returncode == 0 and out.stdout == b"hello\n"
    wait_for_records(proxy, 2)
    samples = _samples(proxy)
    assert samples[("geproxy_acl_denials_total", (("rule", "no-404"),))] == 1
    assert samples[("geproxy_errors_total", (("error", "http_request_denied"),))] == 1
    assert samples[("geproxy_requests_total", (("method", "GET"), ("status", "403")))] == 1


def test_unusual_methods_share_one_label(proxy_factory, origin):
    proxy = proxy_factory(ADMIN)
    out = curl("-X", "PROPFIND", "-x", proxy.url, origin.url("/"))
    assert out.returncode == 0, out.stderr
    wait_for_records(proxy, 1)
    samples = _samples(proxy)
    assert samples[("geproxy_requests_total", (("method", "OTHER"), ("status", "200")))] == 1


def test_figures_belong_to_a_server_and_outlive_its_reloads():
    from geproxy import Config

    first, second, reloaded = Metrics(), Metrics(), Metrics()
    stash: dict = {}
    first.configure(Config("a.ini", {}, stash))
    second.configure(Config("b.ini", {}))  # another server: a stash of its own
    reloaded.configure(Config("a.ini", {}, stash))  # a reload of the first server
    first.figures.connections.inc()
    text, content_type = second.exposition()
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    assert b"geproxy_connections_total 0.0" in text
    assert b"geproxy_connections_total 1.0" in reloaded.exposition()[0]
    assert b"_created" not in text  # as with workers, whose multiprocess mode has none
    assert prometheus_client.REGISTRY.get_sample_value("geproxy_connections_total") is None


def test_open_connections_go_up_and_down(proxy_factory, origin):
    proxy = proxy_factory(ADMIN)
    held = proxy.connect()
    try:
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        assert held.recv(1000).startswith(b"HTTP/1.1 200 ")
        # The scrape itself is on the admin port: only the held connection is open.
        assert _samples(proxy)[("geproxy_connections_open", ())] == 1
    finally:
        held.close()
    for _ in range(500):
        if _samples(proxy)[("geproxy_connections_open", ())] == 0:
            break
        gevent.sleep(0.01)
    assert _samples(proxy)[("geproxy_connections_open", ())] == 0


def test_dns_cache_outcomes_and_workers_alive(proxy_factory, origin):
    proxy = proxy_factory(ADMIN, resolver=StaticResolver(fallthrough=True))
    from geproxy import Resolved, hookimpl

    class Names:  # a resolver behind the cache, for one name
        @hookimpl
        def resolve(self, ctx, host, port):
            return Resolved([("127.0.0.1", port)], ttl=60) if host == "cached.test" else None

    proxy.server.pm.register(Names())
    for _ in range(3):  # tunnels: each one resolves (plain requests would reuse the pool)
        out = curl("-p", "-x", proxy.url, origin.url("/", host="cached.test"))
        assert out.stdout == b"hello\n", out.stderr
    wait_for_records(proxy, 3)  # counted as each tunnel's record is made, after curl is gone
    samples = _samples(proxy)
    assert samples[("geproxy_dns_cache_total", (("result", "miss"),))] == 1
    assert samples[("geproxy_dns_cache_total", (("result", "hit"),))] == 2
    assert samples[("geproxy_workers_alive", ())] == 1


def test_a_client_going_away_is_not_an_error(proxy_factory, origin):
    proxy = proxy_factory(ADMIN)
    sock = proxy.connect()
    try:  # half a body, then the client leaves
        sock.sendall(f"POST http://127.0.0.1:{origin.port}/sha256 HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 100\r\n\r\nonly ten b".encode())
    finally:
        sock.close()
    record, = wait_for_records(proxy, 1)
    assert record.close_reason == "client"
    samples = _samples(proxy)
    assert not [key for key in samples if key[0] == "geproxy_errors_total"]
    assert samples[("geproxy_connections_total", ())] == 1


def test_a_request_only_decided_is_not_counted(tmp_path):
    """``ctx.decide_only`` (geproxy explain): neither the connection nor the request is
    counted; the same hooks on a served one count both."""
    from geproxy import Context, Headers, Request
    from geproxy.policy.plugins import load

    path = tmp_path / "metrics.ini"
    path.write_text("[geproxy]\naccess_log = off\n")
    pm, config = load(str(path), entry_points=False)
    metrics = pm.get_plugin("metrics")
    request = Request("CONNECT", "origin.test:443", "HTTP/1.1", Headers(frozen=True), "",
                      "origin.test", 443)

    def figures() -> tuple[float, float, float]:
        text = metrics.exposition()[0].decode()
        return tuple(next(float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith(name + " "))
                     for name in ("geproxy_connections_total", "geproxy_connections_open",
                                  "geproxy_requests_in_flight"))

    try:
        for decide_only, counted in ((True, (0, 0, 0)), (False, (1, 1, 1))):
            ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 3128),
                          config=config, decide_only=decide_only)
            assert pm.hook.on_connect(ctx=ctx) is None
            assert pm.hook.on_request(ctx=ctx, request=request) is None
            assert figures() == counted
    finally:  # its periodic flush, started by the connection counted, stops
        pm.hook.unconfigure(config=config)


def _another_users_samples() -> set[str]:
    """The sample names of a counter made by some other user of prometheus_client in this
    process, with a registry of its own."""
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("other_events", "Another library's counter.", registry=registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_prometheus_client_is_left_as_it_was_for_the_rest_of_the_process(tmp_path,
                                                                         monkeypatch):
    """The plugin's figures, alone and with workers, keep their values the plugin's way
    (the C lock, the multiprocess files) without changing how prometheus_client keeps
    anybody else's, nor which samples it shows them."""
    monkeypatch.setenv(MULTIPROC_ENV, "")  # prepare_workers sets it: put back after
    ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 3128), config=None)
    alone, shared = Metrics(), Metrics()
    alone.configure(Config("a.ini", {}))
    config = Config("b.ini", {})
    shared.configure(config)
    shared.prepare_workers(config, 2, str(tmp_path))
    try:
        for plugin in (alone, shared):
            plugin.on_connect(ctx)
            plugin.on_close(ctx, Record(ctx, method="GET", status=403, error="x", rule="r"))
            text = plugin.exposition()[0].decode()
            assert "geproxy_connections_total 1.0" in text
            assert 'geproxy_acl_denials_total{rule="r"} 1.0' in text
            assert "_created" not in text
        assert (tmp_path / "metrics").is_dir() and any((tmp_path / "metrics").iterdir())
        assert values.Lock is threading.Lock  # what prometheus_client imported
        assert values.ValueClass is values.MutexValue
        assert _another_users_samples() == {"other_events_total", "other_events_created"}
    finally:
        alone.unconfigure()  # their periodic flushes stop
        shared.unconfigure()
        shared.figures.value_class.close_all_files()


def test_the_dns_cache_outcome_is_each_requests_own(proxy_factory, origin):
    """ctx.dns_cache: what the cache made of this request's lookup, and None for the next
    request on the same connection, which looks up an IP literal (no cache involved)."""
    seen = []

    class Names:  # a resolver behind the cache, for one name
        @hookimpl
        def resolve(self, ctx, host, port):
            return Resolved([("127.0.0.1", port)], ttl=60) if host == "cached.test" else None

    class Outcomes:
        @hookimpl
        def on_close(self, ctx, record):
            seen.append(ctx.dns_cache)

    proxy = proxy_factory(ADMIN, plugins=[Outcomes()],
                          resolver=StaticResolver(fallthrough=True))
    proxy.server.pm.register(Names())
    out = curl("-x", proxy.url, origin.url("/", host="cached.test"), origin.url("/"))
    assert out.stdout == b"hello\nhello\n", out.stderr
    first, second = wait_for_records(proxy, 2)
    assert first.ctx.conn_id == second.ctx.conn_id  # one keep-alive connection
    assert seen == ["miss", None]
    samples = _samples(proxy)
    assert samples[("geproxy_dns_cache_total", (("result", "miss"),))] == 1
    assert samples.get(("geproxy_dns_cache_total", (("result", "hit"),)), 0) == 0


def test_counts_wait_in_plain_integers_until_a_flush():
    """The hooks add to plain integers; the prometheus_client values see nothing until
    ``flush()``, then every count at once (gauges as their net change), and a second flush
    adds nothing more."""
    plugin = Metrics()
    plugin.configure(Config("a.ini", {}))
    registry = plugin.figures.registry
    try:
        ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 3128),
                      config=None)
        plugin.on_connect(ctx)
        plugin.on_tls_handshake(ctx, "eof")
        for status in (200, 200, 403):
            call = plugin.on_request(ctx, None)  # driven as pluggy drives a wrapper
            next(call)
            try:
                call.send(None)
            except StopIteration:
                pass
            plugin.on_progress(ctx, Record(ctx, method="GET"), 10, 100)
            ctx.dns_cache, ctx.auth_scheme, ctx.auth_result = "hit", "basic", "ok"
            plugin.on_close(ctx, Record(ctx, method="GET", status=status,
                                        error="http_request_denied" if status == 403 else None,
                                        rule="r1" if status == 403 else None))
        plugin.on_progress(ctx, Record(ctx, method="CONNECT"), 7, 9)
        held = Context(client_addr=("127.0.0.1", 2), server_addr=("127.0.0.1", 3128),
                       config=None)
        plugin.on_connect(held)  # still open at the flush
        plugin.on_disconnect(ctx)

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        assert value("geproxy_connections_total") == 0  # pending only
        assert value("geproxy_requests_total", method="GET", status="200") == 0
        plugin.flush()
        expected = {
            ("geproxy_connections_total", ()): 2,
            ("geproxy_connections_open", ()): 1,
            ("geproxy_requests_in_flight", ()): 0,
            ("geproxy_requests_total", (("method", "GET"), ("status", "200"))): 2,
            ("geproxy_requests_total", (("method", "GET"), ("status", "403"))): 1,
            ("geproxy_http_bytes_total", (("direction", "up"),)): 30,
            ("geproxy_http_bytes_total", (("direction", "down"),)): 300,
            ("geproxy_tunnel_bytes_total", (("direction", "up"),)): 7,
            ("geproxy_tunnel_bytes_total", (("direction", "down"),)): 9,
            ("geproxy_errors_total", (("error", "http_request_denied"),)): 1,
            ("geproxy_acl_denials_total", (("rule", "r1"),)): 1,
            ("geproxy_dns_cache_total", (("result", "hit"),)): 3,
            ("geproxy_auth_total", (("result", "ok"), ("scheme", "basic"))): 3,
            ("geproxy_tls_handshakes_total", (("result", "eof"),)): 1,
        }
        for _ in range(2):  # the second flush has nothing to add
            assert {key: value(key[0], **dict(key[1])) for key in expected} == expected
            plugin.flush()
    finally:
        plugin.unconfigure()


def test_the_periodic_flush_runs_while_a_server_counts(proxy_factory, origin):
    """A proxy's counts reach the prometheus_client values each second with no scrape (the
    values read directly, not through exposition, which flushes); the flush stops with the
    server."""
    proxy = proxy_factory(ADMIN)
    plugin = proxy.server.pm.get_plugin("metrics")
    figures = plugin.figures
    for _ in range(3):
        assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    wait_for_records(proxy, 3)
    assert figures.flusher is not None
    for _ in range(500):  # bounded: 5 s
        if figures.registry.get_sample_value(
                "geproxy_requests_total", {"method": "GET", "status": "200"}) == 3:
            break
        gevent.sleep(0.01)
    assert figures.registry.get_sample_value(
        "geproxy_requests_total", {"method": "GET", "status": "200"}) == 3
    proxy.server.stop(timeout=1)
    assert figures.flusher is None and figures.users == 0


def test_a_reloads_retired_plugins_flush_what_they_counted():
    """Two configurations of one server (a reload) count into the same pending figures; the
    retired one's unconfigure flushes, and the periodic flush goes on for the one in force
    until it is unconfigured too."""
    stash: dict = {}
    old, new = Metrics(), Metrics()
    old.configure(Config("a.ini", {}, stash))
    ctx = Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 3128), config=None)
    old.on_connect(ctx)  # a connection of the old configuration, open across the reload
    new.configure(Config("a.ini", {}, stash))
    figures = new.figures
    assert figures is old.figures and figures.flusher is not None
    old.on_close(ctx, Record(ctx, method="GET", status=200))
    new.on_close(ctx, Record(ctx, method="GET", status=200))
    old.unconfigure()
    assert figures.registry.get_sample_value(
        "geproxy_requests_total", {"method": "GET", "status": "200"}) == 2
    assert figures.flusher is not None  # the new one still counts
    new.on_close(ctx, Record(ctx, method="GET", status=200))
    new.unconfigure()
    assert figures.registry.get_sample_value(
        "geproxy_requests_total", {"method": "GET", "status": "200"}) == 3
    assert figures.flusher is None
