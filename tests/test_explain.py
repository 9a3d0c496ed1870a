"""``geproxy explain``: the policy dry run, with plugins written to files like an operator's."""

from __future__ import annotations

import io
import os
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
    assert "acl.request: allow (rule staff)" in out.getvalue()
    out = io.StringIO()
    assert explain(str(path), "CONNECT", "evil.example.net:443", client="10.2.3.4",
                   resolve=False, out=out) == 1
    assert "(rule others)" in out.getvalue() and "<- decides" in out.getvalue()
    out = io.StringIO()
    assert explain(str(path), "CONNECT", "api.example.com:443", client="192.0.2.1",
                   resolve=False, out=out) == 1
    assert "acl: decided at connect: deny (rule others)" in out.getvalue()
