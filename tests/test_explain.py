"""``geproxy explain``: the policy dry run, with plugins written to files like an operator's."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

from geproxy.explain import explain

POLICY = textwrap.dedent('''
    from geproxy import Denied, hookimpl

    class Policy:
        name = "policy"

        @hookimpl
        def on_connect(self, ctx):
            if ctx.client_addr[0].startswith("10."):
                return Denied("outside", rule="no-tens")
            return None

        @hookimpl
        def on_request(self, ctx, request):
            ctx.stash["policy"] = {"seen": request.method}
            if request.host == "blocked.test":
                raise Denied("blocked host", rule="blocklist")
            if ctx.user == "mallory":
                raise Denied("that user", rule="users")
            return None

    class Names:
        name = "names"

        @hookimpl(tryfirst=True)
        def resolve(self, ctx, host, port):
            return [("127.0.0.1", port)] if host.endswith(".test") else None
''')


@pytest.fixture
def config(tmp_path, monkeypatch):
    (tmp_path / "policy_mod.py").write_text(POLICY)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "explain.ini"
    path.write_text("[geproxy]\nplugins = policy_mod:Policy policy_mod:Names\n"
                    "access_log = off\n"
                    "[acl]\nconnect_ports = 443\nrules = allow all\n"
                    "[destinations]\nallow = 127.0.0.0/8\n")
    return str(path)


def _run(config, *args, **kwargs):
    out = io.StringIO()
    code = explain(config, *args, out=out, **kwargs)
    return code, out.getvalue()


def test_an_allowed_connect_shows_each_step(config):
    code, text = _run(config, "CONNECT", "ok.test:443")
    assert code == 0
    assert "route       direct" in text
    assert "resolve     127.0.0.1:443" in text
    assert "200 Connection Established" in text and "verdict     allowed" in text
    assert "stash       policy: {'seen': 'CONNECT'}" in text


def test_a_denied_request_names_the_plugin_and_rule(config):
    code, text = _run(config, "GET", "http://blocked.test/x")
    assert code == 1
    assert "policy" in text and "403 http_request_denied (rule blocklist)" in text
    assert "<- decides" in text
    assert "Proxy-Status: geproxy; error=http_request_denied" in text
    assert "resolve" not in text  # refused before anything was resolved


def test_from_and_user_reach_the_plugins(config):
    code, text = _run(config, "CONNECT", "ok.test:443", client="10.1.2.3")
    assert code == 1 and "(rule no-tens)" in text and "on_request" not in text
    code, text = _run(config, "CONNECT", "ok.test:443", user="mallory")
    assert code == 1 and "(rule users)" in text


def test_no_resolve_and_dns_errors(config):
    code, text = _run(config, "GET", "http://ok.test/", resolve=False)
    assert code == 0 and "skipped (--no-resolve)" in text
    code, text = _run(config, "CONNECT", "127.0.0.1:443")
    assert code == 0 and "resolve     127.0.0.1:443" in text  # a literal: no lookup


def test_a_malformed_target_is_a_400(config):
    code, text = _run(config, "CONNECT", "no-port")
    assert code == 1 and "400 Bad Request" in text


def test_the_command_line(config):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(config)}
    done = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config", config,
                           "--from", "10.9.9.9", "CONNECT", "ok.test:443"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done.stderr
    assert "(rule no-tens)" in done.stdout
    done = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config",
                           config + ".missing", "GET", "http://ok.test/"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_the_acl_rule_that_decides_is_shown(tmp_path):
    path = tmp_path / "acl.ini"
    path.write_text("[geproxy]\naccess_log = off\n"
                    "[acl]\nconnect_ports = 443\nrules =\n"
                    "    staff: allow src 10.0.0.0/8 dst .example.com\n"
                    "    others: deny all\n")
    out = io.StringIO()
    assert explain(str(path), "CONNECT", "api.example.com:443", client="10.2.3.4",
                   resolve=False, out=out) == 0
    assert "acl.request: allow (rule staff, acl.ini:6)" in out.getvalue()
    out = io.StringIO()
    assert explain(str(path), "CONNECT", "evil.example.net:443", client="10.2.3.4",
                   resolve=False, out=out) == 1
    assert "(rule others)" in out.getvalue() and "<- decides" in out.getvalue()
    out = io.StringIO()
    assert explain(str(path), "CONNECT", "api.example.com:443", client="192.0.2.1",
                   resolve=False, out=out) == 1
    assert "acl: decided at connect: deny (rule others, acl.ini:7)" in out.getvalue()


# -- the first answer decides, as in the proxy ---------------------------------------------

AUTH_POLICY = textwrap.dedent('''
    from geproxy import DNSError, hookimpl

    class Names:
        name = "names"

        @hookimpl(tryfirst=True)
        def resolve(self, ctx, host, port):
            if host.endswith(".missing"):
                raise DNSError(f"no address for {host}", rcode="NXDOMAIN")
            return [("127.0.0.1", port)] if host.endswith(".test") else None

    class Broken:
        name = "broken"

        @hookimpl
        def on_request(self, ctx, request):
            if request.host == "bug.test":
                raise KeyError("a bug")
            return None
''')


@pytest.fixture
def auth_config(tmp_path, monkeypatch):
    """A proxy with [auth] (alice, bcrypt), an ACL that denies one host and lets the rest
    through, the PAC file, and a parent for *.via.test behind a parent that does not
    resolve. Its listen address is never bound: explain connects nowhere."""
    from passlib.hash import bcrypt

    (tmp_path / "auth_policy.py").write_text(AUTH_POLICY)
    monkeypatch.syspath_prepend(str(tmp_path))
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.using(ident='2y', rounds=5).hash('pw')}\n")
    path = tmp_path / "auth.ini"
    path.write_text(
        "[geproxy]\nlisten = 0.0.0.0:3128\naccess_log = off\n"
        "plugins = auth_policy:Names auth_policy:Broken\n"
        f"[auth]\nhtpasswd = {htpasswd}\n"
        "[acl]\nconnect_ports = 443\nrules =\n"
        "    blocked: deny dst blocked.test\n    others: allow all\n"
        "[destinations]\nallow = 127.0.0.0/8\n"
        "[parents]\nparents = http://gone.missing:3128 http://127.0.0.1:3129\n"
        "rules =\n    parent .via.test\n")
    return str(path)


def _answer(text):
    return [line for line in text.splitlines() if line.startswith("answer ")]


def test_a_user_given_is_authenticated_and_the_acl_decides(auth_config):
    code, text = _run(auth_config, "CONNECT", "blocked.test:443", user="alice")
    assert code == 1, text
    assert "(rule blocked)" in text and "<- decides" in text
    assert _answer(text) == ["answer      403 Forbidden; Proxy-Status: geproxy; "
                             "error=http_request_denied"]
    assert text.endswith("verdict     refused\n")
    code, text = _run(auth_config, "CONNECT", "allowed.test:443", user="alice")
    assert code == 0 and "verdict     allowed" in text, text
    assert "resolve     127.0.0.1:443" in text


def test_without_a_user_auth_answers_407_and_that_is_a_refusal(auth_config):
    code, text = _run(auth_config, "CONNECT", "allowed.test:443")
    assert code == 1, text
    # The acl walk comes first and lets the request through without needing a user; auth's
    # require = always then asks for one, and says why.
    assert re.search(r"^  auth +407 http_request_denied: CONNECT allowed.test:443 from "
                     r"127.0.0.1: \[auth\] require = always, and the request proves no user"
                     r"  <- decides$", text, re.M), text
    assert _answer(text) == ["answer      407 Proxy Authentication Required; Proxy-Status: "
                             "geproxy; error=http_request_denied"]
    assert "verdict     refused" in text and "route" not in text
    assert "stash       acl.request: allow (rule others" in text


def test_a_plugins_response_is_what_the_client_gets(auth_config):
    code, text = _run(auth_config, "GET", "/proxy.pac")
    assert code == 0, text
    assert re.search(r"^  pac +\(wrapper\) answers 200  <- decides$", text, re.M), text
    assert _answer(text) == ["answer      200 OK, from the pac plugin"]
    assert re.search(r"^  metrics +\(wrapper\) no change$", text, re.M), text


def test_the_proxys_own_pages_answer_with_their_status(auth_config):
    code, text = _run(auth_config, "GET", "/healthz")
    assert code == 0 and _answer(text) == ["answer      200 OK, from the proxy itself"], text
    code, text = _run(auth_config, "GET", "/no-such-page")
    assert code == 1 and _answer(text) == ["answer      404 Not Found, from the proxy itself"]
    # Addressed to the wildcard listener through a loopback address, as the server sees it.
    code, text = _run(auth_config, "GET", "http://127.0.0.2:3128/healthz", user="alice")
    assert code == 0 and _answer(text) == ["answer      200 OK, from the proxy itself"], text
    code, text = _run(auth_config, "GET", "http://127.0.0.2:3129/healthz", user="alice")
    assert code == 0 and "forwarded upstream" in _answer(text)[0], text


def test_a_connect_to_the_proxy_itself_is_a_loop(tmp_path):
    path = tmp_path / "loop.ini"
    path.write_text("[geproxy]\nlisten = 127.0.0.1:3128\naccess_log = off\n"
                    "[acl]\nconnect_ports = 3128\nrules = allow all\n")
    code, text = _run(str(path), "CONNECT", "localhost:3128")
    assert code == 1
    assert _answer(text) == ["answer      502 Bad Gateway; Proxy-Status: geproxy; "
                             "error=proxy_loop_detected"]


def test_a_parent_that_does_not_resolve_is_passed_over(auth_config):
    code, text = _run(auth_config, "GET", "http://www.via.test/", user="alice")
    assert code == 0, text
    assert "route       parent proxy gone.missing:3128 then parent proxy 127.0.0.1:3129" in text
    assert "resolve     parent proxy gone.missing:3128: 502 dns_error" in text
    assert "resolve     127.0.0.1:3129" in text
    assert _answer(text) == ["answer      forwarded upstream through parent proxy "
                             "127.0.0.1:3129: the status is the origin's"]


def test_a_plugin_that_raises_fails_closed(auth_config):
    code, text = _run(auth_config, "GET", "http://bug.test/", user="alice")
    assert code == 1
    assert re.search(r"^  broken +500 proxy_internal_error: KeyError: 'a bug'  <- decides$",
                     text, re.M), text
    assert _answer(text) == ["answer      500 Internal Server Error; Proxy-Status: geproxy; "
                             "error=proxy_internal_error"]


@pytest.fixture
def group_config(tmp_path):
    """A policy that lets only the group staff through; bob is in it by [acl] group_file."""
    groups = tmp_path / "groups"
    groups.write_text("staff: bob\n")
    path = tmp_path / "groups.ini"
    path.write_text(
        "[geproxy]\naccess_log = off\n"
        f"[acl]\nconnect_ports = 443\ngroup_file = {groups}\nrules =\n"
        "    staffonly: allow group staff\n    others: deny all\n"
        "[destinations]\nallow = 127.0.0.0/8\n")
    return str(path)


def test_groups_given_replace_any_lookup(group_config):
    code, text = _run(group_config, "CONNECT", "127.0.0.1:443", user="alice",
                      groups=["staff"], resolve=False)
    assert code == 0, text
    assert "request     CONNECT 127.0.0.1:443 from 127.0.0.1 as alice in staff" in text
    assert "groups      " not in text  # given: nothing was looked up
    # bob is in staff by the group file, but the groups given are the only ones.
    code, text = _run(group_config, "CONNECT", "127.0.0.1:443", user="bob",
                      groups=["other"], resolve=False)
    assert code == 1 and "(rule others)" in text, text


def test_without_groups_only_those_in_memory_are_seen_and_explain_says_so(group_config):
    code, text = _run(group_config, "CONNECT", "127.0.0.1:443", user="bob", resolve=False)
    assert code == 0, text  # from [acl] group_file
    code, text = _run(group_config, "CONNECT", "127.0.0.1:443", user="alice",
                      resolve=False)
    assert code == 1 and "(rule others)" in text, text
    assert ("groups      of alice: only [acl] group_file and other groups held in memory; "
            "no directory was asked (give them with --group)") in text


def test_group_needs_a_user_on_the_command_line(group_config):
    run = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config",
                          group_config, "--group", "staff", "CONNECT", "127.0.0.1:443"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--group needs --user" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config",
                          group_config, "--user", "alice", "--group", "staff",
                          "--group", "ops", "CONNECT", "127.0.0.1:443"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "as alice in ops, staff" in run.stdout
