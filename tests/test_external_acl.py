"""Squid's external ACL helpers: the ``external`` plugin and the ``acl`` condition
``external NAME [ARG...]``.

Real helper programs (one Python script written by each test, run with sys.executable, its
behaviour chosen by its first argument) driven by a real proxy with curl. Each helper writes
what it sees into its state directory: ``started`` (a line per process: PID and parent PID),
``lines`` (a line per question: PID and the fields), so that the tests can tell what was
asked, by which process, and that nothing started where nothing may.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import gevent
import pytest
from geproxy_plugins.external import parse_helper
from geproxy_plugins.external.protocol import encode, parse_answer, parse_format, request_line
from passlib.hash import bcrypt

from geproxy import ConfigError, Context, Headers, Request
from geproxy.policy.plugins import load
from geproxy.testing import curl, echo, kit_ini, open_tunnel, wait_for_records

pytestmark = pytest.mark.timeout(60)

HELPER = r'''
import os, sys, threading, time
mode, state = sys.argv[1], sys.argv[2]
channels = "--channels" in sys.argv
with open(os.path.join(state, "started"), "a") as f:
    f.write(f"{os.getpid()} {os.getppid()}\n")
groups = {}
if os.path.exists(os.path.join(state, "groups")):
    for line in open(os.path.join(state, "groups")):
        name, _, users = line.partition(":")
        for user in users.split():
            groups.setdefault(user, set()).add(name.strip())
lock = threading.Lock()
held = []

def reply(channel, text):
    with lock:
        sys.stdout.write((channel + " " if channel is not None else "") + text + "\n")
        sys.stdout.flush()

def answer(fields):
    if mode == "groups":                       # %LOGIN GROUP...: ext_file_userip's way
        mine = groups.get(fields[0], set())
        if mine & set(fields[1:]):
            return "OK " + " ".join("group=" + g for g in sorted(mine))
        return "ERR message=not%20a%20member"
    if mode == "userip":                       # %SRC %DST: a session helper naming the user
        if fields[1] == "127.0.0.1":
            return 'OK user="helper user" group=via-helper'
        return "ERR"
    if mode == "bh":
        return "BH message=broken"
    if mode == "same":                         # FIELD ARG: whether they are equal
        return "OK" if fields[0] == fields[1] else "ERR"
    if mode == "hang" and fields[0].endswith("/hang"):
        time.sleep(3600)
    if mode == "slow":
        time.sleep(1)
    if mode == "echo":                          # %PATH: the user says which question it was
        return "OK user=u" + fields[0].replace("/", "-")
    return "OK"

count = 0
for raw in sys.stdin:
    words = raw.split()
    channel = words.pop(0) if channels else None
    count += 1
    with lock, open(os.path.join(state, "lines"), "a") as f:
        f.write(f"{os.getpid()} {' '.join(words)}\n")
    if mode == "crash" and count > 2:
        sys.exit(3)                             # dies on its third question, unanswered
    if mode == "echo" and channels and words[0].endswith("/first"):
        held.append((channel, words))           # answered after the next one: out of order
        continue
    reply(channel, answer(words))
    for channel, words in held:
        reply(channel, answer(words))
    held.clear()
'''


@pytest.fixture
def helper(tmp_path: Path) -> Callable[..., Any]:
    """``helper(mode, *flags)``: (the command line, its state directory)."""
    script = tmp_path / "helper.py"
    script.write_text(HELPER)
    made: list[Path] = []

    def make(mode: str, *flags: str) -> tuple[str, Path]:
        state = tmp_path / f"state-{mode}-{len(made)}"
        state.mkdir()
        made.append(state)
        return f"{sys.executable} {script} {mode} {state} {' '.join(flags)}", state

    return make


def _lines(state: Path, name: str) -> list[list[str]]:
    path = state / name
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _wait(condition: Callable[[], Any], limit: float = 10) -> Any:
    """Poll ``condition`` until it is true, at most ``limit`` seconds."""
    with gevent.Timeout(limit, AssertionError("condition not met in time")):
        while True:
            found = condition()
            if found:
                return found
            gevent.sleep(0.02)


def _ini(helpers: str, rules: str, extra: str = "") -> str:
    return f"[external]\nhelpers =\n    {helpers}\n[acl]\nrules =\n    {rules}\n    deny all\n" \
        + extra


def _status(proxy: Any, url: str, *args: str) -> tuple[int, str]:
    out = curl("-s", "-o", "/dev/null", "-D", "-", "-x", proxy.url, *args, url)
    head = out.stdout.decode("latin-1")
    return int(head.split()[1]) if head else 0, head


# -- the line format and the answers: no I/O -------------------------------------------------


def test_values_are_encoded_as_squid_encodes_them_for_helpers():
    assert encode("") == "-" and encode(None) == "-"
    assert encode("alice") == "alice"
    assert encode("a b\tc\n") == "a%20b%09c%0A"
    assert encode('"%<>') == "%22%25%3C%3E"
    assert encode("é") == "%C3%A9"
    assert encode("http://h:80/p?q=1&r") == "http://h:80/p?q=1&r"


def test_the_line_holds_the_format_fields_then_the_arguments():
    fmt = parse_format("%LOGIN %SRC %DST %PORT %METHOD %URI %PATH %>ha{User-Agent}")
    ctx = Context(client_addr=("10.1.2.3", 5555), server_addr=("127.0.0.1", 3128), config=None)
    request = Request("GET", "http://example.org/a b", "HTTP/1.1",
                      Headers([("User-Agent", "curl/8 x")]), "http", "example.org", 80, "/a b")
    fields = fmt.fields(ctx, request, None)
    assert request_line(fields, ["staff", "two words"]) == (
        "- 10.1.2.3 example.org 80 GET http://example.org/a%20b /a%20b curl/8%20x "
        "staff two%20words")
    connect = Request("CONNECT", "example.org:443", "HTTP/1.1", Headers(), "", "example.org",
                      443, "")
    assert fmt.fields(ctx, connect, "bob")[:6] == [
        "bob", "10.1.2.3", "example.org", "443", "CONNECT", "example.org:443"]


def test_answers_parse_with_channel_ids_quotes_and_percent_encoding():
    answer = parse_answer('7 OK user="al \\"x\\" ice" group=staff group=a%20b log=z\n', True)
    assert (answer.channel, answer.match, answer.user) == (7, True, 'al "x" ice')
    assert answer.groups == {"staff", "a b"} and answer.log == "z"
    assert parse_answer("ERR message=no%20way", False).message == "no way"
    assert parse_answer("BH", False).result == "BH"
    for bad, channels in (("MAYBE", False), ("OK", True), ('OK user="open', False), ("", False)):
        with pytest.raises(ValueError):
            parse_answer(bad, channels)


def test_a_helper_line_with_options_and_squid_spellings():
    defaults = {"ttl": 60.0, "negative_ttl": 5.0, "children": 2, "concurrency": 0,
                "timeout": 3.0, "cache": 100}
    spec = parse_helper("grp ttl=30 children-max=4 concurrency=10 negative_ttl=250ms: "
                        "%LOGIN %DST: /usr/bin/check -f '/etc/a b'", defaults)
    assert (spec.name, spec.ttl, spec.children, spec.concurrency, spec.negative_ttl,
            spec.timeout) == ("grp", 30.0, 4, 10, 0.25, 3.0)
    assert spec.argv == ("/usr/bin/check", "-f", "/etc/a b")
    assert spec.format.needs_login
    for bad, said in (("grp %LOGIN /bin/x", "NAME"), ("grp: %LOGON: /bin/x", "%LOGIN"),
                      ("grp tll=3: %SRC: /bin/x", "ttl"), ("grp: %SRC: ", "no command")):
        with pytest.raises(ValueError, match=said):
            parse_helper(bad, defaults)


# -- configuration ------------------------------------------------------------------------


def _load_error(tmp_path: Path, ini: str) -> str:
    path = tmp_path / "bad.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:0\n" + ini)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    return str(caught.value)


def test_config_errors_name_the_key_the_line_and_a_suggestion(tmp_path):
    said = _load_error(tmp_path, _ini("group_check: %LOGIN: /bin/true",
                                      "allow external group_chek staff"))
    assert "[acl] rules" in said and "group_chek" in said and "group_check" in said
    assert "bad.ini:8" in said, said  # the rule's own line
    said = _load_error(tmp_path, _ini("group_check: %LOGIN %DSTT: /bin/true", "allow all"))
    assert "[external] helpers" in said and "%DSTT" in said and "%DST" in said
    assert "bad.ini:5" in said, said  # the helper's own line


# -- decisions by a real helper ----------------------------------------------------------


def _users(tmp_path: Path) -> str:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.using(ident="2y", rounds=4)
    path.write_text("".join(f"{user}:{hashed.hash(user + '-pw')}\n"
                            for user in ("alice", "bob", "carol")))
    return f"[auth]\nhtpasswd = {path}\nrequire = rules\n"


def test_login_helper_decides_and_its_groups_reach_group_conditions(proxy_factory, origin,
                                                                    helper, tmp_path):
    command, state = helper("groups")
    (state / "groups").write_text("staff: alice carol\nadmins: alice\n")
    proxy = proxy_factory(_ini(f"grp: %LOGIN: {command}",
                               "admin: allow external grp staff group admins",
                               _users(tmp_path)))
    assert not (state / "started").exists()  # nothing before the first question
    status, head = _status(proxy, origin.url("/"))
    assert status == 407 and "Proxy-Authenticate: Basic" in head  # %LOGIN asks for a user
    assert _status(proxy, origin.url("/"), "-U", "alice:alice-pw")[0] == 200
    assert _status(proxy, origin.url("/"), "-U", "carol:carol-pw")[0] == 403  # not admins
    assert _status(proxy, origin.url("/"), "-U", "bob:bob-pw")[0] == 403  # ERR
    assert [line[1:] for line in _lines(state, "lines")] == [
        ["alice", "staff"], ["carol", "staff"], ["bob", "staff"]]


def test_user_named_by_the_helper_is_the_request_user(proxy_factory, origin, helper):
    command, state = helper("userip")
    proxy = proxy_factory(_ini(f"ip: %SRC %DST: {command}", "allow external ip group via-helper"))
    assert _status(proxy, origin.url("/"))[0] == 200
    record = wait_for_records(proxy, 1)[-1]
    assert (record.status, record.ctx.user) == (200, "helper user")
    assert _lines(state, "lines")[0][1:] == ["127.0.0.1", "127.0.0.1"]


def test_ok_and_err_are_remembered_for_ttl_and_negative_ttl(proxy_factory, origin, helper,
                                                           fake_clock, tmp_path):
    command, state = helper("groups")
    (state / "groups").write_text("staff: alice\n")
    proxy = proxy_factory(_ini(f"grp ttl=60 negative_ttl=10: %LOGIN: {command}",
                               "allow external grp staff", _users(tmp_path)))
    proxy.server.pm.get_plugin("external").clock = fake_clock
    asked = lambda: len(_lines(state, "lines"))  # noqa: E731
    for _ in range(3):
        assert _status(proxy, origin.url("/"), "-U", "alice:alice-pw")[0] == 200
        assert _status(proxy, origin.url("/"), "-U", "bob:bob-pw")[0] == 403
    assert asked() == 2
    fake_clock.advance(11)  # past negative_ttl, within ttl
    assert _status(proxy, origin.url("/"), "-U", "alice:alice-pw")[0] == 200
    assert _status(proxy, origin.url("/"), "-U", "bob:bob-pw")[0] == 403
    assert [line[1] for line in _lines(state, "lines")] == ["alice", "bob", "bob"]
    fake_clock.advance(60)
    assert _status(proxy, origin.url("/"), "-U", "alice:alice-pw")[0] == 200
    assert asked() == 4


def test_channel_ids_match_answers_given_out_of_order(proxy_factory, origin, helper):
    command, state = helper("echo", "--channels")
    proxy = proxy_factory(_ini(f"echo children=1 concurrency=5: %PATH: {command}",
                               "allow external echo"))
    first = gevent.spawn(_status, proxy, origin.url("/first"))
    _wait(lambda: _lines(state, "lines"))  # held by the helper until the next question
    assert _status(proxy, origin.url("/second"))[0] == 200
    assert first.get(timeout=20)[0] == 200
    users = {record.target.rsplit("/", 1)[1]: record.ctx.user
             for record in wait_for_records(proxy, 2)}
    assert users == {"first": "u-first", "second": "u-second"}
    assert len({line[0] for line in _lines(state, "lines")}) == 1  # one process, both asked


def test_children_answer_in_parallel(proxy_factory, origin, helper):
    command, state = helper("slow")
    proxy = proxy_factory(_ini(f"slow children=3 ttl=0 negative_ttl=0: %PATH: {command}",
                               "allow external slow"))
    jobs = [gevent.spawn(_status, proxy, origin.url(f"/{n}")) for n in range(3)]
    assert [job.get(timeout=30)[0] for job in jobs] == [200] * 3
    assert len({line[0] for line in _lines(state, "lines")}) == 3  # three processes


def test_a_crashed_helper_is_restarted(proxy_factory, origin, helper):
    command, state = helper("crash")
    proxy = proxy_factory(_ini(f"crash children=1 ttl=0 negative_ttl=0: %PATH: {command}",
                               "allow external crash"))
    plugin = proxy.server.pm.get_plugin("external")
    assert [_status(proxy, origin.url(f"/{n}"))[0] for n in range(2)] == [200, 200]
    status, head = _status(proxy, origin.url("/2"))  # its third question: it dies
    assert status == 503 and 'details="external ACL helper unavailable"' in head
    _wait(lambda: not plugin.helpers["crash"].pids)
    assert _status(proxy, origin.url("/3"))[0] == 200
    assert len(_lines(state, "started")) == 2


def test_a_hung_helper_gets_503_is_killed_and_restarted(proxy_factory, origin, helper):
    command, state = helper("hang")
    proxy = proxy_factory(_ini(f"hang children=1 timeout=1s ttl=0: %PATH: {command}",
                               "allow external hang"))
    status, head = _status(proxy, origin.url("/hang"))
    assert status == 503
    assert ("Proxy-Status: geproxy; error=proxy_internal_error; "
            'details="external ACL helper unavailable"') in head
    hung = int(_lines(state, "started")[0][0])
    _wait(lambda: not _alive(hung))  # killed by its PID
    assert _status(proxy, origin.url("/fine"))[0] == 200
    assert len(_lines(state, "started")) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie not reaped yet is dead too.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bh_answers_503_and_is_never_remembered(proxy_factory, origin, helper):
    command, state = helper("bh")
    proxy = proxy_factory(_ini(f"bh: %DST: {command}", "allow external bh"))
    for _ in range(2):
        status, head = _status(proxy, origin.url("/"))
        assert status == 503 and 'details="external ACL helper unavailable"' in head
    assert len(_lines(state, "lines")) == 2


def test_stopping_the_proxy_stops_its_helpers(proxy_factory, origin, helper):
    command, state = helper("ok")
    proxy = proxy_factory(_ini(f"ok children=2: %DST: {command}", "allow external ok"))
    assert _status(proxy, origin.url("/"))[0] == 200
    pid = int(_lines(state, "started")[0][0])
    proxy.server.stop(timeout=2)
    _wait(lambda: not _alive(pid))


# -- where nothing starts; workers ----------------------------------------------------------


def test_check_config_and_explain_start_no_helper(tmp_path, helper):
    command, state = helper("ok")
    path = tmp_path / "g.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n"
                    + _ini(f"ok: %DST: {command}", "allow external ok"))
    geproxy = [sys.executable, "-m", "geproxy"]
    checked = subprocess.run([*geproxy, "check-config", "-c", str(path)],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    explained = subprocess.run([*geproxy, "explain", "-c", str(path), "GET",
                                "http://example.org/"], capture_output=True, text=True,
                               timeout=30)
    assert "runs no external ACL helper" in explained.stdout, explained
    assert not (state / "started").exists()


def test_each_worker_starts_its_own_helpers_lazily(proxy_process, origin, helper):
    command, state = helper("ok")
    proxy = proxy_process("workers = 2\n" + _ini(f"ok children=1: %PATH: {command}",
                                                 "allow external ok"))
    parents: set[str] = set()
    for n in range(60):  # new connections each: the kernel spreads them over the workers
        assert _status(proxy, origin.url(f"/{n}"))[0] == 200
        parents = {line[1] for line in _lines(state, "started")}
        if len(parents) == 2 and n >= 4:
            break
    assert len(parents) == 2 and str(proxy.process.pid) not in parents


def test_the_reload_recheck_asks_helpers_and_closes_only_what_they_refuse(proxy_factory,
                                                                           raw_origin,
                                                                           helper):
    """reload_tunnels = recheck: a condition new to an open tunnel is asked of the helper in
    the worker (a tunnel is not closed only because nobody asked); its answer decides."""
    command, state = helper("same")
    revoked, kept = raw_origin(echo), raw_origin(echo)
    proxy = proxy_factory("[acl]\nconnect_ports = 1-65535\nrules = allow all\n")
    tunnels = []
    for server in (revoked, kept):
        sock, head = open_tunnel(proxy, f"127.0.0.1:{server.port}")
        assert head.startswith(b"HTTP/1.1 200 "), head
        tunnels.append(sock)
    try:
        with open(proxy.server.config.path, "w", encoding="utf-8") as handle:
            handle.write(kit_ini("reload_tunnels = recheck\n" + _ini(
                f"same: %PORT: {command}", f"deny external same {revoked.port}\n    allow all",
                "connect_ports = 1-65535\n")))
        assert proxy.server.reload()
        for sock in tunnels:
            sock.settimeout(10)
        assert _recv_or_closed(tunnels[0]) == b""
        tunnels[1].sendall(b"ping")
        assert tunnels[1].recv(100) == b"ping"
        # The recheck asks about one tunnel after the other: the kept one's question may
        # still be on its way to the helper when the revoked one is already closed.
        _wait(lambda: len(_lines(state, "lines")) >= 2)
        assert sorted(line[1] for line in _lines(state, "lines")) == sorted(
            [str(revoked.port), str(kept.port)])
        tunnels[1].sendall(b"still open")  # its answer allowed it: it relays on
        assert tunnels[1].recv(100) == b"still open"
    finally:
        for sock in tunnels:
            sock.close()


def _recv_or_closed(sock: Any) -> bytes:
    try:
        return sock.recv(100)
    except OSError:
        return b""


def test_a_negated_external_condition_and_one_in_a_named_list(proxy_factory, origin, helper,
                                                               tmp_path):
    command, state = helper("same")
    proxy = proxy_factory(_ini(f"same: %PORT: {command}",
                               f"deny !external same {origin.port}\n    allow @mine",
                               "lists = mine: external same " + str(origin.port) + "\n"))
    assert _status(proxy, origin.url("/"))[0] == 200
    closed = f"http://127.0.0.1:{origin.port + 1 if origin.port < 65535 else 1}/"
    assert _status(proxy, closed)[0] == 403  # ERR, negated: denied before any connect
    assert len(_lines(state, "lines")) == 2  # one question per request: the answer is kept
    said = _load_error(tmp_path, _ini("same: %PORT: /bin/true", "allow @mine",
                                      "lists = mine: external sam 80\n"))
    assert "[acl] lists" in said and "'same'" in said and "bad.ini:10" in said, said


def test_a_full_queue_answers_503_at_once(proxy_factory, origin, helper):
    """children=1, concurrency=0: one question in flight, two waiting (twice the slots);
    the next is refused without waiting."""
    command, state = helper("hang")
    proxy = proxy_factory(_ini(f"hang children=1 timeout=2s ttl=0: %PATH: {command}",
                               "allow external hang"))
    plugin = proxy.server.pm.get_plugin("external")
    hung = gevent.spawn(_status, proxy, origin.url("/hang"))
    _wait(lambda: _lines(state, "lines"))
    queued = [gevent.spawn(_status, proxy, origin.url(f"/{n}")) for n in range(2)]
    _wait(lambda: plugin.helpers["hang"].waiting == 2)
    status, head = _status(proxy, origin.url("/one-too-many"))
    assert status == 503 and 'details="external ACL helper unavailable"' in head
    assert hung.get(timeout=20)[0] == 503  # its timeout: killed
    assert [job.get(timeout=20)[0] for job in queued] == [200, 200]  # a new process answers
