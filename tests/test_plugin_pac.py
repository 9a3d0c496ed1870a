"""The ``pac`` plugin: the PAC file on the proxy port, and what its JavaScript answers.

The script is run by node (real JavaScript, in a fresh ``vm`` context holding only the PAC
helper functions as browsers define them, Mozilla's and Chromium's code), so its logic is
checked, not its text. ``isInNet`` and ``dnsResolve`` refuse host names there: a PAC that
made the browser resolve a name would fail the test.

The ``[parents]`` section belongs to the ``parent`` plugin: registered here while it is
not a built-in, or, should it be missing, replaced by a small plugin that declares the
section, which is all the PAC reads of it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import socket
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Optional

import pytest
from geproxy_plugins.pac import CACHE_SIZE, PAC, _glob_regex, parse_parent_rules

from geproxy import (
    DEFAULT_PLUGINS,
    ConfigError,
    HostPatterns,
    OptionRegistry,
    RouteRule,
    hookimpl,
)
from geproxy.policy.plugins import load
from geproxy.testing import curl, exchange, require_tool

pytestmark = pytest.mark.timeout(30)

try:
    from geproxy_plugins.parent import Parent
except ImportError:  # not written yet: FakeParents declares its section
    Parent = None

PAC_IS_BUILTIN = any(name == "pac" for name, _ in DEFAULT_PLUGINS)
PARENT_IS_BUILTIN = any(name == "parent" for name, _ in DEFAULT_PLUGINS)
CONTENT_TYPE = "application/x-ns-proxy-autoconfig"


class FakeParents:
    """Declares ``[parents]`` as the ``parent`` plugin does, and nothing else."""

    name = "fake_parents"

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (registry.section("parents")
         .add("parents", "list", "", "Parent proxies.")
         .add("rules", "lines", "", "direct|parent HOSTS, first match wins."))


def _plugins(*others: Any, parents: bool = False) -> list[Any]:
    out = [*others]
    if not PAC_IS_BUILTIN:
        out.append(PAC())
    if parents and not PARENT_IS_BUILTIN:
        out.append(Parent() if Parent is not None else FakeParents())
    return out


def _parents_ini(rules: str) -> str:
    return ("[parents]\nparents = http://127.0.0.1:9\nrules =\n"
            + textwrap.indent(textwrap.dedent(rules).strip(), "    ") + "\n")


def _start(proxy_factory, ini: str = "", rules: Optional[str] = None):
    if rules is not None:
        ini += _parents_ini(rules)
    return proxy_factory(ini, plugins=_plugins(parents=rules is not None))


def _split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body


def _get(url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    out = curl("-i", *args, url, timeout=20)
    assert out.returncode == 0, out.stderr
    return _split(out.stdout)


def _fetch(proxy) -> str:
    status, fields, body = _get(f"{proxy.url}/proxy.pac")
    assert status == 200 and fields["content-type"] == CONTENT_TYPE
    return body.decode("ascii")


# -- running the script ---------------------------------------------------------------------

#: The PAC helpers as browsers define them (Mozilla's ascii_pac_utils, which Chromium
#: shares), except that resolving a name is an error here.
PAC_UTILS = r"""
function dnsResolve(host) { throw new Error("the PAC resolved " + host); }
function isPlainHostName(host) { return host.search('\\.') == -1; }
function dnsDomainIs(host, domain) {
    return host.length >= domain.length &&
        host.substring(host.length - domain.length) == domain;
}
function shExpMatch(url, pattern) {
    pattern = pattern.replace(/\./g, '\\.');
    pattern = pattern.replace(/\*/g, '.*');
    pattern = pattern.replace(/\?/g, '.');
    return new RegExp('^' + pattern + '$').test(url);
}
function convert_addr(ipchars) {
    var bytes = ipchars.split('.');
    return ((bytes[0] & 0xff) << 24) | ((bytes[1] & 0xff) << 16) |
        ((bytes[2] & 0xff) << 8) | (bytes[3] & 0xff);
}
function isInNet(ipaddr, pattern, maskstr) {
    var test = /^(\d{1,4})\.(\d{1,4})\.(\d{1,4})\.(\d{1,4})$/.exec(ipaddr);
    if (test == null) {
        ipaddr = dnsResolve(ipaddr);
    } else if (test[1] > 255 || test[2] > 255 || test[3] > 255 || test[4] > 255) {
        return false;
    }
    var host = convert_addr(ipaddr), pat = convert_addr(pattern), mask = convert_addr(maskstr);
    return (host & mask) == pat;
}
"""

RUNNER = r"""
const vm = require("vm");
const fs = require("fs");
const input = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const sandbox = vm.createContext({});
vm.runInContext(input.utils, sandbox);
vm.runInContext(input.script, sandbox, {filename: "proxy.pac"});
const out = {};
for (const host of input.hosts) {
    out[host] = input.expressions ? vm.runInContext(host, sandbox)
        : sandbox.FindProxyForURL("http://" + host + "/path", host);
}
process.stdout.write(JSON.stringify(out));
"""


def _node(tmp_path: Path, script: str, hosts: list[str], expressions: bool = False
          ) -> dict[str, Any]:
    node = require_tool("node")
    runner = tmp_path / "runner.js"
    runner.write_text(RUNNER)
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"utils": PAC_UTILS, "script": script, "hosts": hosts,
                                "expressions": expressions}))
    out = subprocess.run([node, str(runner), str(data)], capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)


def _evaluate(tmp_path: Path, script: str, expected: dict[str, str]) -> None:
    got = _node(tmp_path, script, list(expected))
    assert got == expected


# -- serving --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/proxy.pac", "/wpad.dat", "/proxy.pac?v=2"])
def test_get_serves_the_pac_from_the_proxy_port(proxy_factory, path):
    proxy = _start(proxy_factory)
    status, fields, body = _get(proxy.url + path)
    assert status == 200
    assert fields["content-type"] == CONTENT_TYPE
    assert fields["cache-control"] == "max-age=300"
    assert int(fields["content-length"]) == len(body)
    text = body.decode("ascii")
    assert "function FindProxyForURL(url, host)" in text
    assert f'"PROXY 127.0.0.1:{proxy.port}"' in text


def test_head_answers_the_head_alone(proxy_factory):
    proxy = _start(proxy_factory)
    body = _fetch(proxy).encode()
    raw = exchange(proxy.address, b"HEAD /wpad.dat HTTP/1.1\r\nHost: proxy\r\n"
                                  b"Connection: close\r\n\r\n")
    status, fields, rest = _split(raw)
    assert (status, fields["content-type"], rest) == (200, CONTENT_TYPE, b"")
    assert int(fields["content-length"]) == len(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "OPTIONS", "DELETE"])
def test_other_methods_are_answered_405_with_allow(proxy_factory, method):
    proxy = _start(proxy_factory)
    status, fields, body = _get(f"{proxy.url}/proxy.pac", "-X", method, "-d", "x=1")
    assert (status, fields["allow"]) == (405, "GET, HEAD")
    assert body == b"405 Method Not Allowed\n"


def test_other_requests_go_on_as_before(proxy_factory, origin):
    proxy = _start(proxy_factory)
    # An absolute-form request for another host's /proxy.pac is forwarded, not answered.
    out = curl("-x", proxy.url, origin.url("/proxy.pac"), timeout=20)
    assert (out.returncode, out.stdout) == (0, b"hello\n"), out.stderr
    assert [seen.path for seen in origin.seen] == ["/proxy.pac"]
    # The proxy's own other pages are untouched.
    assert _get(f"{proxy.url}/healthz")[::2] == (200, b"ok\n")
    assert _get(f"{proxy.url}/other.pac")[0] == 404


def test_absolute_form_to_the_proxy_itself_is_served(proxy_factory):
    proxy = _start(proxy_factory)
    status, fields, body = _get(f"{proxy.url}/proxy.pac", "-x", proxy.url)
    assert (status, fields["content-type"]) == (200, CONTENT_TYPE)
    assert f"PROXY 127.0.0.1:{proxy.port}" in body.decode()


def test_ipv6_listener_names_its_bracketed_address(proxy_factory):
    probe = socket.socket(socket.AF_INET6) if socket.has_ipv6 else None
    try:
        if probe is None:
            pytest.skip("no IPv6")
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    finally:
        if probe is not None:
            probe.close()
    proxy = _start(proxy_factory, "listen = [::1]:0\n")
    status, _, body = _get(f"http://[::1]:{proxy.port}/proxy.pac")
    assert status == 200
    assert f'"PROXY [::1]:{proxy.port}"' in body.decode()


def test_a_client_the_acl_denies_gets_403_not_the_pac(proxy_factory):
    # The PAC answers only after every policy plugin let the request through.
    proxy = _start(proxy_factory, "[acl]\nrules =\n    allow src 127.0.0.0/8 method CONNECT\n")
    status, fields, _ = _get(f"{proxy.url}/proxy.pac")
    assert status == 403 and fields["content-type"] != CONTENT_TYPE


def test_options_paths_max_age_fallback_and_proxy(proxy_factory, tmp_path):
    proxy = _start(proxy_factory, "[pac]\npaths = /x.pac\nmax_age = 0\nfallback_direct = on\n"
                                  "direct_local = off\n"
                                  "proxy = proxy.corp.example:3128 [2001:db8::1]:8080\n")
    assert _get(f"{proxy.url}/proxy.pac")[0] == 404
    status, fields, body = _get(f"{proxy.url}/x.pac")
    assert (status, fields["cache-control"]) == (200, "max-age=0")
    answer = "PROXY proxy.corp.example:3128; PROXY [2001:db8::1]:8080; DIRECT"
    _evaluate(tmp_path, body.decode(), {"localhost": answer, "intranet": answer,
                                        "127.0.0.1": answer, "example.com": answer})


# -- what the script answers ----------------------------------------------------------------


def test_without_parents_only_local_hosts_go_direct(proxy_factory, tmp_path):
    # No [parents] section at all: the parent plugin is absent (or disabled).
    proxy = _start(proxy_factory, "disable = parent\n" if PARENT_IS_BUILTIN else "")
    assert "parents" not in proxy.server.config
    script = _fetch(proxy)
    assert "[parents] rules line" not in script
    via = f"PROXY 127.0.0.1:{proxy.port}"
    _evaluate(tmp_path, script, {
        "localhost": "DIRECT", "app.localhost": "DIRECT", "intranet": "DIRECT",
        "INTRANET.": "DIRECT", "127.0.0.1": "DIRECT", "127.9.9.9": "DIRECT", "[::1]": "DIRECT",
        "::1": "DIRECT", "example.com": via, "10.1.2.3": via, "[2001:db8::1]": via,
        "localhost.example.com": via, "128.0.0.1": via,
    })


def _rule_verdict(rules: list[str], host: str) -> Optional[str]:
    """What the first [parents] rule that matches ``host`` says, as the parent plugin reads
    the rules; None when none does."""
    for line in rules:
        action, *values = line.replace(",", " ").split()
        if values == ["all"] or HostPatterns.parse(values).match(host):
            return action
    return None


RULES = [
    "parent vault.internal.example",
    "direct .internal.example exact.test *.cdn.test web-[0-9].glob.test",
    "direct 10.0.0.0/8, 192.168.1.7 fd00::/8",
    "parent *",
    "direct .never.test 172.16.0.0/12",
]


def test_parents_rules_decide_first_match_wins(proxy_factory, tmp_path):
    proxy = _start(proxy_factory, rules="\n".join(RULES))
    script = _fetch(proxy)
    via = f"PROXY 127.0.0.1:{proxy.port}"
    expected = {
        "vault.internal.example": via,        # the parent line before it wins
        "internal.example": "DIRECT", "a.b.internal.example": "DIRECT",
        "A.Internal.Example.": "DIRECT", "xinternal.example": via,
        "exact.test": "DIRECT", "sub.exact.test": via,
        "img.cdn.test": "DIRECT", "cdn.test": via,
        "web-7.glob.test": "DIRECT", "web-x.glob.test": via, "web-10.glob.test": via,
        "10.1.2.3": "DIRECT", "11.1.2.3": via, "192.168.1.7": "DIRECT", "192.168.1.8": via,
        "[fd00::1]": "DIRECT", "fd12:3456::1": "DIRECT", "[fe80::1]": via,
        "[::ffff:10.1.2.3]": "DIRECT", "[::ffff:a01:203]": "DIRECT", "[::ffff:b01:203]": via,
        "a.never.test": via,                  # parent * took every name
        "172.16.9.9": "DIRECT",               # but no IP literal
        "example.com": via, "localhost": "DIRECT", "printer": "DIRECT",
    }
    _evaluate(tmp_path, script, expected)
    # The same verdicts as HostPatterns gives, rule by rule, for what is not direct_local.
    for host, answer in expected.items():
        name = host.strip("[]").rstrip(".").lower()
        if name not in ("localhost", "printer"):
            assert (answer == "DIRECT") == (_rule_verdict(RULES, name) == "direct"), host


def test_all_answers_for_every_host_left(proxy_factory, tmp_path):
    proxy = _start(proxy_factory, rules="parent .corp.example 10.0.0.0/8\ndirect all\n"
                                        "parent .never.example\n")
    script = _fetch(proxy)
    via = f"PROXY 127.0.0.1:{proxy.port}"
    _evaluate(tmp_path, script, {"a.corp.example": via, "10.1.2.3": via,
                                 "a.never.example": "DIRECT", "example.com": "DIRECT",
                                 "192.0.2.1": "DIRECT", "[2001:db8::1]": "DIRECT"})


def test_no_direct_rule_no_rule_in_the_script(proxy_factory, tmp_path):
    proxy = _start(proxy_factory, rules="parent .corp.example\nparent all\n")
    script = _fetch(proxy)
    assert "[parents] rules line" not in script and "geproxyIPv6" not in script
    via = f"PROXY 127.0.0.1:{proxy.port}"
    _evaluate(tmp_path, script, {"a.corp.example": via, "example.com": via, "local": "DIRECT"})


def test_bracket_globs_match_what_fnmatch_matches(tmp_path):
    globs = ["web-[0-9].x", "a[!b]c", "a[]]b", "a[!]b", "h[z-a]t", "x[a-c-e]y", "[!0-9]*",
             "a[b*", "ho?t[!.].*", "a[---]b", "a]*"]
    hosts = ["web-1.x", "web-a.x", "abc", "acc", "a]b", "a[!]b", "hat", "hzt", "xby", "xdy",
             "x-y", "xey", "x1y", "zoo", "9oo", "a[b", "host1.x", "host..x", "a-b", "a.b",
             "web-11.x"]
    for glob in globs:
        HostPatterns.parse([glob])  # each is a valid pattern
    cases = [f"{_glob_regex(glob)}.test({json.dumps(host)})" for glob in globs
             for host in hosts]
    got = _node(tmp_path, "", cases, expressions=True)
    for glob in globs:
        for host in hosts:
            case = f"{_glob_regex(glob)}.test({json.dumps(host)})"
            assert got[case] == fnmatch.fnmatchcase(host, glob), (glob, host)


# -- rules and configuration, without a proxy ------------------------------------------------


@pytest.mark.pure
def test_parent_rules_as_the_pac_reads_them(caplog):
    checks = parse_parent_rules(["parent a.example", "", "direct .office.example",
                                 "parent b.example"])
    # A check for the proxy after the last DIRECT one is dropped.
    assert [(c.direct, c.line) for c in checks] == [(False, 1), (True, 3)]
    assert checks[1].hosts is not None and checks[1].hosts.domains == ("office.example",)
    # all: nothing after it is reachable.
    checks = parse_parent_rules(["direct .a.example", "direct all", "parent .b.example"])
    assert [(c.line, c.hosts) for c in checks][1:] == [(2, None)]
    assert [c.line for c in parse_parent_rules(["direct .a.example", "parent all",
                                                "direct .b.example"])] == [1]
    # A line that cannot be read ends the list: every later host goes to the proxy.
    for bad in ("parent", "office: direct .b.example", "direct bad!name", "direct .c all",
                "via .b.example"):
        with caplog.at_level(logging.WARNING):
            checks = parse_parent_rules(["direct .a.example", bad, "direct .b.example"])
        assert [c.line for c in checks] == [1], bad
        assert "line 2 and the lines after it are left out" in caplog.text


@pytest.mark.pure
def test_the_pac_reads_parent_rules_with_the_parent_plugins_grammar(caplog):
    """One grammar, geproxy.RouteRule: the checks are the parent plugin's rules, and a line
    the parent plugin refuses ends the PAC's list for the very reason it gives."""
    from geproxy_plugins.parent import parse_rules

    lines = ["direct .corp.example, 10.0.0.0/8", "parent *.cdn.example", "direct all"]
    rules, checks = parse_rules(lines), parse_parent_rules(lines)
    assert [(not rule.via_parent, rule.patterns) for rule in rules] == [
        (check.direct, check.hosts) for check in checks]
    for bad in ("direct", "via .b.example", "direct .c all", "direct bad!name", "office:"):
        with pytest.raises(ValueError) as refused:
            RouteRule.parse(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert parse_parent_rules(["direct .a.example", bad]) == parse_parent_rules(
                ["direct .a.example"])
        assert "line 2 and the lines after it are left out" in caplog.text
        assert caplog.text.rstrip().endswith(str(refused.value)), caplog.text


def _load(tmp_path: Path, ini: str, parents: bool = False) -> tuple[PAC, Any]:
    path = tmp_path / "pac.ini"
    path.write_text(ini)
    pm, config = load(str(path), objects=_plugins(parents=parents), entry_points=False)
    plugin = pm.get_plugin("pac")
    assert isinstance(plugin, PAC)
    return plugin, config


def test_the_text_is_built_once_per_address_and_the_cache_is_bounded(tmp_path):
    plugin, _ = _load(tmp_path, "")
    first = plugin.text(("127.0.0.1", 3128))
    assert plugin.text(("127.0.0.1", 3128)) is first
    assert b'"PROXY 127.0.0.1:3128"' in first
    # A client of a dual-stack listener on IPv4 reaches an IPv4-mapped address.
    assert b'"PROXY 127.0.0.1:3129"' in plugin.text(("::ffff:127.0.0.1", 3129))
    for i in range(CACHE_SIZE + 10):
        plugin.text((f"10.0.{i // 256}.{i % 256}", 3128))
    assert len(plugin._texts) == CACHE_SIZE


@pytest.mark.parametrize("ini, key", [
    ("[pac]\npaths = proxy.pac\n", "paths"),
    ("[pac]\nproxy = proxy.example\n", "proxy"),
    ("[pac]\nproxy = 2001:db8::1:3128\n", "proxy"),
    ("[pac]\nproxy = bad_name:3128\n", "proxy"),
    ("[pac]\nproxy = proxy.example:0\n", "proxy"),
    ("[pac]\nmax_age = soon\n", "max_age"),
])
def test_bad_options_stop_the_start(tmp_path, ini, key):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, ini)
    assert (info.value.section, info.value.key) == ("pac", key)


def test_a_pac_from_a_tls_listener_names_it_https(proxy_factory, tls_files, tmp_path):
    """Browsers that fetched the file from a tls:// listener must speak TLS to it: HTTPS,
    not PROXY (Chrome and Firefox read both); https:// in [pac] proxy says the same."""
    proxy = _start(proxy_factory, "listen = 127.0.0.1:0, tls://127.0.0.1:0\n"
                                  + tls_files.ini())
    host, port = proxy.tls_address
    status, _, body = _get(f"https://{host}:{port}/proxy.pac", "--cacert", tls_files.ca_file)
    assert status == 200
    answer = f"HTTPS 127.0.0.1:{port}"
    _evaluate(tmp_path, body.decode(), {"example.com": answer})
    assert f"PROXY 127.0.0.1:{proxy.port}" in _fetch(proxy)  # the plain port: PROXY
    named = _start(proxy_factory, "[pac]\nproxy = https://proxy.corp.example:3129 "
                                  "proxy.corp.example:3128\n")
    _evaluate(tmp_path, _fetch(named), {"example.com": "HTTPS proxy.corp.example:3129; "
                                                       "PROXY proxy.corp.example:3128"})
