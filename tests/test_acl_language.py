"""The ``[acl]`` language a Squid admin writes: negation, credentials asked only when a rule
needs a user, groups, named and ``file:`` lists, quoted values, ``url_regex``, ``path``,
``time``; through a real proxy with curl, which connects from 127.0.0.1 or, with
``--interface``, from another loopback address (the "outside" client of the examples).
"""

from __future__ import annotations

import datetime
import logging
import os
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import gevent
import pytest
from passlib.hash import sha256_crypt

from geproxy import ConfigError, Context, Headers, Request, hookimpl
from geproxy.policy.plugins import load
from geproxy.testing import StaticResolver, curl, wait_for_lines, wait_for_records

pytestmark = pytest.mark.timeout(60)

NAMES = ("origin.test", "blocked.test", "ads.blocked.test", "other.test", "api.test")
INSIDE, OUTSIDE = "127.0.0.1", "127.0.0.2"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


def _htpasswd(directory: Path) -> Path:
    path = directory / "htpasswd"
    path.write_text("".join(f"{user}:{sha256_crypt.using(rounds=5000).hash(pw)}\n"
                            for user, pw in PASSWORDS.items()))
    return path


def _write(path: Path, text: str) -> Path:
    """Replaced by rename, as editors do: a reader sees the old file or the new one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)
    return path


def _start(proxy_factory, tmp_path: Path, rules: str, auth: Optional[str] = "",
           acl: str = "", **sections: str):
    """A proxy with these ``[acl] rules``; ``auth`` None: no [auth] section, else the
    htpasswd of PASSWORDS and these extra [auth] lines."""
    ini = "[acl]\nconnect_ports = 1-65535\nrules =\n"
    ini += textwrap.indent(textwrap.dedent(rules).strip(), "    ") + "\n"
    ini += textwrap.dedent(acl)
    if auth is not None:
        ini += f"\n[auth]\nhtpasswd = {_htpasswd(tmp_path)}\n" + textwrap.dedent(auth)
    for name, body in sections.items():
        ini += f"\n[{name}]\n" + textwrap.dedent(body)
    resolver = StaticResolver({name: ["127.0.0.1"] for name in NAMES})
    return proxy_factory(ini, resolver=resolver)


def _curl(proxy, url: str, user: Optional[str] = None, source: str = INSIDE,
          password: Optional[str] = None, tunnel: bool = False) -> int:
    """The status curl got from the proxy (the CONNECT's when ``tunnel``, the final one
    otherwise; 0 when it got none)."""
    args = ["-o", "/dev/null", "-w", "%{http_connect} %{http_code}", "--interface", source,
            "-x", proxy.url]
    if tunnel:
        args.append("-p")
    if user is not None:
        args += ["--proxy-user", f"{user}:{password or PASSWORDS.get(user, 'x')}",
                 "--proxy-basic"]
    out = curl(*args, url)
    connect, code = out.stdout.decode().split()
    return int(connect if tunnel and connect != "200" else code)


# -- the example ------------------------------------------------------------------


@pytest.mark.parametrize("require", ["always", "rules"])
def test_outside_gets_403_inside_gets_407_then_200(proxy_factory, tmp_path, origin, require):
    proxy = _start(proxy_factory, tmp_path, f"""
        deny !src {INSIDE}/32
        allow user *
        deny all
    """, auth=f"require = {require}\n")
    url = origin.url("/", host="origin.test")
    assert _curl(proxy, url, source=OUTSIDE) == 403            # no password prompt
    assert _curl(proxy, url, user="alice", source=OUTSIDE) == 403
    assert _curl(proxy, url) == 407                             # inside, no credentials
    assert _curl(proxy, url, user="alice", password="wrong") == 407
    assert _curl(proxy, url, user="alice") == 200
    assert _curl(proxy, url, tunnel=True) == 407                # CONNECT alike
    assert _curl(proxy, url, user="bob", tunnel=True) == 200
    records = wait_for_records(proxy, 7)
    assert [(r.status, r.rule, r.ctx.user) for r in records] == [
        (403, "line 1", None), (403, "line 1", None), (407, "line 2", None),
        (407, "line 2", None), (200, None, "alice"), (407, "line 2", None),
        (200, None, "bob")]


def test_the_407_carries_every_challenge_and_says_why_in_the_log(proxy_factory, tmp_path,
                                                                 origin, caplog):
    proxy = _start(proxy_factory, tmp_path, "staff: allow user *", auth='realm = Corp\n')
    out = curl("-i", "-x", proxy.url, origin.url("/", host="origin.test"))
    head = out.stdout.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 407 ")
    assert b'\r\nProxy-Authenticate: Basic realm="Corp"' in head
    assert b"\r\nProxy-Status: geproxy; error=http_request_denied" in head
    assert b"staff" not in out.stdout  # the rule is the log's, not the client's
    [record] = wait_for_records(proxy, 1)
    assert (record.status, record.error, record.rule) == (407, "http_request_denied", "staff")


def test_require_always_never_allows_without_credentials(proxy_factory, tmp_path, origin):
    proxy = _start(proxy_factory, tmp_path, f"""
        lan: allow src {INSIDE}/32
        deny all
    """)
    url = origin.url("/", host="origin.test")
    assert _curl(proxy, url) == 407                  # the allow needs a user all the same
    assert _curl(proxy, url, user="carol") == 200
    assert _curl(proxy, url, source=OUTSIDE) == 403  # a deny reached needs none
    records = wait_for_records(proxy, 3)
    assert [(r.status, r.rule, r.ctx.user) for r in records] == [
        (407, None, None), (200, None, "carol"), (403, "line 2", None)]


def test_require_rules_names_a_user_only_when_the_credentials_are_good(
        proxy_factory, tmp_path, origin):
    proxy = _start(proxy_factory, tmp_path, f"""
        lan: allow src {INSIDE}/32
        deny all
    """, auth="require = rules\n")
    url = origin.url("/", host="origin.test")
    assert _curl(proxy, url) == 200
    assert _curl(proxy, url, user="alice", password="wrong") == 200  # as Squid: not refused
    assert _curl(proxy, url, user="alice") == 200
    records = wait_for_records(proxy, 3)
    assert [(r.status, r.ctx.user) for r in records] == [(200, None), (200, None),
                                                         (200, "alice")]


def test_conditions_stop_at_the_first_that_fails(proxy_factory, tmp_path, origin):
    """``allow !@blocked user *`` asks for no credentials for a blocked host."""
    proxy = _start(proxy_factory, tmp_path, """
        allow !@blocked user *
        deny all
    """, acl="lists =\n    blocked: dst .blocked.test\n", auth="require = rules\n")
    assert _curl(proxy, origin.url("/", host="ads.blocked.test")) == 403
    assert _curl(proxy, origin.url("/", host="origin.test")) == 407
    assert _curl(proxy, origin.url("/", host="origin.test"), user="alice") == 200
    records = wait_for_records(proxy, 3)
    assert [(r.status, r.rule) for r in records] == [(403, "line 2"), (407, "line 1"),
                                                     (200, None)]


# -- negation -------------------------------------------------------------------------------


def test_negation_of_port_and_method(proxy_factory, tmp_path, origin):
    proxy = _start(proxy_factory, tmp_path, """
        odd-port: deny method CONNECT !port 443 8443
        allow all
    """, auth=None)
    assert _curl(proxy, origin.url("/", host="origin.test"), tunnel=True) == 403
    assert _curl(proxy, origin.url("/", host="origin.test")) == 200  # a GET: not CONNECT
    assert [(r.method, r.rule) for r in wait_for_records(proxy, 2)] == [
        ("CONNECT", "odd-port"), ("GET", None)]


def test_negated_user_and_group(proxy_factory, tmp_path, origin):
    groups = tmp_path / "groups"
    groups.write_text("staff: alice\n")
    proxy = _start(proxy_factory, tmp_path, """
        not-staff: deny !group staff
        not-bob: allow !user bob
        deny all
    """, acl=f"group_file = {groups}\n")
    url = origin.url("/", host="origin.test")
    assert _curl(proxy, url, user="alice") == 200
    assert _curl(proxy, url, user="bob") == 403
    assert _curl(proxy, url) == 407  # a negated user condition needs a user all the same
    assert [(r.status, r.rule) for r in wait_for_records(proxy, 3)] == [
        (200, None), (403, "not-staff"), (407, "not-staff")]


# -- groups ---------------------------------------------------------------------------------


def test_groups_from_the_group_file_follow_its_changes(proxy_factory, tmp_path, origin):
    groups = _write(tmp_path / "groups", "# who is staff\nstaff: alice, Carol\nops: bob\n")
    proxy = _start(proxy_factory, tmp_path, """
        staff: allow group staff
        deny all
    """, acl=f"group_file = {groups}\ncheck_interval = 0\n")
    url = origin.url("/", host="origin.test")
    assert _curl(proxy, url, user="alice") == 200
    assert _curl(proxy, url, user="carol") == 200  # names compare case-insensitively
    assert _curl(proxy, url, user="bob") == 403
    _write(groups, "staff: alice bob\n")
    # Groups are kept per connection; curl opens a new one each time. The file is read
    # again in the background: bounded wait for the change.
    for _ in range(100):
        if _curl(proxy, url, user="bob") == 200:
            break
        gevent.sleep(0.05)
    else:
        pytest.fail("the group file's change was never seen")


class GroupsFromAHook:
    """An identity plugin that gives groups by the user_groups hook."""

    name = "test_groups"

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def user_groups(self, ctx: Context, user: str) -> Optional[list[str]]:
        self.asked.append(user)
        return ["contractors"] if user == "bob" else None


def test_groups_from_a_plugin_are_asked_only_when_a_rule_needs_them(proxy_factory, tmp_path,
                                                                    origin):
    plugin = GroupsFromAHook()
    ini = textwrap.dedent(f"""
        [acl]
        connect_ports = 1-65535
        rules =
            public: allow dst api.test
            allow group contractors
            deny all
        [auth]
        htpasswd = {_htpasswd(tmp_path)}
    """)
    proxy = proxy_factory(ini, plugins=[plugin],
                          resolver=StaticResolver({n: ["127.0.0.1"] for n in NAMES}))
    assert _curl(proxy, origin.url("/", host="api.test"), user="alice") == 200
    assert plugin.asked == []
    assert _curl(proxy, origin.url("/", host="origin.test"), user="bob") == 200
    assert _curl(proxy, origin.url("/", host="origin.test"), user="alice") == 403
    assert plugin.asked == ["bob", "alice"]


# -- lists ----------------------------------------------------------------------------------


def test_file_lists_are_read_and_swapped_when_they_change(proxy_factory, tmp_path, origin,
                                                          caplog):
    blocked = _write(tmp_path / "blocked.txt", "# domains\n.blocked.test\n\nother.test\n")
    proxy = _start(proxy_factory, tmp_path, f"""
        listed: deny dst file:{blocked}
        allow all
    """, acl="check_interval = 0\n", auth=None)
    assert _curl(proxy, origin.url("/", host="ads.blocked.test")) == 403
    assert _curl(proxy, origin.url("/", host="other.test")) == 403
    assert _curl(proxy, origin.url("/", host="api.test")) == 200
    _write(blocked, "api.test\n")

    def settled(host: str, status: int) -> bool:
        for _ in range(100):
            if _curl(proxy, origin.url("/", host=host)) == status:
                return True
            gevent.sleep(0.05)
        return False

    assert settled("api.test", 403)
    assert _curl(proxy, origin.url("/", host="other.test")) == 200
    # A bad edit keeps the last good list, and says why.
    caplog.set_level(logging.WARNING, logger="geproxy_plugins.acl")
    _write(blocked, "api.test\nnot a host name!\n")
    for _ in range(100):
        if "keeping the last 1 values" in caplog.text:
            break
        _curl(proxy, origin.url("/", host="api.test"))
        gevent.sleep(0.05)
    assert f"keeping the last 1 values of {blocked}" in caplog.text
    assert "not a host name!" in caplog.text
    assert _curl(proxy, origin.url("/", host="api.test")) == 403


def test_src_file_lists_and_named_lists(proxy_factory, tmp_path, origin):
    office = _write(tmp_path / "office.txt", f"{INSIDE}/32\n")
    proxy = _start(proxy_factory, tmp_path, """
        office: allow @office !@banned
        deny all
    """, acl=f"""lists =
        office: src file:{office.name}
        banned: dst blocked.test
    """, auth=None)
    assert _curl(proxy, origin.url("/", host="origin.test")) == 200
    assert _curl(proxy, origin.url("/", host="blocked.test")) == 403
    assert _curl(proxy, origin.url("/", host="origin.test"), source=OUTSIDE) == 403


# -- url_regex, path, quoted values -------------------------------------------------------------


def test_url_regex_matches_urls_and_connect_authorities(proxy_factory, tmp_path, origin):
    port = origin.port
    proxy = _start(proxy_factory, tmp_path, rf"""
        # quoted: a comma, a space and a # stay in the value
        quoted: deny url_regex "^http://origin\.test:[0-9]+/a{{1,3}}(,| |#)b"
        tunnels: deny url_regex ^blocked\.test:{port}$
        allow all
    """, auth=None)
    assert _curl(proxy, origin.url("/aa,b", host="origin.test")) == 403
    assert _curl(proxy, origin.url("/a%20b", host="origin.test")) == 200  # not decoded
    assert _curl(proxy, origin.url("/aaaab", host="origin.test")) == 200
    assert _curl(proxy, origin.url("/", host="blocked.test"), tunnel=True) == 403
    assert _curl(proxy, origin.url("/", host="origin.test"), tunnel=True) == 200
    assert [r.rule for r in wait_for_records(proxy, 5)] == [
        "quoted", None, None, "tunnels", None]


def test_path_globs_match_plain_http_never_connect(proxy_factory, tmp_path, origin):
    proxy = _start(proxy_factory, tmp_path, """
        downloads: deny path /*.exe /files/*
        allow all
    """, auth=None)
    assert _curl(proxy, origin.url("/setup.exe", host="origin.test")) == 403
    assert _curl(proxy, origin.url("/files/a/b", host="origin.test")) == 403
    assert _curl(proxy, origin.url("/index.html", host="origin.test")) == 200
    assert _curl(proxy, origin.url("/setup.exe", host="origin.test"), tunnel=True) == 200


# -- time -----------------------------------------------------------------------------------


def test_time_rules_in_the_configured_zone(proxy_factory, tmp_path, origin):
    now = datetime.datetime.now(datetime.timezone.utc)
    start = (now - datetime.timedelta(hours=2)).strftime("%H:%M")
    end = (now + datetime.timedelta(hours=2)).strftime("%H:%M")
    later = (now + datetime.timedelta(hours=3)).strftime("%H:%M")
    latest = (now + datetime.timedelta(hours=5)).strftime("%H:%M")
    proxy = _start(proxy_factory, tmp_path, f"""
        later: deny time {later}-{latest}
        now: allow time {start}-{end}
        deny all
    """, acl="timezone = UTC\n", auth=None)
    assert _curl(proxy, origin.url("/", host="origin.test")) == 200
    [record] = wait_for_records(proxy, 1)
    assert record.status == 200


def _plugin(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "acl.ini"
    path.write_text("[acl]\n" + textwrap.dedent(body))
    pm, _ = load(str(path), entry_points=False)
    return pm.get_plugin("acl")


def _decide(plugin: Any, method: str, target: str, at: float, client: str = INSIDE) -> str:
    host = target if method == "CONNECT" else target.split("/")[2]
    name, _, port = host.rpartition(":") if ":" in host else (host, "", "80")
    request = Request(method, target, "HTTP/1.1", Headers(frozen=True),
                      "" if method == "CONNECT" else "http", name, int(port),
                      "" if method == "CONNECT" else "/")
    ctx = Context(client_addr=(client, 1), server_addr=("127.0.0.1", 3128), config=None,
                  at=at)
    try:
        plugin.on_request(ctx, request)
    except Exception as exc:  # noqa: BLE001 - the verdict is what the test reads
        return f"{type(exc).__name__} {getattr(exc, 'rule', '')}"
    return "allow"


@pytest.mark.parametrize("when, verdict", [
    ("2026-12-07 09:00", "allow"),          # a Monday, within office hours
    ("2026-12-07 07:59", "Denied line 2"),
    ("2026-12-07 18:00", "Denied line 2"),  # the end is not within
    ("2026-12-05 10:00", "Denied line 2"),  # a Saturday
    ("2026-12-06 23:30", "allow"),          # Sunday night: the range wraps past midnight
    ("2026-12-07 05:59", "allow"),
])
def test_time_days_and_ranges(tmp_path, when, verdict):
    plugin = _plugin(tmp_path, """
        timezone = Europe/Berlin
        rules =
            allow time Mon-Fri 08:00-18:00
            deny !time Sat-Sun,Mon 22:00-06:00
            allow all
    """)
    at = datetime.datetime.strptime(when, "%Y-%m-%d %H:%M").replace(
        tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Berlin")).timestamp()
    assert _decide(plugin, "GET", "http://origin.test/", at) == verdict


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, problem", [
    ('deny url_regex "(a', "a double quote is not closed"),
    ("deny url_regex (a", "not a regular expression RE2 takes"),
    (r"deny url_regex (a)\1", "not a regular expression RE2 takes"),
    ("deny time Mon-Fry", "not a day"),
    ("deny time 25:00-26:00", "not a time of day"),
    ("deny dstdomain .example.com", "did you mean 'dst'?"),
    ("deny proxy_auth REQUIRED", "did you mean 'user'?"),
    ("deny @nolist", "no list named 'nolist'"),
    ("allow dst a.test deny_page blocked", "deny_page goes with deny rules"),
    ("deny deny_page blocked dst a.test", "deny_page NAME comes last"),
    ("deny path setup.exe", "a path glob starts with /"),
    ("deny dst file:missing.txt", "cannot read"),
])
def test_bad_rules_name_what_is_wrong(tmp_path, rule, problem):
    with pytest.raises(ConfigError) as caught:
        _plugin(tmp_path, f"rules =\n    allow src 127.0.0.1\n    {rule}\n")
    assert problem in str(caught.value), str(caught.value)
    assert caught.value.line == 2


def test_every_bad_rule_is_reported(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _plugin(tmp_path, """
            rules =
                deny dstdomain a.test
                allow all
                deny port 0
        """)
    lines = [error.line for error in getattr(caught.value, "errors", [caught.value])]
    assert lines == [1, 3], str(caught.value)


def test_a_bad_list_file_stops_the_start_naming_its_line(tmp_path):
    listed = tmp_path / "blocked.txt"
    listed.write_text(".ok.test\n.bad_*_[.test\nexa$mple\n")
    with pytest.raises(ConfigError, match=r"blocked.txt: line 3: .*exa\$mple"):
        _plugin(tmp_path, f"rules =\n    deny dst file:{listed}\n")


def test_require_rules_without_a_user_rule_warns(tmp_path, caplog):
    path = tmp_path / "c.ini"
    path.write_text(textwrap.dedent(f"""
        [acl]
        rules = allow all
        [auth]
        htpasswd = {_htpasswd(tmp_path)}
        require = rules
    """))
    caplog.set_level(logging.WARNING)
    load(str(path), entry_points=False)
    assert "nobody is ever asked for credentials" in caplog.text
    caplog.clear()  # no [auth] htpasswd: nobody authenticates, and nothing to warn of
    path.write_text("[acl]\nrules = allow all\n[auth]\nrequire = rules\n")
    load(str(path), entry_points=False)
    assert "nobody is ever asked" not in caplog.text


def test_a_reload_reuses_an_unchanged_list(tmp_path):
    listed = _write(tmp_path / "blocked.txt", ".blocked.test\n")
    path = tmp_path / "c.ini"
    path.write_text(f"[acl]\nrules = deny dst file:{listed}\n")
    pm, config = load(str(path), entry_points=False)
    first = pm.get_plugin("acl").policy.files[0]
    pm2, _ = load(str(path), entry_points=False, stash=config.stash)
    second = pm2.get_plugin("acl").policy.files[0]
    assert second is not first and second.matcher is first.matcher
    time.sleep(0.01)
    _write(listed, ".other.test\n")
    pm3, _ = load(str(path), entry_points=False, stash=config.stash)
    assert pm3.get_plugin("acl").policy.files[0].matcher is not first.matcher


# -- error pages ----------------------------------------------------------------------------


def test_refusals_get_the_rules_page_or_the_default_one(proxy_factory, tmp_path, origin):
    pages = tmp_path / "errors"
    pages.mkdir()
    (pages / "blocked.html").write_text("<p>${host} is blocked (${request_id}, ${rule})</p>")
    (pages / "blocked.txt").write_text("${host} is blocked\n")
    denied = tmp_path / "denied.html"
    denied.write_text("<p>${status} ${reason}: ${client}. Ask ${contact}.</p>")
    proxy = _start(proxy_factory, tmp_path, """
        social: deny dst .blocked.test deny_page blocked
        staff: allow user *
    """, acl=f"deny_page = {denied}\nerror_dir = {pages}\ncontact = \"helpdesk\" <x@example.com>\n",
        auth="require = rules\n")
    html = ("-H", "Accept: text/html,application/xhtml+xml,*/*;q=0.8")
    out = curl("-i", *html, "-x", proxy.url,
               origin.url("/", host="ads.blocked.test"))
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"\r\nContent-Type: text/html; charset=utf-8" in head
    assert b"\r\nProxy-Status: geproxy; error=http_request_denied" in head
    assert body.startswith(b"<p>ads.blocked.test is blocked (c1, social)</p>"), body
    out = curl("-i", "-x", proxy.url, origin.url("/", host="ads.blocked.test"))
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: text/plain; charset=utf-8" in head
    assert body == b"ads.blocked.test is blocked\n"
    # The 407 of a rule that needs a user gets the default page, escaped.
    out = curl("-i", *html, "-x", proxy.url, origin.url("/", host="origin.test"))
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 ") and b"\r\nProxy-Authenticate: Basic" in head
    assert body == (b"<p>407 Proxy Authentication Required: 127.0.0.1. "
                    b"Ask &quot;helpdesk&quot; &lt;x@example.com&gt;.</p>"), body


def test_a_page_shows_a_hostile_target_as_text(proxy_factory, tmp_path, origin):
    from geproxy.testing import exchange

    denied = tmp_path / "denied.html"
    denied.write_text("<h1>${host}</h1>")
    proxy = _start(proxy_factory, tmp_path, "deny port 1-65535", acl=f"deny_page = {denied}\n",
                   auth=None)
    statuses = []
    for host in ("a<b>.test", 'a"b.test', "a&b.test", "[::1]", "a'b.test", "%3Cb%3E.test"):
        head = (f"GET http://{host}/ HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n"
                "Connection: close\r\n\r\n").encode()
        answer = exchange(proxy.address, head)
        status = int(answer.split(b" ", 2)[1])
        statuses.append(status)
        if status == 400:
            continue  # the parser refused it before any policy
        assert status == 403, answer
        body = answer.partition(b"\r\n\r\n")[2]
        assert body.startswith(b"<h1>") and body.endswith(b"</h1>"), body
        assert not set(body[4:-5]) & set(b"<>\"'"), body
    # What HTML could break is refused as a malformed target; an IPv6 literal is shown.
    assert statuses == [400, 400, 400, 403, 400, 400], statuses


# -- explain, its policy tests and its replay, with the new constructs --------------------------


def _explain(*args: Any) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "geproxy", "explain", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_policy_cases_with_negation_users_groups_and_regexes(tmp_path):
    groups = tmp_path / "groups"
    groups.write_text("staff: alice\n")
    config = tmp_path / "policy.ini"
    config.write_text(textwrap.dedent(f"""
        [geproxy]
        access_log = off
        [acl]
        group_file = {groups}
        lists =
            blocked: url_regex "^(http://)?[^/]*\\.ads\\.test[:/]"
        rules =
            outside: deny !src 10.0.0.0/8
            ads: deny @blocked
            staff: allow group staff
            everyone: allow user *
            deny all
        [auth]
        htpasswd = {_htpasswd(tmp_path)}
    """))
    cases = tmp_path / "cases.txt"
    cases.write_text(textwrap.dedent("""
        # the issue's example
        192.0.2.9 - CONNECT api.example.com:443 -> 403 rule outside
        10.1.2.3 - CONNECT api.example.com:443 -> 407 rule staff
        10.1.2.3 ALICE CONNECT api.example.com:443 -> allow rule staff
        10.1.2.3 bob CONNECT api.example.com:443 -> allow rule everyone
        10.1.2.3 - CONNECT x.ads.test:443 -> deny rule ads
        10.1.2.3 - GET http://x.ads.test/banner -> deny rule ads
    """))
    out = _explain("--config", config, "--cases", cases)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 cases passed" in out.stdout
    cases.write_text("10.1.2.3 - CONNECT x.ads.test:443 -> allow\n")
    out = _explain("--config", config, "--cases", cases)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cases.txt:1: expected allow" in out.stdout + out.stderr


def test_explain_says_which_rule_asks_for_credentials(tmp_path):
    config = tmp_path / "policy.ini"
    config.write_text(textwrap.dedent(f"""
        [geproxy]
        access_log = off
        [acl]
        rules =
            outside: deny !src 10.0.0.0/8
            staff: allow user *
        [auth]
        htpasswd = {_htpasswd(tmp_path)}
    """))
    out = _explain("--config", config, "--no-resolve", "--from", "10.1.2.3", "CONNECT",
                   "api.example.com:443")
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("[acl] rule staff (policy.ini:7) needs a user (user *), and the request proves "
            "none  <- decides") in out.stdout, out.stdout
    assert "answer      407 Proxy Authentication Required" in out.stdout


def test_a_replay_of_real_traffic_under_a_policy_with_the_new_constructs(
        proxy_factory, tmp_path, origin):
    log = tmp_path / "access.log"
    proxy = _start(proxy_factory, tmp_path, "allow all", auth=None,
                   geproxy=f"access_log = {log}\nlog_format = json\n")
    for host, source in (("origin.test", INSIDE), ("ads.blocked.test", INSIDE),
                         ("origin.test", OUTSIDE)):
        assert _curl(proxy, origin.url("/x.exe", host=host), source=source) == 200
    wait_for_records(proxy, 3)
    listed = _write(tmp_path / "blocked.txt", ".blocked.test\n")
    config = tmp_path / "new.ini"
    config.write_text(textwrap.dedent(f"""
        [geproxy]
        access_log = off
        [acl]
        connect_ports = 1-65535
        rules =
            outside: deny !src {INSIDE}
            listed: deny dst file:{listed}
            allow all
    """))
    wait_for_lines(log, 3)  # the log's lines follow the records
    out = _explain("--config", config, "--replay", log)
    assert out.returncode == 1, out.stdout + out.stderr
    changed = [line for line in out.stdout.splitlines()
               if line.startswith(f"{log}:") and "allowed -> refused" in line]
    assert len(changed) == 2, out.stdout
    assert "ads.blocked.test" in changed[0] and "new rule listed" in changed[0]
    assert OUTSIDE in changed[1] and "new rule outside" in changed[1]


def test_check_config_reports_bad_rules_beside_every_other_error(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text(textwrap.dedent("""\
        [geproxy]
        listen = 127.0.0.1:3999
        graceful_timout = 3s
        [acl]
        rules =
            deny dstdomain .example.com
            # a comment
            allow proxy_auth REQUIRED
            deny url_regex "(a"
            allow all
        [parent]
        x = 1
    """))
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "geproxy", "check-config", "--config",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[0] == f"geproxy: {path}:3: [geproxy] graceful_timout: unknown option; did " \
                       "you mean 'graceful_timeout'?"
    assert lines[1].startswith(f"geproxy: {path}:6: [acl] rules: unknown condition "
                               "'dstdomain'; did you mean 'dst'?")
    assert lines[2].startswith(f"geproxy: {path}:8: [acl] rules: unknown condition "
                               "'proxy_auth'; did you mean 'user'?")
    assert lines[3].startswith(f"geproxy: {path}:9: [acl] rules: not a regular expression")
    assert lines[4] == (f"geproxy: {path}:11: [parent]: unknown section (no plugin declares "
                        "it); did you mean '[parents]'?")
    assert len(lines) == 5


@pytest.mark.parametrize("workers", [1, 2])
def test_every_worker_swaps_a_changed_list(proxy_process, origin, tmp_path, workers):
    """Each worker watches the file: a change reaches every worker, whichever the kernel
    picks for a connection; the access log's connection ids say which worker answered."""
    import json

    listed = _write(tmp_path / "blocked.txt", "192.0.2.0/24\n")
    log = tmp_path / "access.log"
    proxy = proxy_process(textwrap.dedent(f"""\
        workers = {workers}
        access_log = {log}
        log_format = json
        [acl]
        connect_ports = 1-65535
        check_interval = 0
        rules =
            listed: deny dst file:{listed}
            allow all
    """))
    url = origin.url("/")  # 127.0.0.1, an IP literal: no name to resolve in the proxy

    sent = [0]

    def statuses() -> set[int]:
        sent[0] += 8
        return {int(curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url,
                         url).stdout) for _ in range(8)}

    assert statuses() == {200}
    _write(listed, "127.0.0.0/8\n")
    for _ in range(100):  # the first requests after the change may still see the old list
        if statuses() == {403}:
            break
        gevent.sleep(0.05)
    # From now on every answer is a 403, from every worker (numbered from 0).
    expected = {"w0", "w1"} if workers == 2 else {""}
    refusers: set[str] = set()
    for _ in range(20):
        assert statuses() == {403}
        lines = [json.loads(line) for line in wait_for_lines(log, sent[0])]
        refusers = {entry["conn"].partition("c")[0] for entry in lines
                    if entry["status"] == 403}
        if refusers == expected:
            break
    assert refusers == expected, refusers


def test_policy_cases_at_a_time(tmp_path):
    config = tmp_path / "policy.ini"
    config.write_text(textwrap.dedent("""
        [geproxy]
        access_log = off
        [acl]
        timezone = Europe/Berlin
        rules =
            weekend: deny time Sat-Sun
            office: allow time Mon-Fri 08:00-18:00
            deny all
    """))
    cases = tmp_path / "cases.txt"
    cases.write_text(textwrap.dedent("""
        10.1.2.3 - GET http://example.com/ at 2026-12-05T10:00+01:00 -> deny rule weekend
        10.1.2.3 - GET http://example.com/ at 2026-12-07T08:30+01:00 -> allow rule office
        10.1.2.3 - GET http://example.com/ at 2026-12-07T07:30Z -> allow rule office
        10.1.2.3 - GET http://example.com/ at 2026-12-07T18:00+01:00 -> deny rule line 3
    """))
    out = _explain("--config", config, "--cases", cases)
    assert out.returncode == 0 and "4 cases passed" in out.stdout, out.stdout + out.stderr
    cases.write_text("10.1.2.3 - GET http://example.com/ at tomorrow -> allow\n")
    out = _explain("--config", config, "--cases", cases)
    assert out.returncode == 2 and "not an ISO 8601 time: 'tomorrow'" in out.stderr
