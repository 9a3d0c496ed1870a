"""The ``auth`` plugin's LDAP directory, against a real slapd on loopback.

The directory is the kit's ``ldap_directory`` (alice in staff and admins, bob in staff,
mallory in none; each password NAME-pw). The proxy is the real one (``proxy_factory``, or
``proxy_process`` for the workers); clients are curl, requests and raw sockets. Directory
outages are made with a relay in front of slapd that a test can switch off, a silent
listener (accepts, never answers) and a closed port; slapd's own log counts the binds.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import gevent
import gevent.event
import gevent.server
import pytest
import requests

from geproxy.testing import (
    FakeClock,
    curl,
    exchange,
    free_port,
    wait_for_lines,
    wait_for_records,
    wait_until,
)
from geproxy.testing.directory import Directory

pytestmark = pytest.mark.timeout(120)

PEOPLE = "ou=people,dc=corp,dc=example"
GROUP_RULES = "[acl]\nconnect_ports = 1-65535\nrules =\n    allow group staff\n    deny all\n"
UNAVAILABLE = ('geproxy; error=proxy_internal_error; '
               'details="authentication backend unavailable"')


class Relay:
    """A TCP relay on loopback to ``target``; ``stop()`` closes it and every connection it
    carries (the server is then down: connects are refused); ``connects`` counts them."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.connects = 0
        self._open: list[socket.socket] = []
        self._pumps: list[gevent.Greenlet] = []
        self.server = gevent.server.StreamServer(("127.0.0.1", port), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, client: socket.socket, _: Any) -> None:
        self.connects += 1
        upstream = socket.create_connection(self.target, timeout=5)
        self._open += [client, upstream]

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                sock.close()

        pumps = [gevent.spawn(pump, client, upstream), gevent.spawn(pump, upstream, client)]
        self._pumps += pumps
        gevent.joinall(pumps)

    def stop(self) -> None:
        self.server.close()
        for sock in self._open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        gevent.killall(self._pumps)
        self.server.stop(timeout=1)


class Silent:
    """A listener that accepts connections and never answers; ``connects`` counts them."""

    def __init__(self) -> None:
        self.connects = 0
        self._held: list[socket.socket] = []
        self._done = gevent.event.Event()
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._hold)
        self.server.start()
        self.port = self.server.server_port

    def _hold(self, client: socket.socket, _: Any) -> None:
        self.connects += 1
        self._held.append(client)
        self._done.wait(60)

    def stop(self) -> None:
        self._done.set()
        for sock in self._held:
            sock.close()
        self.server.stop(timeout=1)


@pytest.fixture
def relays(ldap_directory: Directory):
    started: list[Any] = []

    def make(kind: str = "relay") -> Any:
        made = Relay(("127.0.0.1", ldap_directory.port)) if kind == "relay" else Silent()
        started.append(made)
        return made

    yield make
    for made in started:
        made.stop()


def _options(directory: Directory, mode: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """``[auth]`` options for a way of checking: direct (bind DN), search (service account),
    anonymous (search without an account)."""
    options = {"ldap_url": directory.url}
    if mode == "direct":
        options["ldap_bind_dn"] = f"uid={{user}},{PEOPLE}"
    else:
        options["ldap_base"] = directory.base
        if mode == "search":
            secret = tmp_path / "service.pw"
            secret.write_text(directory.service_password + "\n")
            options["ldap_bind_user"] = directory.service_dn
            options["ldap_bind_password_file"] = str(secret)
    options.update(extra)
    return options


def _start(proxy_factory, options: dict[str, str], ini: str = "",
           clock: Optional[FakeClock] = None):
    section = "[auth]\n" + "".join(f"{k} = {v}\n" for k, v in options.items())
    proxy = proxy_factory(ini + "\n" + section)
    plugin = proxy.server.pm.get_plugin("auth")
    if clock is not None:
        plugin.clock = clock
    return proxy, plugin


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _status(proxy, origin, user: str, password: str) -> tuple[int, bytes]:
    """The status and head of a plain GET through the proxy with Basic credentials."""
    head = (f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Proxy-Authorization: {_basic(user, password)}\r\n\r\n").encode()
    answer = exchange(proxy.address, head)
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[0]


def _binds_settled(directory: Directory, proxy, origin, dn: str) -> int:
    """Binds of ``dn`` slapd logged once everything before now is in its log: a sentinel
    (mallory's good password, which binds every time under ``cache_ttl = 0``) goes last."""
    sentinel = directory.user_dn("mallory")
    before = directory.binds(sentinel)
    assert _status(proxy, origin, "mallory", "mallory-pw")[0] == 200
    assert wait_until(lambda: directory.binds(sentinel) > before)
    return directory.binds(dn)


# -- passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, transport", [
    ("direct", "ldap"), ("search", "starttls"), ("search", "ldaps"), ("direct", "ldaps")])
def test_curl_and_requests_authenticate(proxy_factory, ldap_directory, origin, tls_origin,
                                        ca_file, tmp_path, mode, transport):
    extra = {"ldap_ca_file": ldap_directory.ca_file}
    if transport == "starttls":
        extra["ldap_starttls"] = "on"
    if transport == "ldaps":
        extra["ldap_url"] = ldap_directory.tls_url
    proxy, _ = _start(proxy_factory, _options(ldap_directory, mode, tmp_path, **extra))
    good = curl("-x", proxy.url, "--proxy-user", "alice:alice-pw", origin.url("/echo"))
    assert good.returncode == 0, good.stderr
    assert "proxy-authorization" not in json.loads(good.stdout)["headers"]
    bad = curl("-x", proxy.url, "--proxy-user", "alice:wrong", "-o", "/dev/null",
               "-w", "%{http_code}", origin.url("/"))
    assert bad.stdout == b"407"
    tunnel = curl("--cacert", ca_file, "-x", proxy.url, "--proxy-user", "Bob:bob-pw",
                  tls_origin.url("/echo"))
    assert tunnel.returncode == 0, tunnel.stderr
    with requests.Session() as session:
        session.trust_env = False
        proxies = {"http": f"http://carol:x@127.0.0.1:{proxy.port}"}
        with session.get(origin.url("/"), proxies=proxies, timeout=10) as response:
            assert response.status_code == 407
        proxies = {"http": f"http://bob:bob-pw@127.0.0.1:{proxy.port}"}
        with session.get(origin.url("/echo"), proxies=proxies, timeout=10) as response:
            assert response.json()["path"] == "/echo"
    records = wait_for_records(proxy, 5)
    assert sorted((r.method, r.status, r.ctx.user or "") for r in records) == sorted([
        ("GET", 200, "alice"), ("GET", 407, ""), ("CONNECT", 200, "bob"), ("GET", 407, ""),
        ("GET", 200, "bob")])


def test_a_certificate_the_ca_file_does_not_trust_is_refused(proxy_factory, ldap_directory,
                                                             origin, tmp_path, tls_ca):
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    proxy, _ = _start(proxy_factory, _options(ldap_directory, "direct", tmp_path,
                                              ldap_url=ldap_directory.tls_url,
                                              ldap_ca_file=str(other)))
    status, head = _status(proxy, origin, "alice", "alice-pw")
    assert status == 503 and f"Proxy-Status: {UNAVAILABLE}".encode() in head


@pytest.mark.parametrize("mode", ["direct", "search"])
def test_injected_names_never_authenticate(proxy_factory, ldap_directory, origin, tmp_path,
                                           mode):
    proxy, _ = _start(proxy_factory, _options(ldap_directory, mode, tmp_path))
    names = ["*", ")(uid=*", "alice)(|(uid=*", "*)(uid=alice", "alice\x00", "al\\ice",
             "alice*", "alice,ou=people", " alice"]
    for name in names:
        for password in ("alice-pw", "*"):
            assert _status(proxy, origin, name, password)[0] == 407, name
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
    if mode == "search":
        # The filter slapd was sent holds the name escaped, never as filter syntax.
        assert wait_until(lambda: 'filter="(uid=\\2A)"' in ldap_directory.log())
        assert 'filter="(uid=\\29\\28uid=\\2A)"' in ldap_directory.log()


def test_anonymous_search_finds_only_what_the_directory_shows(proxy_factory, ldap_directory,
                                                              origin, tmp_path):
    """Without a service account the search is anonymous: this directory shows people only
    to bound clients, so nobody is found (and a password is never tried)."""
    proxy, _ = _start(proxy_factory, _options(ldap_directory, "anonymous", tmp_path))
    before = ldap_directory.binds(ldap_directory.user_dn("alice"))
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 407
    assert ldap_directory.binds(ldap_directory.user_dn("alice")) == before


def test_a_repeated_wrong_password_binds_once_per_negative_ttl(proxy_factory, ldap_directory,
                                                               origin, tmp_path):
    clock = FakeClock()
    proxy, _ = _start(proxy_factory, _options(ldap_directory, "direct", tmp_path,
                                              negative_ttl="1m", max_failures="3",
                                              cache_ttl="0"),
                      clock=clock)
    bob = ldap_directory.user_dn("bob")
    start = _binds_settled(ldap_directory, proxy, origin, bob)
    for _ in range(5):
        assert _status(proxy, origin, "bob", "stale-password")[0] == 407
    assert _binds_settled(ldap_directory, proxy, origin, bob) == start + 1
    clock.advance(61)
    assert _status(proxy, origin, "bob", "stale-password")[0] == 407
    assert _binds_settled(ldap_directory, proxy, origin, bob) == start + 2
    # A guesser cycling passwords: max_failures binds in the window, then none.
    for attempt in range(8):
        assert _status(proxy, origin, "bob", f"guess-{attempt}")[0] == 407
    assert _binds_settled(ldap_directory, proxy, origin, bob) == start + 4
    # The right password is refused too until the window has passed, then taken.
    assert _status(proxy, origin, "bob", "bob-pw")[0] == 407
    clock.advance(61)
    assert _status(proxy, origin, "bob", "bob-pw")[0] == 200


def test_an_empty_password_never_reaches_the_directory(proxy_factory, ldap_directory, origin,
                                                       tmp_path):
    proxy, _ = _start(proxy_factory, _options(ldap_directory, "direct", tmp_path,
                                              cache_ttl="0"))
    alice = ldap_directory.user_dn("alice")
    start = _binds_settled(ldap_directory, proxy, origin, alice)
    assert _status(proxy, origin, "alice", "")[0] == 407
    assert _binds_settled(ldap_directory, proxy, origin, alice) == start


# -- groups ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, groups", [
    ("search", {"ldap_group_base": "ou=groups,dc=corp,dc=example"}),
    ("direct", {"ldap_group_base": "ou=groups,dc=corp,dc=example",
                "ldap_group_filter": "(&(objectClass=groupOfNames)(member=uid={user},"
                                     f"{PEOPLE}))"}),
    ("search", {"ldap_member_of": "memberOf"}),
])
def test_a_group_rule_lets_members_through(proxy_factory, ldap_directory, origin, tmp_path,
                                           mode, groups):
    proxy, plugin = _start(proxy_factory, _options(ldap_directory, mode, tmp_path, **groups),
                           ini=GROUP_RULES)
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
    assert _status(proxy, origin, "BOB", "bob-pw")[0] == 200
    assert _status(proxy, origin, "mallory", "mallory-pw")[0] == 403
    assert plugin.directory.groups("alice") == {"staff", "admins"}
    assert plugin.directory.groups("mallory") == frozenset()
    assert plugin.directory.groups("nobody)(cn=*") == frozenset()
    # No search ever ran on a connection bound as a user (a user's bind is followed by
    # the service account's before the next search): in slapd's whole log so far.
    assert _searches_as_users(ldap_directory) == []


def _searches_as_users(directory: Directory) -> list[str]:
    """slapd's SRCH lines made on a connection whose last bind was a user's."""
    bound: dict[str, str] = {}
    found = []
    for line in directory.log().splitlines():
        conn = re.search(r" (conn=\d+) op=\d+ ", line)
        if conn is None:
            continue
        bind = re.search(r' BIND dn="([^"]*)"', line)
        if bind:
            bound[conn.group(1)] = bind.group(1)
        elif " SRCH base=" in line and PEOPLE in bound.get(conn.group(1), ""):
            found.append(line)
    return found


def test_the_pool_bounds_the_connections_and_one_lookup_serves_many(
        proxy_factory, ldap_directory, origin, tmp_path, relays):
    """Many clients at once: at most ldap_pool_size connections to the directory, and the
    concurrent requests of one user cost one group lookup."""
    relay = relays()
    options = _options(ldap_directory, "search", tmp_path, ldap_pool_size="2",
                       ldap_url=f"ldap://127.0.0.1:{relay.port}",
                       ldap_group_base="ou=groups,dc=corp,dc=example")
    proxy, plugin = _start(proxy_factory, options, ini=GROUP_RULES)
    users = [("alice", 200), ("bob", 200), ("mallory", 403)] * 4
    jobs = [gevent.spawn(_status, proxy, origin, user, f"{user}-pw") for user, _ in users]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [job.value[0] for job in jobs] == [status for _, status in users]
    assert 1 <= relay.connects <= 2
    searches = ldap_directory.log().count('SRCH base="ou=groups,dc=corp,dc=example"')
    plugin.directory._groups.clear()  # expired, say
    jobs = [gevent.spawn(plugin.directory.groups, "bob") for _ in range(6)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert {job.value for job in jobs} == {frozenset({"staff"})}
    # A lookup after them all (alice's) settles the log: its search is logged last.
    plugin.directory._groups.clear()
    assert plugin.directory.groups("alice") == {"staff", "admins"}
    assert wait_until(lambda: ldap_directory.log().count(
        'SRCH base="ou=groups,dc=corp,dc=example"') >= searches + 2)
    assert ldap_directory.log().count(
        'SRCH base="ou=groups,dc=corp,dc=example"') == searches + 2


# -- when the directory fails -----------------------------------------------------------------


def test_a_directory_down_serves_from_cache_then_503(proxy_factory, ldap_directory, origin,
                                                     tmp_path, relays):
    clock = FakeClock()
    relay = relays()
    options = _options(ldap_directory, "search", tmp_path,
                       ldap_url=f"ldap://127.0.0.1:{relay.port}",
                       ldap_group_base="ou=groups,dc=corp,dc=example",
                       cache_ttl="5m", stale_ttl="15m")
    proxy, _ = _start(proxy_factory, options, ini=GROUP_RULES, clock=clock)
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
    relay.stop()
    clock.advance(6 * 60)  # past cache_ttl: the directory is asked, and nobody answers
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 200  # stale password and groups
    status, head = _status(proxy, origin, "bob", "bob-pw")  # nothing remembered
    assert status == 503 and f"\r\nProxy-Status: {UNAVAILABLE}\r\n".encode() in head
    clock.advance(15 * 60)  # past cache_ttl + stale_ttl
    status, head = _status(proxy, origin, "alice", "alice-pw")
    assert status == 503 and f"\r\nProxy-Status: {UNAVAILABLE}\r\n".encode() in head
    records = wait_for_records(proxy, 4)
    assert [r.status for r in records] == [200, 200, 503, 503]


def test_a_silent_server_times_out_and_is_skipped(proxy_factory, ldap_directory, origin,
                                                  tmp_path, relays):
    clock = FakeClock()
    silent = relays("silent")
    options = _options(ldap_directory, "direct", tmp_path, cache_ttl="0",
                       ldap_url=f"ldap://127.0.0.1:{silent.port} {ldap_directory.url}",
                       ldap_timeout="300ms")
    proxy, _ = _start(proxy_factory, options, clock=clock)
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
    assert silent.connects == 1
    for _ in range(3):  # the silent one is skipped: no request waits for it
        assert _status(proxy, origin, "bob", "bob-pw")[0] == 200
    assert silent.connects == 1
    clock.advance(60)  # the skip is over: the first server is tried again
    assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
    assert silent.connects == 2


def test_a_flapping_first_server(proxy_factory, ldap_directory, origin, tmp_path, relays):
    clock = FakeClock()
    backup = relays()
    dead = free_port()
    options = _options(ldap_directory, "direct", tmp_path, cache_ttl="0",
                       ldap_url=f"ldap://127.0.0.1:{dead} ldap://127.0.0.1:{backup.port}")
    proxy, _ = _start(proxy_factory, options, clock=clock)
    for _ in range(3):  # the first URL refuses: the second answers
        assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
    assert backup.connects == 1  # one pooled connection served them all
    first = Relay(("127.0.0.1", ldap_directory.port), port=dead)  # the first comes back
    try:
        clock.advance(60)
        assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
        assert first.connects == 1  # failed back to it
        first.stop()  # and down again: the second answers
        assert _status(proxy, origin, "alice", "alice-pw")[0] == 200
        assert backup.connects == 2
    finally:
        first.stop()


# -- workers and check-config -----------------------------------------------------------------


def test_each_worker_authenticates(proxy_process, ldap_directory, origin, tmp_path):
    log = tmp_path / "access.log"
    options = _options(ldap_directory, "direct", tmp_path)
    proxy = proxy_process(f"workers = 2\naccess_log = {log}\nlog_format = json\n[auth]\n"
                          + "".join(f"{k} = {v}\n" for k, v in options.items()))
    workers: set[str] = set()
    sent = 0
    for _ in range(40):
        for _ in range(4):
            out = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url,
                       "--proxy-user", "alice:alice-pw", origin.url("/"))
            assert out.stdout == b"200"
            sent += 1
        entries = [json.loads(line) for line in wait_for_lines(log, sent)]
        workers = {entry["conn"].partition("c")[0] for entry in entries
                   if entry.get("user") == "alice"}
        if workers == {"w0", "w1"}:
            break
    assert workers == {"w0", "w1"}


def _write_config(tmp_path: Path, options: dict[str, str], ini: str = "") -> Path:
    path = tmp_path / "check.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n" + ini + "[auth]\n"
                    + "".join(f"{k} = {v}\n" for k, v in options.items()))
    return path


def _geproxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geproxy", *args], capture_output=True,
                          text=True, timeout=30)


def test_check_config_and_explain_connect_nowhere(ldap_directory, tmp_path):
    """The directory's URL is a listener that accepts nothing: a connect to it would wait
    in its backlog, where a non-blocking accept finds it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        options = _options(ldap_directory, "search", tmp_path,
                           ldap_url=f"ldap://127.0.0.1:{listener.getsockname()[1]}",
                           ldap_group_base="ou=groups,dc=corp,dc=example")
        path = str(_write_config(tmp_path, options, ini=GROUP_RULES))
        result = _geproxy("check-config", "--config", path)
        assert result.returncode == 0, result.stderr
        explained = _geproxy("explain", "--config", path, "GET", "http://192.0.2.1/")
        assert "407" in explained.stdout, explained.stdout + explained.stderr
        # A user whose groups a rule needs: explain asks no directory, and says so ...
        explained = _geproxy("explain", "--config", path, "--user", "alice",
                             "--no-resolve", "GET", "http://192.0.2.1/")
        assert ("groups      of alice: only [acl] group_file and other groups held in "
                "memory; no directory was asked (give them with --group)"
                ) in explained.stdout, explained.stdout + explained.stderr
        # ... and the groups given decide.
        explained = _geproxy("explain", "--config", path, "--user", "alice", "--group",
                             "staff", "--no-resolve", "GET", "http://192.0.2.1/")
        assert explained.returncode == 0, explained.stdout + explained.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize("key, value, says", [
    ("ldap_url", "http://127.0.0.1:389", "not an LDAP URL"),
    ("ldap_url", "ldap://:389", "names no host"),
    ("ldap_bind_dn", "uid=alice,ou=people,dc=corp,dc=example", "has no {user}"),
    ("ldap_bind_password_file", "/nonexistent/service.pw", "cannot read"),
    ("ldap_ca_file", "/nonexistent/ca.pem", "cannot read"),
    ("ldap_group_filter", "(objectClass=groupOfNames)", "neither {dn} nor {user}"),
])
def test_config_errors_name_the_key(ldap_directory, tmp_path, key, value, says):
    options = _options(ldap_directory, "search", tmp_path,
                       ldap_group_base="ou=groups,dc=corp,dc=example")
    if key == "ldap_bind_dn":
        options = _options(ldap_directory, "direct", tmp_path)
    options[key] = value
    result = _geproxy("check-config", "--config", str(_write_config(tmp_path, options)))
    assert result.returncode != 0
    assert key in result.stderr and says in result.stderr, result.stderr
