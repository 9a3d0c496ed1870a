"""The ``auth`` plugin: Basic proxy authentication against an htpasswd file.

A real proxy on loopback, real clients (curl, requests, raw sockets) and htpasswd files written
with passlib as Apache's htpasswd writes them. The plugin under test is the one the proxy runs
(``proxy.server.pm.get_plugin("auth")``): registered here until ``auth`` is a built-in.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import gevent
import pytest
import requests
from geproxy_plugins.auth import Auth
from geproxy_plugins.auth.htpasswd import HtpasswdFile
from gevent import monkey
from passlib.hash import apr_md5_crypt, bcrypt, sha256_crypt, sha512_crypt

from geproxy import DEFAULT_PLUGINS, ConfigError, errors
from geproxy.policy.plugins import load
from geproxy.testing import HookRecorder, ResponseReader, curl, exchange, wait_for_records

AUTH_IS_BUILTIN = any(name == "auth" for name, _ in DEFAULT_PLUGINS)

#: As Apache's htpasswd writes them (-B, -m, -2, -5), with cheap costs for the tests.
HASHERS: dict[str, Callable[[str], str]] = {
    "bcrypt": bcrypt.using(ident="2y", rounds=5).hash,
    "apr1": apr_md5_crypt.hash,
    "sha256": sha256_crypt.using(rounds=5000).hash,
    "sha512": sha512_crypt.using(rounds=5000).hash,
}
USERS = {"alice": ("bcrypt", "alice-pw"), "bob": ("apr1", "bob:pw é"),
         "carol": ("sha256", "carol-pw"), "dave": ("sha512", "dave-pw")}

_real_get_ident = monkey.get_original("_thread", "get_ident")
_real_lock = monkey.get_original("_thread", "allocate_lock")
MAIN_THREAD = _real_get_ident()


def _write(path: Path, users: dict[str, tuple[str, str]], extra: str = "") -> Path:
    """An htpasswd file; replaced by rename, as editors and htpasswd itself do."""
    lines = [f"{user}:{HASHERS[scheme](password)}" for user, (scheme, password) in users.items()]
    fresh = path.with_suffix(".new")
    fresh.write_text("\n".join(["# written by the tests", *lines, extra]) + "\n")
    os.replace(fresh, path)
    return path


def _start(proxy_factory, tmp_path: Path, users: Optional[dict[str, tuple[str, str]]] = None,
           ini: str = "", clock: Any = None, **options: str):
    """A proxy whose [auth] reads an htpasswd of ``users``; (proxy, its auth plugin, path)."""
    path = _write(tmp_path / "htpasswd", USERS if users is None else users)
    section = f"[auth]\nhtpasswd = {path}\n" + "".join(f"{k} = {v}\n" for k, v in options.items())
    proxy = proxy_factory(ini + "\n" + section, plugins=[] if AUTH_IS_BUILTIN else [Auth()])
    plugin = proxy.server.pm.get_plugin("auth")
    assert isinstance(plugin, Auth)
    if clock is not None:
        plugin.clock = clock
    return proxy, plugin, path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _get(target: str, *fields: str, close: bool = False) -> bytes:
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{f}\r\n" for f in fields)
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode()


def _challenged(head: bytes, realm: str = "geproxy") -> bool:
    return (head.startswith(b"HTTP/1.1 407 ")
            and f'\r\nProxy-Authenticate: Basic realm="{realm}"'.encode() in head
            and b"\r\nProxy-Status: geproxy; error=http_request_denied" in head
            and b"\r\nContent-Type: text/plain" in head)


# -- clients that authenticate --------------------------------------------------------------


@pytest.mark.parametrize("user", sorted(USERS))
def test_curl_authenticates_with_each_hash_apache_writes(proxy_factory, origin, tmp_path, user):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    out = curl("-x", proxy.url, "--proxy-user", f"{user}:{USERS[user][1]}", origin.url("/echo"))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["path"] == "/echo"
    assert "proxy-authorization" not in seen["headers"]  # never forwarded to the origin
    assert wait_for_records(proxy, 1)[-1].ctx.user == user


def test_curl_tunnels_and_https_authenticate_on_the_connect(proxy_factory, origin, tls_origin,
                                                            ca_file, tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    tunnel = curl("-p", "-x", proxy.url, "--proxy-user", "carol:carol-pw", origin.url("/echo"))
    assert tunnel.returncode == 0, tunnel.stderr
    assert "proxy-authorization" not in json.loads(tunnel.stdout)["headers"]
    https = curl("--cacert", ca_file, "-x", proxy.url, "--proxy-user", "dave:dave-pw",
                 tls_origin.url("/echo"))
    assert https.returncode == 0, https.stderr
    assert "proxy-authorization" not in json.loads(https.stdout)["headers"]
    refused = curl("--cacert", ca_file, "-x", proxy.url, "--proxy-user", "dave:nope",
                   tls_origin.url("/"))
    assert refused.returncode != 0 and b"407" in refused.stderr, refused.stderr
    records = wait_for_records(proxy, 3)
    assert [(r.method, r.status, r.ctx.user) for r in records] == [
        ("CONNECT", 200, "carol"), ("CONNECT", 200, "dave"), ("CONNECT", 407, None)]
    assert len(tls_origin.seen) == 1


def _fetch(session: requests.Session, url: str, proxies: dict[str, str], **options: Any
           ) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body, with the response closed and dropped: a response still
    referenced keeps its connection, and so its tunnel, open."""
    with session.get(url, proxies=proxies, timeout=10, **options) as response:
        return response.status_code, dict(response.headers), response.content


def test_requests_with_credentials_in_the_proxy_url(proxy_factory, origin, tls_origin, ca_file,
                                                    tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    good = f"http://alice:alice-pw@127.0.0.1:{proxy.port}"
    bad = f"http://alice:wrong@127.0.0.1:{proxy.port}"
    with requests.Session() as session:
        session.trust_env = False
        status, _, body = _fetch(session, origin.url("/echo"), {"http": good})
        assert status == 200
        assert "proxy-authorization" not in json.loads(body)["headers"]
        status, _, _ = _fetch(session, tls_origin.url("/echo"), {"https": good}, verify=ca_file)
        assert status == 200
        status, headers, _ = _fetch(session, origin.url("/"), {"http": bad})
        assert status == 407
        assert headers["Proxy-Authenticate"] == 'Basic realm="geproxy"'
    records = wait_for_records(proxy, 3)  # the tunnel's record comes when the session closed
    assert sorted((r.method, r.status, r.ctx.user or "") for r in records) == [
        ("CONNECT", 200, "alice"), ("GET", 200, "alice"), ("GET", 407, "")]
    assert len(origin.seen) == 1


# -- challenges ------------------------------------------------------------------------------


def test_a_challenge_then_a_retry_on_the_same_connection(proxy_factory, origin, tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path, realm="Corp egress")
    url = origin.url("/echo")
    with proxy.connect() as sock:
        sock.sendall(_get(url))
        head, body = ResponseReader(sock).read()
        assert _challenged(head, "Corp egress"), head
        assert b"\r\nConnection: close" not in head
        assert body == b"407 Proxy Authentication Required\n"  # no detail
        sock.sendall(_get(url, f"Proxy-Authorization: {_basic('alice', 'alice-pw')}"))
        head, body = ResponseReader(sock).read()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert "proxy-authorization" not in json.loads(body)["headers"]
    first, second = wait_for_records(proxy, 2)
    assert first.ctx is second.ctx  # one connection
    assert (first.status, second.status) == (407, 200)
    assert len(origin.seen) == 1


def test_a_connect_challenge_then_a_retry_on_the_same_connection(proxy_factory, origin,
                                                                 tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    connect = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
    with proxy.connect() as sock:
        sock.sendall((connect + "\r\n").encode())
        head, body = ResponseReader(sock).read()
        assert _challenged(head), head
        credentials = _basic("bob", "bob:pw é")
        sock.sendall((connect + f"Proxy-Authorization: {credentials}\r\n\r\n").encode())
        head, _ = ResponseReader(sock).read()
        assert head.startswith(b"HTTP/1.1 200 Connection Established"), head
        sock.sendall(_get("/", close=True))  # now inside the tunnel, to the origin
        head, body = ResponseReader(sock).read()
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello\n"
    first, second = wait_for_records(proxy, 2)
    assert (first.method, first.status, second.method, second.status) == (
        "CONNECT", 407, "CONNECT", 200)
    assert second.ctx.user == "bob"  # one ctx: the user of the connection's last request


@pytest.mark.parametrize("credentials", [
    None,
    _basic("alice", "wrong"),
    _basic("alice", "alice-pw "),
    _basic("mallory", "alice-pw"),
    _basic("alice", ""),
    "Basic " + base64.b64encode(b"alice").decode(),  # no colon
    "Basic not*base64",
    "Basic",
    "Negotiate YIIBhwYGKwYBBQUCoIIBezCCAXe",
    "Bearer abc",
    "alice:alice-pw",
], ids=lambda value: str(value)[:22])
def test_anything_but_good_basic_credentials_is_challenged(proxy_factory, origin, tmp_path,
                                                          credentials):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    fields = [f"Proxy-Authorization: {credentials}"] if credentials is not None else []
    answer = exchange(proxy.address, _get(origin.url("/"), *fields, close=True))
    assert _challenged(answer), answer
    assert answer.endswith(b"\r\n\r\n407 Proxy Authentication Required\n")
    assert wait_for_records(proxy, 1)[-1].ctx.user is None
    assert origin.seen == []


def test_two_credentials_fields_are_challenged(proxy_factory, origin, tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    fields = [f"Proxy-Authorization: {_basic('mallory', 'x')}",
              f"Proxy-Authorization: {_basic('alice', 'alice-pw')}"]
    assert _challenged(exchange(proxy.address, _get(origin.url("/"), *fields, close=True)))
    assert origin.seen == []


def test_a_challenged_request_with_a_body_closes_the_connection(proxy_factory, origin,
                                                                tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    request = (f"POST {origin.url('/')} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
               f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    answer = exchange(proxy.address, request)  # read until the proxy closes
    assert _challenged(answer), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # the unread body was not taken for a request
    assert origin.seen == []


def test_requests_to_the_proxy_itself_are_not_challenged(proxy_factory, tmp_path):
    proxy, _, _ = _start(proxy_factory, tmp_path)
    answer = exchange(proxy.address, _get("/healthz", close=True))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert wait_for_records(proxy, 1)[-1].ctx.user is None


# -- what the user name is used for -----------------------------------------------------------


def test_acl_user_rules_see_the_authenticated_user(proxy_factory, origin, tmp_path):
    rules = "[acl]\nrules =\n    allow user alice\n    deny all\n"
    proxy, _, _ = _start(proxy_factory, tmp_path, ini=rules)
    url = origin.url("/")
    alice = curl("-i", "-x", proxy.url, "--proxy-user", "alice:alice-pw", url)
    assert alice.stdout.startswith(b"HTTP/1.1 200 ") and alice.stdout.endswith(b"hello\n")
    bob = curl("-i", "-x", proxy.url, "--proxy-user", "bob:bob:pw é", url)
    assert bob.stdout.startswith(b"HTTP/1.1 403 "), bob.stdout  # authenticated, not allowed
    nobody = curl("-i", "-x", proxy.url, url)
    # The walk reaches "user alice" and the request proves no user: the rule asks.
    assert nobody.stdout.startswith(b"HTTP/1.1 407 "), nobody.stdout
    records = wait_for_records(proxy, 3)
    assert [(r.status, r.ctx.user, r.rule) for r in records] == [
        (200, "alice", None), (403, "bob", "line 2"), (407, None, "line 1")]


def test_the_access_log_line_names_the_user_of_each_request(proxy_factory, origin, tmp_path):
    log_file = tmp_path / "access.log"
    proxy, _, _ = _start(proxy_factory, tmp_path, ini=f"[geproxy]\naccess_log = {log_file}\n")
    url = origin.url("/")
    with proxy.connect() as sock:  # one connection, the user of each request in its line
        for credentials in (_basic("carol", "carol-pw"), _basic("carol", "wrong"), None):
            fields = [f"Proxy-Authorization: {credentials}"] if credentials else []
            sock.sendall(_get(url, *fields))
            ResponseReader(sock).read()
        sock.sendall(_get("/healthz", f"Proxy-Authorization: {_basic('carol', 'carol-pw')}"))
        ResponseReader(sock).read()
    wait_for_records(proxy, 4)
    lines = [line.split() for line in log_file.read_text().splitlines()]
    # time duration client method target status error in out upstream user conn rule
    assert [(fields[5], fields[10]) for fields in lines] == [
        ("200", "carol"), ("407", "-"), ("407", "-"), ("200", "-")]


# -- the cost of hashing ----------------------------------------------------------------------


def _spy(monkeypatch, plugin: Auth, gate: Any = None) -> list[int]:
    """Counts the plugin's hashings (and the thread of each); with a ``gate`` (a real lock,
    held by the test), each hashing in a thread waits, bounded, until the test releases it.
    One on the event loop's thread does not wait: it would stall the test itself."""
    calls: list[int] = []
    verify = plugin.htpasswd.verify_hash

    def spy(password: bytes, stored: str) -> bool:
        calls.append(_real_get_ident())
        if gate is not None and calls[-1] != MAIN_THREAD:  # on the loop, a wait would hang
            assert gate.acquire(timeout=10), "the gate was never opened"
            gate.release()
        return verify(password, stored)

    monkeypatch.setattr(plugin.htpasswd, "verify_hash", spy)
    return calls


def test_good_credentials_are_hashed_once_per_cache_ttl(proxy_factory, origin, tmp_path,
                                                        fake_clock, monkeypatch):
    proxy, plugin, _ = _start(proxy_factory, tmp_path, clock=fake_clock, cache_ttl="5m")
    calls = _spy(monkeypatch, plugin)
    alice = ("-x", proxy.url, "--proxy-user", "alice:alice-pw", origin.url("/"))
    for _ in range(3):
        assert curl(*alice).stdout == b"hello\n"
    assert len(calls) == 1
    bad = curl("-i", "-x", proxy.url, "--proxy-user", "alice:wrong", origin.url("/"))
    assert bad.stdout.startswith(b"HTTP/1.1 407 ")
    assert len(calls) == 2  # a wrong password is never answered from the good cache
    fake_clock.advance(301)
    assert curl(*alice).stdout == b"hello\n"
    assert len(calls) == 3  # expired: hashed again


def test_a_repeated_wrong_password_is_hashed_once_until_the_file_changes(
        proxy_factory, origin, tmp_path, fake_clock, monkeypatch):
    proxy, plugin, path = _start(proxy_factory, tmp_path, clock=fake_clock)
    calls = _spy(monkeypatch, plugin)
    stale = ("-i", "-x", proxy.url, "--proxy-user", "alice:new-pw", origin.url("/"))
    for _ in range(3):
        assert curl(*stale).stdout.startswith(b"HTTP/1.1 407 ")
    assert len(calls) == 1
    _write(path, {**USERS, "alice": ("bcrypt", "new-pw")})
    fake_clock.advance(2)
    assert curl(*stale).stdout.startswith(b"HTTP/1.1 200 ")  # the reload forgot the failure
    assert len(calls) == 2


def test_a_changed_hash_takes_effect_after_check_interval(proxy_factory, origin, tmp_path,
                                                          fake_clock):
    proxy, _, path = _start(proxy_factory, tmp_path, clock=fake_clock, check_interval="10s")
    url = origin.url("/")

    def status(password: str) -> bytes:
        out = curl("-i", "-x", proxy.url, "--proxy-user", f"alice:{password}", url)
        return out.stdout[:12]

    assert status("alice-pw") == b"HTTP/1.1 200"
    _write(path, {**USERS, "alice": ("sha512", "rotated")})
    fake_clock.advance(9)
    assert status("alice-pw") == b"HTTP/1.1 200"  # cached, and the file not looked at yet
    assert status("rotated") == b"HTTP/1.1 407"
    fake_clock.advance(1)
    assert status("alice-pw") == b"HTTP/1.1 407"  # reloaded: the cached entry is gone
    assert status("rotated") == b"HTTP/1.1 200"


def test_a_reload_adds_and_removes_users_and_survives_a_bad_file(proxy_factory, origin,
                                                                 tmp_path, fake_clock, caplog):
    proxy, plugin, path = _start(proxy_factory, tmp_path, clock=fake_clock)
    url = origin.url("/")

    def status(user: str, password: str) -> bytes:
        out = curl("-i", "-x", proxy.url, "--proxy-user", f"{user}:{password}", url)
        return out.stdout[:12]

    assert status("carol", "carol-pw") == b"HTTP/1.1 200"
    assert status("erin", "erin-pw") == b"HTTP/1.1 407"
    users = {name: value for name, value in USERS.items() if name != "carol"}
    _write(path, {**users, "erin": ("apr1", "erin-pw")})
    fake_clock.advance(2)
    assert status("erin", "erin-pw") == b"HTTP/1.1 200"
    assert status("carol", "carol-pw") == b"HTTP/1.1 407"  # removed, though cached
    _write(path, users, extra="frank:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=")
    fake_clock.advance(2)
    assert status("erin", "erin-pw") == b"HTTP/1.1 200"  # the last good users are kept
    assert "erin" in plugin.htpasswd.users
    assert any("keeping the last 4 users" in r.getMessage() and "line 5" in r.getMessage()
               for r in caplog.records)


def test_bcrypt_checks_run_off_the_event_loop(proxy_factory, origin, tmp_path, monkeypatch):
    """20 clients authenticate with bcrypt while every hashing is held in its thread until
    a 21st, plain request has gone through: were hashing on the event loop, nothing else
    could run until the gate opened, and the test would fail."""
    users = {f"user{n:02}": ("bcrypt", f"pw{n}") for n in range(20)}
    users["zed"] = ("apr1", "zed-pw")
    proxy, plugin, _ = _start(proxy_factory, tmp_path, users=users)
    url = origin.url("/")
    # zed's password is checked before the gate closes, and is then cached.
    assert curl("-x", proxy.url, "--proxy-user", "zed:zed-pw", url).stdout == b"hello\n"
    gate = _real_lock()
    gate.acquire()
    calls = _spy(monkeypatch, plugin, gate)
    # Connected first: connecting by name would wait for a thread of the busy pool.
    sockets = [proxy.connect() for _ in range(21)]
    try:
        def authenticate(sock, user: str, password: str) -> bytes:
            sock.sendall(_get(url, f"Proxy-Authorization: {_basic(user, password)}"))
            return ResponseReader(sock).read()[0]

        jobs = [gevent.spawn(authenticate, sockets[n], f"user{n:02}", f"pw{n}")
                for n in range(20)]
        for _ in range(1000):  # bounded: until two hashings are under way at once
            if len(calls) >= 2:
                break
            gevent.sleep(0.01)
        assert len(calls) >= 2, calls
        plain = authenticate(sockets[20], "zed", "zed-pw")
        assert plain.startswith(b"HTTP/1.1 200 "), plain
        assert not any(job.ready() for job in jobs)  # still held: the plain one went first
        gate.release()
        heads = [job.get(timeout=30) for job in jobs]
    finally:
        if gate.locked():
            gate.release()
        for sock in sockets:
            sock.close()
    assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads), heads
    assert len(calls) == 20
    assert _real_get_ident() not in calls  # each hashing ran in a thread of the pool
    records = wait_for_records(proxy, 22)
    assert sorted(r.ctx.user for r in records[1:]) == sorted(users)


def test_concurrent_checks_of_the_same_credentials_hash_once(proxy_factory, origin, tmp_path,
                                                             monkeypatch):
    recorder = HookRecorder()
    path = _write(tmp_path / "htpasswd", USERS)
    proxy = proxy_factory(f"[auth]\nhtpasswd = {path}\n",
                          plugins=[recorder] if AUTH_IS_BUILTIN else [recorder, Auth()])
    plugin = proxy.server.pm.get_plugin("auth")
    gate = _real_lock()
    gate.acquire()
    calls = _spy(monkeypatch, plugin, gate)
    sockets = [proxy.connect() for _ in range(10)]
    try:
        def authenticate(sock) -> bytes:
            sock.sendall(_get(origin.url("/"), f"Proxy-Authorization: "
                                               f"{_basic('alice', 'alice-pw')}"))
            return ResponseReader(sock).read()[0]

        jobs = [gevent.spawn(authenticate, sock) for sock in sockets]
        for _ in range(1000):  # bounded: until all ten are in on_request
            if recorder.names.count("on_request") == 10:
                break
            gevent.sleep(0.01)
        assert recorder.names.count("on_request") == 10
        gate.release()
        heads = [job.get(timeout=30) for job in jobs]
    finally:
        if gate.locked():
            gate.release()
        for sock in sockets:
            sock.close()
    assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads), heads
    assert len(calls) == 1


@pytest.mark.pure
def test_bcrypt_uses_the_first_72_bytes_as_apache_does():
    source = HtpasswdFile("-", fold_case=True, interval=2, clock=lambda: 0.0)
    password = b"x" * 72
    stored = bcrypt.using(ident="2y", rounds=4).hash(password)
    assert source.verify_hash(password + b"ignored", stored)
    assert not source.verify_hash(b"x" * 71, stored)


# -- off by default, and configuration errors ------------------------------------------------


def test_without_a_file_nothing_is_asked(proxy_factory, origin):
    proxy = proxy_factory("", plugins=[] if AUTH_IS_BUILTIN else [Auth()])
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    answer = exchange(proxy.address, _get(origin.url("/"), "Proxy-Authorization: Negotiate x",
                                          close=True))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert [r.ctx.user for r in wait_for_records(proxy, 2)] == [None, None]
    assert "proxy-authorization" not in origin.seen[-1].headers


def _load(tmp_path: Path, section: str) -> Auth:
    path = tmp_path / "auth.ini"
    plugins = "" if AUTH_IS_BUILTIN else "plugins = geproxy_plugins.auth:Auth\n"
    path.write_text(f"[geproxy]\n{plugins}access_log = off\n[auth]\n{section}")
    pm, _ = load(str(path), entry_points=False)
    return pm.get_plugin("auth")


def test_an_unreadable_file_stops_the_start(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"htpasswd = {missing}\n")
    assert (caught.value.section, caught.value.key) == ("auth", "htpasswd")
    assert str(caught.value).endswith(
        f"[auth] htpasswd: cannot read {missing}: No such file or directory")


@pytest.mark.parametrize("line, problem", [
    ("frank:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "line 3: unsupported hash for user 'frank' "
                                                "(SHA-1 {SHA}): use bcrypt (htpasswd -B)"),
    ("frank:$1$saltsalt$2vnaRpHa6Jxjz5n83ok8Z0", "line 3: unsupported hash for user 'frank' "
                                                 "($1$ hashes)"),
    ("frank:abJnggxhB/yWI", "line 3: unsupported hash for user 'frank' (DES crypt"),
    ("frank:secret", "line 3: unsupported hash for user 'frank' (plain text"),
    ("frank:$2y$05$short", "line 3: malformed bcrypt hash for user 'frank'"),
    ("frank", "line 3: not user:hash"),
    ("alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "line 3: user 'alice' is given twice"),
])
def test_an_unusable_line_stops_the_start_naming_it(tmp_path, line, problem):
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{HASHERS['bcrypt']('pw')}\n\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"htpasswd = {path}\n")
    assert (caught.value.section, caught.value.key) == ("auth", "htpasswd")
    assert problem in str(caught.value), str(caught.value)
    assert "secret" not in str(caught.value) and "W6ph" not in str(caught.value)


@pytest.mark.parametrize("realm", ['Corp "egress"', "back\\slash", "bell\x07", "tab\there",
                                   "café"])
def test_a_bad_realm_stops_the_start(tmp_path, realm):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"realm = {realm}\n")
    assert (caught.value.section, caught.value.key) == ("auth", "realm")


def test_a_file_without_users_is_valid_with_a_warning(tmp_path, caplog):
    path = tmp_path / "htpasswd"
    path.write_text("# nobody yet\n\n")
    plugin = _load(tmp_path, f"htpasswd = {path}\n")
    assert plugin.htpasswd.users == {}
    assert any("has no user" in r.getMessage() for r in caplog.records)


# -- deciding only (geproxy explain, re-checks) ----------------------------------------------


@pytest.mark.parametrize("user_case, name, outcome", [
    ("insensitive", "ALICE", "alice"),   # the default: logs in as the file writes the name
    ("insensitive", "Alice", "alice"),
    ("sensitive", "Alice", None),
    ("sensitive", "alice", "alice"),
])
def test_user_names_compare_as_user_case_says(proxy_factory, origin, tmp_path, user_case,
                                              name, outcome):
    proxy, _, _ = _start(proxy_factory, tmp_path, user_case=user_case)
    answer = exchange(proxy.address, _get(origin.url("/"),
                                          f"Proxy-Authorization: {_basic(name, 'alice-pw')}",
                                          close=True))
    if outcome is None:
        assert _challenged(answer), answer
    else:
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    # The password stays case-sensitive whatever user_case says.
    answer = exchange(proxy.address, _get(origin.url("/"),
                                          f"Proxy-Authorization: {_basic(name, 'ALICE-PW')}",
                                          close=True))
    assert _challenged(answer), answer
    records = wait_for_records(proxy, 2)
    assert [record.ctx.user for record in records] == [outcome, None]


def test_users_differing_only_by_case_are_refused_when_insensitive(tmp_path):
    path = tmp_path / "htpasswd"
    hashed = HASHERS["sha256"]("pw")
    path.write_text(f"alice:{hashed}\nAlice:{hashed}\n")
    with pytest.raises(ConfigError, match="differs from another only by case"):
        _load(tmp_path, f"htpasswd = {path}\n")
    _load(tmp_path, f"htpasswd = {path}\nuser_case = sensitive\n")


def test_deciding_only_takes_ctx_user_as_it_is_and_checks_nothing(tmp_path, monkeypatch):
    """With ``ctx.decide_only``, a user set is authenticated and kept; without one the
    challenge is the answer, even beside good credentials: none are read or hashed."""
    from geproxy import Context, Headers, Request

    plugin = _load(tmp_path, f"htpasswd = {_write(tmp_path / 'htpasswd', USERS)}\n")
    hashed: list[str] = []
    monkeypatch.setattr(plugin.htpasswd, "verify_hash",
                        lambda password, stored: hashed.append(stored))
    good = Headers([("Proxy-Authorization", _basic("alice", "alice-pw"))], frozen=True)
    tunnel = Request("CONNECT", "origin.test:443", "HTTP/1.1", good, "", "origin.test", 443)
    own_page = Request("GET", "/healthz", "HTTP/1.1", Headers(frozen=True), path="/healthz")

    def ctx(user: Optional[str]) -> Context:
        return Context(client_addr=("127.0.0.1", 1), server_addr=("127.0.0.1", 3128),
                       config=None, user=user, decide_only=True)

    alice = ctx("alice")
    assert plugin.on_request(alice, tunnel) is None and alice.user == "alice"
    named = ctx("someone")  # not in the file: taken as it is, as explain's --user is
    assert plugin.on_request(named, tunnel) is None and named.user == "someone"
    nobody = ctx(None)
    with pytest.raises(errors.AuthenticationRequired) as caught:
        plugin.on_request(nobody, tunnel)
    assert caught.value.status == 407
    assert plugin.auth_challenge(nobody, tunnel) == ['Basic realm="geproxy"']
    assert nobody.user is None
    assert plugin.on_request(ctx(None), own_page) is None  # the proxy's pages: no challenge
    assert hashed == []


def test_checks_are_counted_by_outcome_and_a_repeated_wrong_password_is_not_hashed_again(
        proxy_factory, origin, tmp_path, fake_clock, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    proxy, plugin, _ = _start(proxy_factory, tmp_path, ini="admin_listen = 127.0.0.1:0\n",
                              clock=fake_clock, negative_ttl="1m", max_failures="2")
    hashed = _spy(monkeypatch, plugin)
    url = f"http://127.0.0.1:{origin.port}/"

    def status(user: str, password: str) -> bytes:
        return curl("-i", "-x", proxy.url, "--proxy-user", f"{user}:{password}",
                    url).stdout[:12]

    assert status("alice", "alice-pw") == b"HTTP/1.1 200"  # ok
    assert status("alice", "alice-pw") == b"HTTP/1.1 200"  # cached
    for _ in range(3):
        assert status("dave", "stale-pw") == b"HTTP/1.1 407"  # failed, then remembered
    assert status("dave", "guess-2") == b"HTTP/1.1 407"  # failed: the second failure
    assert status("dave", "dave-pw") == b"HTTP/1.1 407"  # throttled, right as it is
    assert len(hashed) == 3
    fake_clock.advance(61)
    assert status("dave", "dave-pw") == b"HTTP/1.1 200"
    wait_for_records(proxy, 8)
    host, port = proxy.server.admin_address
    text = requests.get(f"http://{host}:{port}/metrics", timeout=10).text
    counted = {tuple(sorted(sample.labels.items())): sample.value
               for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "geproxy_auth_total"}
    assert counted == {
        (("result", "ok"), ("scheme", "basic")): 2.0,
        (("result", "cached"), ("scheme", "basic")): 1.0,
        (("result", "failed"), ("scheme", "basic")): 4.0,
        (("result", "throttled"), ("scheme", "basic")): 1.0,
    }
