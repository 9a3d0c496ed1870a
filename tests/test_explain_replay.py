"""``geproxy explain --replay`` and ``--cases``: an access log written by a real proxy (curl
through it: tunnels, forwarded requests, refusals by rule, by password and by the
destination guard, a malformed head), decided again by the command under the same and under
a changed configuration; policy tests passing, failing and malformed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
from passlib.hash import bcrypt

from geproxy.explain import Decider
from geproxy.testing import Origin, Proxy, curl, exchange, wait_for_lines, wait_for_records

pytestmark = pytest.mark.timeout(120)

#: curl prints the status only.
CODE = ("-o", "/dev/null", "-w", "%{http_code}")
PASSWORDS = {"alice": "alice-pw", "carol": "carol-pw"}

#: The proxy's policy: a blocked name, the staff by user, nobody else.
RULES = """\
[acl]
connect_ports = 1-65535
rules =
    blocked: deny dst blocked.test
    staff: allow user alice carol
    others: deny all
"""
#: The change: blocked.test let through, carol no longer to origin.test.
NEW_RULES = """\
[acl]
connect_ports = 1-65535
rules =
    nocarol: deny user carol dst origin.test
    staff: allow user alice carol
    others: deny all
"""
#: Without passwords: anyone, but not blocked.test.
OPEN_RULES = """\
[acl]
connect_ports = 1-65535
rules =
    blocked: deny dst blocked.test
    anyone: allow all
"""
NO_TUNNELS = """\
[acl]
connect_ports = 1-65535
rules =
    tunnels: deny method CONNECT
    anyone: allow all
"""
GUARD = "[destinations]\nallow = 127.0.0.0/8 ::1\n"


def _htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hasher = bcrypt.using(ident="2y", rounds=5)
    path.write_text("".join(f"{user}:{hasher.hash(pw)}\n" for user, pw in PASSWORDS.items()))
    return path


def _config(tmp_path: Path, name: str, text: str) -> Path:
    """A configuration for ``explain``: no access log, the policy ``text``."""
    path = tmp_path / name
    path.write_text("[geproxy]\naccess_log = off\n" + textwrap.dedent(text))
    return path


def _explain(*args: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geproxy", "explain", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def _log_lines(path: Path, count: int) -> list[str]:
    return wait_for_lines(path, count)


def _through(proxy: Proxy, sent: list[int], *args: str) -> bytes:
    """curl through ``proxy``; waits for the request's record, so lines keep their order."""
    done = curl("-x", proxy.url, *args)
    sent[0] += 1
    wait_for_records(proxy, sent[0])
    return done.stdout + done.stderr


def _traffic(proxy: Proxy, origin: Origin, auth: bool) -> list[str]:
    """The requests of the logs below, in order; returns what each got (for the record)."""
    port, sent = origin.port, [0]
    alice = ["-U", f"alice:{PASSWORDS['alice']}"] if auth else []
    carol = ["-U", f"carol:{PASSWORDS['carol']}"] if auth else []
    proxy.resolver.add("origin.test", "127.0.0.1")
    proxy.resolver.add("meta.test", "169.254.169.254")
    got = [
        _through(proxy, sent, *alice, f"http://origin.test:{port}/"),
        _through(proxy, sent, *carol, "-p", f"http://origin.test:{port}/"),
        _through(proxy, sent, *carol, *CODE, f"http://blocked.test:{port}/"),
        _through(proxy, sent, *CODE, f"http://origin.test:{port}/"),
        _through(proxy, sent, *alice, *CODE, f"http://meta.test:{port}/"),
    ]
    exchange(proxy.address, b"NOT A REQUEST\r\n\r\n")
    sent[0] += 1
    wait_for_records(proxy, sent[0])
    got.append(_through(proxy, sent, *alice, *CODE,
                        f"http://nxdomain.test:{port}/"))
    return [g.decode(errors="replace") for g in got]


@pytest.fixture
def auth_log(proxy_factory: Callable[..., Proxy], origin: Origin, tmp_path: Path
             ) -> Callable[[str], tuple[Path, Path]]:
    """``auth_log(fmt)``: the log (in ``fmt``) of a proxy with [auth] and RULES, after the
    requests of ``_traffic``; returns it and the htpasswd file."""

    def run(fmt: str) -> tuple[Path, Path]:
        htpasswd = _htpasswd(tmp_path)
        log = tmp_path / f"access.{fmt}.log"
        proxy = proxy_factory(f"access_log = {log}\nlog_format = {fmt}\n"
                              f"[auth]\nhtpasswd = {htpasswd}\n" + RULES + GUARD)
        got = _traffic(proxy, origin, auth=True)
        assert got[0] == got[1] == "hello\n", got
        assert got[2:] == ["403", "407", "403", "502"], got
        _log_lines(log, 7)
        return log, htpasswd

    return run


# -- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "geproxy"])
def test_a_changed_policy_shows_each_changed_verdict(auth_log, tmp_path, fmt):
    log, htpasswd = auth_log(fmt)
    if fmt == "json":
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(e["user"], e["status"], e["error"], e["rule"]) for e in entries] == [
            ("alice", 200, None, None), ("carol", 200, None, None),
            ("carol", 403, "http_request_denied", "blocked"),
            (None, 407, "http_request_denied", "staff"),  # the rule that asked
            ("alice", 403, "destination_ip_prohibited", None),
            (None, 400, "http_request_error", None), ("alice", 502, "dns_error", None)]
    auth = f"[auth]\nhtpasswd = {htpasswd}\n"
    new = _config(tmp_path, "new.ini", auth + NEW_RULES)
    done = _explain("--config", new, "--replay", log)
    assert done.returncode == 1, done.stdout + done.stderr
    port = re.search(r"origin\.test:(\d+)", log.read_text()).group(1)
    assert done.stdout.splitlines() == [
        f"{log}:2: allowed -> refused: 127.0.0.1 carol CONNECT origin.test:{port}, "
        "old rule -, new rule nocarol (403)",
        f"{log}:3: refused -> allowed: 127.0.0.1 carol GET http://blocked.test:{port}/, "
        "old rule blocked, new rule staff",
        f"replayed    7 requests of {log} ({fmt}): 3 unchanged, 1 allowed -> refused, "
        "1 refused -> allowed, 1 skipped, 1 undecidable",
        "skipped     1: a malformed request (400, 408, 414, 431): not a policy decision",
        "undecidable 1: the destination guard decides on a DNS answer "
        "(destination_ip_prohibited)",
        "by rule     nocarol: 1 allowed -> refused",
        "by rule     staff: 1 refused -> allowed",
        "by host     blocked.test: 1 changed",
        "by host     origin.test: 1 changed",
    ]
    assert re.search(r"replayed 7 lines in [\d.]+s \(\d+ lines/s\)", done.stderr)


def test_the_same_policy_changes_nothing(auth_log, tmp_path):
    log, htpasswd = auth_log("json")
    same = _config(tmp_path, "same.ini", f"[auth]\nhtpasswd = {htpasswd}\n" + RULES)
    done = _explain("--config", same, "--replay", log)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        f"replayed    7 requests of {log} (json): 5 unchanged, 0 allowed -> refused, "
        "0 refused -> allowed, 1 skipped, 1 undecidable")
    assert "->" not in "".join(done.stdout.splitlines()[1:])  # no change, by rule or host


@pytest.fixture
def squid_log(proxy_factory: Callable[..., Proxy], origin: Origin, tmp_path: Path) -> Path:
    """The squid-format log of a proxy without [auth], after ``_traffic``."""
    log = tmp_path / "access.squid.log"
    proxy = proxy_factory(f"access_log = {log}\nlog_format = squid\n" + OPEN_RULES + GUARD)
    got = _traffic(proxy, origin, auth=False)
    assert got[0] == got[1] == "hello\n" and got[2:] == ["403", "200", "403", "502"], got
    lines = _log_lines(log, 7)
    assert [line.split()[3] for line in lines] == [
        "TCP_MISS/200", "TCP_TUNNEL/200", "TCP_DENIED/403", "TCP_MISS/200", "TCP_DENIED/403",
        "NONE_NONE/400", "TCP_MISS/502"]
    return log


def test_the_squid_format(squid_log, tmp_path):
    port = re.search(r"origin\.test:(\d+)", squid_log.read_text()).group(1)
    done = _explain("--config", _config(tmp_path, "tunnels.ini", NO_TUNNELS),
                    "--replay", squid_log)
    assert done.returncode == 1, done.stdout + done.stderr
    # A TCP_DENIED/403 may be the policy's or the destination guard's: the two refusals
    # the new rules let through are counted apart, not guessed at.
    assert done.stdout.splitlines() == [
        f"{squid_log}:2: allowed -> refused: 127.0.0.1 - CONNECT origin.test:{port}, "
        "old rule -, new rule tunnels (403)",
        f"replayed    7 requests of {squid_log} (squid): 3 unchanged, 1 allowed -> "
        "refused, 0 refused -> allowed, 1 skipped, 2 undecidable",
        "skipped     1: a malformed request (400, 408, 414, 431): not a policy decision",
        "undecidable 2: a squid-format TCP_DENIED/403 is the policy's or the destination "
        "guard's (a DNS answer): the line does not say which",
        "by rule     tunnels: 1 allowed -> refused",
        "by host     origin.test: 1 changed",
    ]
    same = _explain("--config", _config(tmp_path, "same.ini", OPEN_RULES), "--replay",
                    squid_log, "--log-format", "squid")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "5 unchanged, 0 allowed -> refused, 0 refused -> allowed, 1 skipped, " \
           "1 undecidable" in same.stdout


def test_a_password_asked_now_of_a_request_logged_without_user_is_undecidable(
        squid_log, tmp_path):
    """The log has no user: whether the client would have sent a password, nobody knows."""
    config = _config(tmp_path, "auth.ini",
                     f"[auth]\nhtpasswd = {_htpasswd(tmp_path)}\n" + OPEN_RULES)
    done = _explain("--config", config, "--replay", squid_log)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"replayed    7 requests of {squid_log} (squid): 1 unchanged, 0 allowed -> "
        "refused, 0 refused -> allowed, 1 skipped, 5 undecidable",
        "skipped     1: a malformed request (400, 408, 414, 431): not a policy decision",
        # blocked.test is refused before any password is asked: decided, and unchanged.
        "undecidable 5: the new configuration asks for a password (407) and the log has no "
        "user",
    ]


# -- replay: what the log says, and when ------------------------------------------------------


CURFEW = textwrap.dedent('''
    from geproxy import Denied, hookimpl

    class Curfew:
        """Refuses what is decided for a time before 1,000,000 (January 1970)."""
        name = "curfew"

        @hookimpl
        def on_request(self, ctx, request):
            if ctx.decision_time() < 1_000_000:
                raise Denied("too early", rule="curfew")
            return None
''')


def _entry(when: float, user: Any = "alice", status: int = 200, error: Any = None,
           target: str = "http://example.test/", rule: Any = None) -> str:
    return json.dumps({"time": when, "client": "10.1.2.3", "user": user, "method": "GET",
                       "target": target, "status": status, "error": error, "rule": rule,
                       "upstream": "192.0.2.1:80" if status == 200 else None})


def _explain_with(path: Path, *args: Any) -> subprocess.CompletedProcess:
    """``_explain`` with ``path`` on the module path (a plugin of the test's)."""
    return subprocess.run([sys.executable, "-m", "geproxy", "explain", *map(str, args)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(path)})


def test_each_request_is_decided_for_its_logged_time(tmp_path, monkeypatch):
    (tmp_path / "curfew_mod.py").write_text(CURFEW)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "curfew.ini"
    config.write_text("[geproxy]\naccess_log = off\nplugins = curfew_mod:Curfew\n"
                      "[acl]\nrules = anyone: allow all\n")
    decider = Decider(str(config))
    assert decider.decide("GET", "http://example.test/", "10.1.2.3", at=999_999).rule == \
        "curfew"
    late = decider.decide("GET", "http://example.test/", "10.1.2.3", at=1_000_001)
    assert late.answer.allowed and late.rule == "anyone"
    log = tmp_path / "access.log"
    log.write_text("\n".join([_entry(999_000), _entry(2_000_000),
                              _entry(5, status=403, error="http_request_denied",
                                     rule="old")]) + "\n")
    done = _explain_with(tmp_path, "--config", config, "--replay", log)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[:2] == [
        f"{log}:1: allowed -> refused: 10.1.2.3 alice GET http://example.test/, old rule -, "
        "new rule curfew (403)",
        f"replayed    3 requests of {log} (json): 2 unchanged, 1 allowed -> refused, "
        "0 refused -> allowed, 0 skipped, 0 undecidable"]


@pytest.mark.pure
@pytest.mark.parametrize("fields, kind, reason", [
    ({"status": 200, "upstream": "192.0.2.1:443"}, "allowed", ""),
    ({"status": 404, "upstream": "192.0.2.1:80"}, "allowed", ""),  # the origin's
    ({"status": 503, "upstream": "192.0.2.1:80"}, "allowed", ""),
    ({"status": 502, "error": "dns_error"}, "allowed", ""),
    ({"status": 504, "error": "http_response_timeout"}, "allowed", ""),
    ({"status": 502, "error": "proxy_loop_detected"}, "allowed", ""),
    ({"status": 403, "error": "http_request_denied", "rule": "r"}, "refused", ""),
    ({"status": 407, "error": "http_request_denied"}, "refused", ""),
    ({"status": 451}, "refused", ""),  # a plugin's own answer: nothing was connected
    ({"status": 403, "error": "destination_ip_prohibited"}, "guard", ""),
    ({"status": 200, "error": "http_request_denied", "rule": "sni_deny"}, "undecidable",
     "tunnel data"),
    ({"status": 503, "error": "connection_limit_reached"}, "undecidable", "connection limit"),
    ({"status": 500, "error": "proxy_internal_error"}, "undecidable", "internal error"),
    ({"status": 0}, "undecidable", "no answer"),
    ({"status": 502, "error": "made_up_error"}, "undecidable", "unknown error"),
    ({"status": 400, "error": "http_request_error"}, "skipped", "malformed"),
    ({"status": 431, "error": "http_request_error"}, "skipped", "malformed"),
    ({"method": "-", "target": "-", "status": 408}, "skipped", "malformed"),
    ({"method": "-", "target": "-", "status": 0}, "skipped", "no request"),
    ({"method": "-", "target": "-", "status": 0, "error": "http_request_denied"},
     "refused_at_connect", ""),
])
def test_what_a_json_line_says(fields, kind, reason):
    from geproxy.explain.logs import json_request

    line = json.dumps({"time": 5.0, "client": "10.1.2.3", "user": None, "method": "GET",
                       "target": "http://a.test/", "error": None, "upstream": None,
                       **fields})
    logged = json_request(3, line)
    assert (logged.kind, logged.reason) == (kind, reason)
    assert (logged.number, logged.time, logged.user) == (3, 5.0, None)


@pytest.mark.pure
@pytest.mark.parametrize("result, method, hierarchy, kind, reason", [
    ("TCP_MISS/200", "GET", "HIER_DIRECT/192.0.2.1", "allowed", ""),
    ("TCP_TUNNEL/200", "CONNECT", "HIER_DIRECT/192.0.2.1", "allowed", ""),
    ("TCP_MISS/502", "GET", "HIER_NONE/-", "allowed", ""),  # a DNS error, say
    ("TCP_MISS/403", "GET", "HIER_DIRECT/192.0.2.1", "allowed", ""),  # the origin's 403
    ("TCP_MISS/403", "GET", "HIER_NONE/-", "refused", ""),  # a plugin's own answer
    ("TCP_DENIED/407", "GET", "HIER_NONE/-", "refused", ""),
    ("TCP_DENIED/403", "GET", "HIER_NONE/-", "denied", ""),
    ("TCP_DENIED/200", "CONNECT", "HIER_DIRECT/192.0.2.1", "undecidable", "tunnel data"),
    ("TCP_DENIED/000", "-", "HIER_NONE/-", "refused_at_connect", ""),
    ("NONE_NONE/400", "-", "HIER_NONE/-", "skipped", "malformed"),
    ("NONE_NONE/503", "CONNECT", "HIER_NONE/-", "undecidable", "connection limit"),
    ("NONE_NONE/500", "CONNECT", "HIER_NONE/-", "undecidable", "internal error"),
    ("TCP_MISS_ABORTED/000", "GET", "HIER_DIRECT/192.0.2.1", "undecidable", "no answer"),
])
def test_what_a_squid_line_says(result, method, hierarchy, kind, reason):
    from geproxy.explain.logs import sniff, squid_request

    line = (f"1000.500    250 10.1.2.3 {result} 120 {method} http://a.test/ bob%20b "
            f"{hierarchy} text/html")
    assert sniff(line) == "squid"
    logged = squid_request(7, line)
    assert (logged.kind, logged.reason) == (kind, reason)
    assert (logged.time, logged.user, logged.client) == (1000.25, "bob b", "10.1.2.3")


def test_a_client_refused_at_connect(tmp_path):
    """No request was read: only on_connect can be asked again."""
    closed = _entry(1.0, user=None, status=0, error="http_request_denied", target="-")
    log = tmp_path / "access.log"
    log.write_text(closed.replace('"method": "GET"', '"method": "-"') + "\n")
    still = _config(tmp_path, "still.ini", "[acl]\nrefuse_at_connect = close\n"
                    "rules =\n    office: allow src 192.0.2.0/24\n")
    done = _explain("--config", still, "--replay", log)
    assert done.returncode == 0 and " 1 unchanged," in done.stdout, done.stdout + done.stderr
    opened = _config(tmp_path, "opened.ini", "[acl]\nrules =\n    anyone: allow all\n")
    done = _explain("--config", opened, "--replay", log)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "undecidable 1: refused at connect, before its request was read" in done.stdout


def test_unreadable_lines_are_counted_then_stop_the_replay(tmp_path):
    config = _config(tmp_path, "open.ini", OPEN_RULES)
    log = tmp_path / "access.log"
    good = _entry(1.0)
    log.write_text(f"{good}\n{{not json\n\n{good}\n" + '{"client": "10.1.2.3"}\n')
    done = _explain("--config", config, "--replay", log)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{log}:2: not a json access-log line: not JSON" in done.stderr
    assert f"{log}:5: not a json access-log line: no method, target, status" in done.stderr
    assert done.stdout.splitlines()[0].endswith("; 2 unreadable lines")
    done = _explain("--config", config, "--replay", log, "--max-bad-lines", "1")
    assert done.returncode == 2 and "more than 1 unreadable lines, stopped" in done.stderr
    missing = _explain("--config", config, "--replay", tmp_path / "nothing.log")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    (tmp_path / "combined.log").write_text(
        '127.0.0.1 - - [07/Dec/2026:10:00:00 +0000] "GET http://a.test/ HTTP/1.1" 200 5 '
        '"-" "curl"\n')
    other = _explain("--config", config, "--replay", tmp_path / "combined.log")
    assert other.returncode == 2 and "combined.log:1: not a line of the json" in other.stderr


def test_the_command_line_wants_one_of_request_replay_cases(tmp_path):
    config = _config(tmp_path, "open.ini", OPEN_RULES)
    for args, message in [
            ((), "METHOD and TARGET are required"),
            (("--replay", "x.log", "GET", "http://a.test/"), "--replay takes no METHOD"),
            (("--cases", "c.txt", "--user", "bob"), "--cases takes the client and user")]:
        done = _explain("--config", config, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    done = _explain("--config", config, "--replay", "x.log", "--cases", "c.txt")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    done = _explain("--config", config, "GET", "http://a.test/", "--no-resolve")
    assert done.returncode == 0 and "verdict     allowed" in done.stdout


# -- cases ----------------------------------------------------------------------------------


CASES = """\
# What the policy is for: kept with it, run in CI.
127.0.0.1 alice CONNECT origin.test:443 -> allow rule staff
127.0.0.1 carol GET http://blocked.test/ -> deny rule blocked
127.0.0.1 - GET http://origin.test/ -> 407   # no user: asked for a password
10.9.9.9 dave GET http://origin.test/ -> 403 rule others

127.0.0.1 alice CONNECT origin.test:443 -> 200
"""


@pytest.fixture
def cases_config(tmp_path: Path) -> Path:
    return _config(tmp_path, "policy.ini", f"[auth]\nhtpasswd = {_htpasswd(tmp_path)}\n"
                   + RULES)


def test_cases_that_hold(cases_config, tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text(CASES)
    done = _explain("--config", cases_config, "--cases", cases)
    assert (done.returncode, done.stdout) == (0, "5 cases passed\n"), done.stderr


def test_the_first_case_that_fails_stops_the_run(cases_config, tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text(CASES + "127.0.0.1 alice GET http://blocked.test/ -> allow\n"
                     "127.0.0.1 bogus GET http://blocked.test/ -> allow\n")
    done = _explain("--config", cases_config, "--cases", cases)
    assert (done.returncode, done.stdout) == (
        1, f"{cases}:8: expected allow, got deny (rule blocked)\n"), done.stderr
    cases.write_text("127.0.0.1 alice GET http://origin.test/ -> deny rule staff\n")
    done = _explain("--config", cases_config, "--cases", cases)
    assert (done.returncode, done.stdout) == (
        1, f"{cases}:1: expected deny rule staff, got allow (rule staff)\n")
    cases.write_text("127.0.0.1 alice GET http://origin.test/ -> allow rule others\n")
    done = _explain("--config", cases_config, "--cases", cases)
    assert (done.returncode, done.stdout) == (
        1, f"{cases}:1: expected allow rule others, got allow (rule staff)\n")


@pytest.mark.parametrize("line, message", [
    ("127.0.0.1 alice CONNECT origin.test:443 allow", "no '->'"),
    ("127.0.0.1 CONNECT origin.test:443 -> allow",
     "the request is CLIENT USER METHOD TARGET [at TIME], not 3 words"),
    ("alice-pc alice CONNECT origin.test:443 -> allow", "not a client address: 'alice-pc'"),
    ("127.0.0.1 alice connect origin.test:443 -> allow", "not a method: 'connect'"),
    ("127.0.0.1 alice CONNECT origin.test:443 -> maybe", "expected allow, deny or a status"),
    ("127.0.0.1 alice CONNECT origin.test:443 -> allow because",
     "after 'allow' only 'rule ID' may follow"),
    ("127.0.0.1 alice CONNECT origin.test:443 ->", "nothing after '->'"),
])
def test_a_malformed_case_is_an_error_with_its_line(cases_config, tmp_path, line, message):
    cases = tmp_path / "cases.txt"
    cases.write_text(CASES + line + "\n")  # after cases that pass, before any runs
    done = _explain("--config", cases_config, "--cases", cases)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.startswith(f"{cases}:8: {message}"), done.stderr
