"""The documentation is tested: options, hooks, errors, the example plugin, links, the unit.

A test here fails when an option or a hook is added without its documentation, when the docs
describe one that no longer exists, when a hook's docstring summary is not quoted in its
section, when the hooks table or the kinds of hook disagree with the hookspecs, when the
built-ins' place among the hooks or their registration order changes without the docs, when
the access log's fields move under the docs, when the example plugin, the example
distribution, their tests or the ``geproxy explain`` transcripts stop matching what the code
does, when an example imports what is not public, when a public name or a test-kit fixture or
helper is undocumented, when a runnable example fails, or when a link breaks.
"""

from __future__ import annotations

import ast
import configparser
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import geproxy
import geproxy.testing
from geproxy import DEFAULT_PLUGINS, ConfigError, Context, Record, errors, hookimpl
from geproxy.config import OptionRegistry, parse_duration
from geproxy.policy import hookspecs
from geproxy.policy.plugins import load, plugin_names
from geproxy.testing import curl, exchange, wait_for_records

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
CONFIGURATION = DOCS / "configuration.md"
PLUGINS = DOCS / "plugins.md"
SAMPLE = ROOT / "etc" / "geproxy.ini"
UNIT = ROOT / "etc" / "geproxy.service"


# -- helpers --------------------------------------------------------------------------------


class _RegistryProbe:
    """Receives the registry every plugin declares its options into (add_options is historic,
    so this plugin is called with the same registry as the others)."""

    name = "registry_probe"

    def __init__(self) -> None:
        self.registry: OptionRegistry | None = None

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        self.registry = registry


def _declared_options() -> OptionRegistry:
    """Every option of the core and the built-in plugins, loaded as a real start does."""
    probe = _RegistryProbe()
    pm, _ = load(str(SAMPLE), objects=[probe], entry_points=False)
    assert probe.registry is not None
    names = {name for name, _ in pm.list_name_plugin()}
    assert {name for name, _ in DEFAULT_PLUGINS} <= names
    return probe.registry


def _part(text: str, level: int, pattern: str) -> str:
    """The text under the first heading of ``level`` matching ``pattern``, up to the next
    heading of the same or a higher level ('' when there is none)."""
    hashes = "#" * level
    heading = re.search(rf"^{hashes} (?:{pattern}).*$", text, re.MULTILINE)
    if heading is None:
        return ""
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, heading.end())
    return text[heading.start(): end.start() if end else len(text)]


def _headings(text: str) -> list[str]:
    """Markdown headings, outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _fenced_after(text: str, marker: str) -> str:
    """The fenced code block right after an HTML comment ``marker``."""
    pattern = re.escape(marker) + r"\n```[a-z]*\n(.*?)^```$"
    found = re.search(pattern, text, re.DOTALL | re.MULTILINE)
    assert found, f"no code block after {marker} in plugins.md"
    return found.group(1)


def _hookspecs() -> list[Any]:
    return [obj for _, obj in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(obj, "geproxy_spec")]


# -- (a) every option is documented -------------------------------------------------------


def test_every_declared_option_is_documented() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    registry = _declared_options()
    assert "geproxy" in registry.options
    for section, options in registry.options.items():
        part = _part(text, 2, rf"`\[{re.escape(section)}\]`")
        assert part, f"configuration.md has no '## `[{section}]`' section"
        for key, option in options.items():
            sub = _part(part, 3, rf"`{re.escape(key)}`")
            assert sub, f"configuration.md: [{section}] has no '### `{key}`'"
            assert f"`{option.kind}`" in sub, f"[{section}] {key}: type {option.kind} not given"
            default = f"`{option.default}`" if option.default else "(empty)"
            assert f"Default {default}" in sub, (
                f"[{section}] {key}: the default {default} is not given as 'Default {default}'")


def test_no_documented_option_is_undeclared() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    registry = _declared_options()
    for heading in re.findall(r"^## `\[(\w+)\]`", text, re.MULTILINE):
        assert heading in registry.options, f"configuration.md documents [{heading}]"
        part = _part(text, 2, rf"`\[{heading}\]`")
        for key in re.findall(r"^### `(\w+)`", part, re.MULTILINE):
            assert key in registry.options[heading], f"[{heading}] {key} is not declared"


def test_every_error_is_in_the_table() -> None:
    """Each ProxyError the proxy can answer with has its status and Proxy-Status error."""
    rows = [line for line in CONFIGURATION.read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")]
    for name in errors.__all__:
        cls = getattr(errors, name)
        if not (isinstance(cls, type) and issubclass(cls, errors.ProxyError)):
            continue
        if cls is errors.ProxyError:
            continue
        row = next((r for r in rows if r.startswith(f"| `{name}` |")), None)
        assert row is not None, f"configuration.md: no row for errors.{name}"
        if cls is errors.ClientGone:  # nothing is ever sent for it
            continue
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == str(cls.status), f"{name}: status {cls.status}, docs {cells[1]}"
        assert cells[2] == f"`{cls.error}`", f"{name}: error {cls.error}, docs {cells[2]}"
        assert cells[3] == ("closed" if cls.close else "kept"), f"{name}: connection"


# -- (b) every hook is documented ---------------------------------------------------------


def test_every_hook_has_a_heading_with_its_signature() -> None:
    headings = _headings(PLUGINS.read_text(encoding="utf-8"))
    specs = _hookspecs()
    assert len(specs) >= 8
    for spec in specs:
        params = ", ".join(inspect.signature(spec).parameters)
        signature = f"`{spec.__name__}({params})`"
        assert signature in headings, f"plugins.md has no heading {signature}"


def test_no_documented_hook_is_undeclared() -> None:
    known = {spec.__name__ for spec in _hookspecs()}
    part = _part(PLUGINS.read_text(encoding="utf-8"), 2, "The hooks")
    for name in re.findall(r"^### `(\w+)\(", part, re.MULTILINE):
        assert name in known, f"plugins.md documents a hook {name} that does not exist"


def test_every_hook_section_quotes_its_docstring_summary() -> None:
    """The first line of each hookspec's docstring appears, word for word, in its section."""
    text = PLUGINS.read_text(encoding="utf-8")
    for spec in _hookspecs():
        summary = (inspect.getdoc(spec) or "").splitlines()[0].strip()
        assert summary, f"{spec.__name__} has no docstring summary"
        signature = f"`{spec.__name__}({', '.join(inspect.signature(spec).parameters)})`"
        section = _part(text, 3, re.escape(signature))
        assert section, f"plugins.md has no '### {signature}'"
        assert summary in section, (
            f"plugins.md, {signature}: the docstring summary is not quoted verbatim: {summary!r}")


def _refuses_wrappers(hook: str) -> bool:
    """Whether the load refuses a wrapper of ``hook``: the isolated hooks, whose
    implementations are each called whatever the others do."""

    class Wrapping:
        name = "wrapping"

        @hookimpl(wrapper=True, specname=hook)
        def wrap(self) -> Any:
            return (yield)

    try:
        load(str(SAMPLE), objects=[Wrapping()], entry_points=False)
    except ConfigError as exc:
        assert f"{hook} may not be a wrapper" in str(exc), exc
        return True
    return False


def _kinds() -> dict[str, str]:
    """Each hook's kind as the docs name it: ``first result``, or ``collect`` with
    ``historic`` or ``isolated``, from the hookspec and from what the load refuses."""
    kinds = {}
    for spec in _hookspecs():
        opts = spec.geproxy_spec
        if opts["firstresult"]:
            kinds[spec.__name__] = "first result"
            continue
        if opts["historic"]:  # pluggy allows no wrapper of a historic hook
            kinds[spec.__name__] = "collect, historic"
        elif _refuses_wrappers(spec.__name__):
            kinds[spec.__name__] = "collect, isolated"
        else:
            kinds[spec.__name__] = "collect"
    return kinds


def test_the_hooks_table_gives_every_hook_and_its_kind() -> None:
    part = _part(PLUGINS.read_text(encoding="utf-8"), 2, "The hooks")
    rows = {}
    for line in part.splitlines():
        found = re.match(r"\| `(\w+)\(([^)]*)\)` \| ([^|]+) \|", line)
        if found:
            rows[found.group(1)] = (found.group(2), found.group(3).strip())
    kinds = _kinds()
    assert "isolated" in kinds["on_close"] and "isolated" not in kinds["on_response"]
    assert sorted(rows) == sorted(kinds), "the hooks table of plugins.md: rows " + str(
        sorted(set(rows) ^ set(kinds)))
    for spec in _hookspecs():
        params, kind = rows[spec.__name__]
        assert params == ", ".join(inspect.signature(spec).parameters), spec.__name__
        assert kind == kinds[spec.__name__], f"{spec.__name__}: {kind}, not {kinds[spec.__name__]}"


def test_the_three_kinds_of_hook_name_every_hook() -> None:
    part = _part(PLUGINS.read_text(encoding="utf-8"), 3, "Three kinds of hook")
    kinds = _kinds()

    def listed(pattern: str) -> set[str]:
        found = re.search(pattern + r" \(([^)]*)\)", part)
        assert found, f"'Three kinds of hook' has no {pattern}"
        return set(re.findall(r"`(\w+)`", found.group(1)))

    assert listed(r"\*\*First result\*\*") == {h for h, k in kinds.items() if k == "first result"}
    assert listed(r"\*isolated\* ones") == {h for h, k in kinds.items() if "isolated" in k}
    assert listed(r"\*historic\* ones") == {h for h, k in kinds.items() if "historic" in k}
    assert "**Collect** (all the others)" in part


# -- (b2) the built-ins' place among the hooks -------------------------------------------


def _loaded_builtins() -> Any:
    pm, _ = load(str(SAMPLE), entry_points=False)
    return pm


def _impl_label(impl: Any, hook: str) -> str:
    """``plugin``, or ``plugin.function`` for an implementation named with specname."""
    name = impl.function.__name__
    return impl.plugin_name if name == hook else f"{impl.plugin_name}.{name}"


def _builtin_order(pm: Any, hook: str) -> list[str]:
    """The built-in implementations of ``hook``, in the order pluggy calls them."""
    builtins = {name for name, _ in DEFAULT_PLUGINS}
    impls = reversed(getattr(pm.hook, hook).get_hookimpls())
    return [_impl_label(impl, hook) for impl in impls if impl.plugin_name in builtins]


def _labels_in_order(text: str, labels: set[str]) -> list[str]:
    """The ``labels`` quoted in ``text`` (as `label`), in order of first appearance."""
    seen: list[str] = []
    for word in re.findall(r"`([\w.]+)`", text):
        if word in labels and word not in seen:
            seen.append(word)
    return seen


def test_the_order_table_matches_the_built_ins() -> None:
    """Each row of 'Where the built-ins sit' lists the built-ins in pluggy's call order."""
    pm = _loaded_builtins()
    part = _part(PLUGINS.read_text(encoding="utf-8"), 3, "Where the built-ins sit")
    assert part, "plugins.md has no '### Where the built-ins sit'"
    for spec in _hookspecs():
        hook = spec.__name__
        if hook in ("add_options", "configure"):
            continue  # every plugin with options has them; their order does not matter
        row = next((line for line in part.splitlines() if line.startswith(f"| `{hook}` |")),
                   None)
        assert row is not None, f"'Where the built-ins sit' has no row for {hook}"
        real = _builtin_order(pm, hook)
        labels = {_impl_label(impl, hook) for impl in getattr(pm.hook, hook).get_hookimpls()}
        labels |= {name for name, _ in DEFAULT_PLUGINS}
        cell = row.split("|")[2]
        assert _labels_in_order(cell, labels) == real, (
            f"{hook}: the docs give {_labels_in_order(cell, labels)}, pluggy calls {real}")
    # The nesting drawn for resolve, first word of each line.
    drawn = re.search(r"^```text\n(destinations.*?)^```$", part, re.DOTALL | re.MULTILINE)
    assert drawn, "no drawing of the resolve nesting"
    firsts = [line.split()[0] for line in drawn.group(1).splitlines() if line.strip()]
    resolve_labels = set(_builtin_order(pm, "resolve"))
    assert [w for w in firsts if w in resolve_labels] == _builtin_order(pm, "resolve")


def test_the_built_ins_are_listed_in_registration_order() -> None:
    """Wherever plugins.md lists the built-ins (a paragraph naming ``DEFAULT_PLUGINS``, a
    ``listening on ...; plugins:`` line), it lists all of them in the order they are
    registered."""
    pm, _ = load(str(SAMPLE), entry_points=False)
    order = plugin_names(pm)
    assert order == [name for name, _ in DEFAULT_PLUGINS]
    text = PLUGINS.read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if "DEFAULT_PLUGINS" in p]
    lists = [[w for w in re.findall(r"`(\w+)`", p) if w in order] for p in paragraphs]
    lists = [names for names in lists if names]
    assert len(lists) >= 3, "plugins.md names the built-ins less often than it did"
    for names in lists:
        assert names == order, f"plugins.md lists the built-ins as {names}, not {order}"
    lines = re.findall(r"; plugins: (.*)$", text, re.MULTILINE)
    assert len(lines) >= 3
    for line in lines:
        names = line.split(", ")
        assert names[:len(order)] == order, f"plugins.md: '; plugins: {line}'"
        assert not set(names[len(order):]) & set(order), line


def _access_log_fields() -> tuple[int, int]:
    """The rule's place (from 1) in the default access log line, and the line's fields: from
    what the access_log plugin writes, not from its docstring."""
    from geproxy_plugins.log_formats import FORMATS

    ctx = Context(client_addr=("192.0.2.1", 5000), server_addr=("127.0.0.1", 3128),
                  config=None, conn_id="c1", user="alice")
    record = Record(ctx, method="CONNECT", target="example.com:443", status=403,
                    error="http_request_denied", rule="the-rule", sni="example.org",
                    upstream_addr=("192.0.2.2", 443))
    fields = FORMATS["geproxy"](ctx, record).split(" ")
    return fields.index("the-rule") + 1, len(fields)


def test_the_rule_is_named_at_its_place_in_the_access_log() -> None:
    rule, total = _access_log_fields()
    text = PLUGINS.read_text(encoding="utf-8")
    said = re.findall(r"(\d+)(?:st|nd|rd|th) of the access log's\s+(\d+)\s+fields", text)
    assert len(said) >= 2, "plugins.md no longer says where the access log has the rule"
    for place, count in said:
        assert (int(place), int(count)) == (rule, total), (
            f"plugins.md: the {place}th of {count} fields; the rule is the {rule}th of {total}")
    assert "last field" not in text
    shown = re.findall(r"^    (\d{10}\.\d{3} .*)$", text, re.MULTILINE)
    assert shown, "no access log line in plugins.md"
    for line in shown:
        fields = line.split(" ")
        assert len(fields) == total, f"plugins.md: {line!r} has {len(fields)} fields"
        assert fields[rule - 1] == "deny_ports", line


def test_the_built_in_table_gives_each_implementation_and_its_marker() -> None:
    """'What the built-in plugins leave for yours' names every hook implementation of every
    built-in, with tryfirst, trylast and wrapper as the code marks it."""
    pm = _loaded_builtins()
    part = _part(PLUGINS.read_text(encoding="utf-8"), 2, "What the built-in plugins leave")
    assert part, "plugins.md has no '## What the built-in plugins leave for yours'"
    for name, _ in DEFAULT_PLUGINS:
        row = next((line for line in part.splitlines() if line.startswith(f"| `{name}` |")),
                   None)
        assert row is not None, f"no row for the built-in {name}"
        given = {m.group(1): m.group(2) or "" for m in
                 re.finditer(r"`(\w+)`(?: \(([^)]*)\))?", row.split("|")[2])}
        impls = [impl for spec in _hookspecs()
                 for impl in getattr(pm.hook, spec.__name__).get_hookimpls()
                 if impl.plugin_name == name]
        assert sorted(given) == sorted(impl.function.__name__ for impl in impls), (
            f"{name}: the docs list {sorted(given)}")
        for impl in impls:
            markers = given[impl.function.__name__]
            for marker, marked in (("tryfirst", impl.tryfirst), ("trylast", impl.trylast),
                                   ("wrapper", impl.wrapper)):
                assert (marker in markers) == bool(marked), (
                    f"{name}.{impl.function.__name__}: {marker} is "
                    f"{'missing from' if marked else 'wrong in'} the docs")


# -- (c) the example plugin is real ------------------------------------------------------


def test_the_example_files_in_the_docs_are_the_files() -> None:
    """Each ``<!-- include: PATH -->`` block of plugins.md is the file at PATH, word for word:
    the example plugin, and the example distribution's setup.py."""
    text = PLUGINS.read_text(encoding="utf-8")
    paths = re.findall(r"<!-- include: (\S+) -->", text)
    assert "examples/deny_ports.py" in paths and "../examples/blocklist/setup.py" in paths
    for path in paths:
        shown = _fenced_after(text, f"<!-- include: {path} -->")
        assert shown == (DOCS / path).read_text(encoding="utf-8"), f"plugins.md shows {path}"


#: What an example may import from geproxy: the package, and the test kit.
PUBLIC_MODULES = {"geproxy", "geproxy.testing", "geproxy.testing.h2client"}


def _python_sources() -> list[tuple[str, str]]:
    """(name, code) of every example: the files of docs/examples and examples/, and the
    python blocks of plugins.md."""
    files = [*sorted(EXAMPLES.glob("*.py")), *sorted((ROOT / "examples").rglob("*.py"))]
    sources = [(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")) for path in files]
    blocks = re.findall(r"^```python\n(.*?)^```$", PLUGINS.read_text(encoding="utf-8"),
                        re.DOTALL | re.MULTILINE)
    sources += [(f"plugins.md, python block {n + 1}", b) for n, b in enumerate(blocks)]
    return sources


def test_the_examples_import_the_public_api_only() -> None:
    """The examples follow the rule plugins.md gives: from geproxy, nothing but what
    ``geproxy`` exports (and the test kit, for tests)."""
    sources = _python_sources()
    assert any("blocklist" in name for name, _ in sources)
    for name, code in sources:
        for node in ast.walk(ast.parse(code, name)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                if node.module == "geproxy":
                    private = [a.name for a in node.names if a.name not in geproxy.__all__]
                    assert not private, f"{name}: from geproxy import {private}: not public"
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "geproxy":
                    assert module in PUBLIC_MODULES, f"{name}: imports {module}, not public"


def test_every_public_name_is_in_the_public_api_section() -> None:
    part = _part(PLUGINS.read_text(encoding="utf-8"), 2, "The public API")
    listing = re.search(r"^```python\nfrom geproxy import \((.*?)^\)$", part,
                        re.DOTALL | re.MULTILINE)
    assert listing, "plugins.md, The public API: no import list"
    shown = set(re.findall(r"^    (\w+),", listing.group(1), re.MULTILINE))
    public = set(geproxy.__all__)
    assert shown == public, f"missing {sorted(public - shown)}, not public {sorted(shown - public)}"
    assert "### `HostPatterns`" in part


def test_the_runnable_examples_run() -> None:
    """Blocks marked ``<!-- run -->`` state behaviour with asserts: they are run."""
    ran = 0
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        for number, block in enumerate(re.findall(r"<!-- run -->\n```python\n(.*?)^```$", text,
                                                  re.DOTALL | re.MULTILINE)):
            exec(compile(block, f"{doc.name}, runnable block {number + 1}", "exec"), {})
            ran += 1
    assert ran >= 1


def test_the_example_plugin_refuses_other_connect_ports(proxy_factory, origin, raw_origin,
                                                       monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    proxy = proxy_factory(
        "[geproxy]\nplugins = deny_ports:DenyPorts\n"
        f"[deny_ports]\nallowed = 443, {origin.port}\n")
    assert "deny_ports" in [name for name, _ in proxy.server.pm.list_name_plugin()]

    out = curl("-p", "-x", proxy.url, origin.url("/"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello\n"

    other = raw_origin(lambda sock: None)  # listening, so only the policy can refuse
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{other.port} HTTP/1.1\r\n\r\n".encode(),
                      until_close=False)
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert b"\r\nProxy-Status: geproxy; error=http_request_denied\r\n" in answer
    assert b"deny_ports" not in answer  # the rule stays in the log
    assert other.accepted == 0

    records = wait_for_records(proxy, 2)
    assert sorted((r.method, r.status, r.rule or "") for r in records) == [
        ("CONNECT", 200, ""), ("CONNECT", 403, "deny_ports")]


def test_the_example_plugin_reports_a_bad_value(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    path = tmp_path / "bad.ini"
    path.write_text("[geproxy]\nplugins = deny_ports:DenyPorts\naccess_log = off\n"
                    "[deny_ports]\nallowed = 443 https\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), entry_points=False)
    assert str(caught.value) == (
        f"{path}:5: [deny_ports] allowed: not a port or a port range: 'https'")


def test_the_example_identity_plugin_gives_acl_its_groups(proxy_factory, origin, tmp_path,
                                                          monkeypatch) -> None:
    """docs/examples/static_groups.py, loaded as plugins.md's Identity section loads it: its
    groups decide a group rule; a request that proves no user gets 407 with auth's
    challenge, a user outside the group 403, a user inside 200."""
    from passlib.hash import bcrypt

    monkeypatch.syspath_prepend(str(EXAMPLES))
    hashed = bcrypt.using(ident="2y", rounds=4).hash
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{hashed('alice-pw')}\ncarol:{hashed('carol-pw')}\n")
    proxy = proxy_factory(
        "[geproxy]\nplugins = static_groups:StaticGroups\n"
        "[static_groups]\ngroups =\n    staff: alice bob\n    contractors: carol\n"
        f"[auth]\nhtpasswd = {htpasswd}\n"
        "[acl]\nconnect_ports = 1-65535\nrules =\n    staff: allow group staff\n"
        "    deny all\n")
    assert "static_groups" in [name for name, _ in proxy.server.pm.list_name_plugin()]
    url = origin.url("/")

    def status(*credentials: str) -> tuple[int, bytes]:
        out = curl("-i", "-x", proxy.url, *credentials, url)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split(b" ", 2)[1]), out.stdout

    code, answer = status()
    assert code == 407 and b'\r\nProxy-Authenticate: Basic realm="geproxy"\r\n' in answer
    assert status("--proxy-user", "alice:wrong")[0] == 407
    assert status("--proxy-user", "carol:carol-pw")[0] == 403
    code, answer = status("--proxy-user", "alice:alice-pw")
    assert code == 200 and answer.endswith(b"hello\n"), answer

    records = wait_for_records(proxy, 4)
    assert sorted((r.status, r.rule or "", r.ctx.user or "") for r in records) == [
        (200, "", "alice"), (403, "line 2", "carol"), (407, "staff", ""), (407, "staff", "")]


def test_the_example_identity_plugin_reports_a_bad_line(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    path = tmp_path / "bad.ini"
    path.write_text("[geproxy]\nplugins = static_groups:StaticGroups\naccess_log = off\n"
                    "[static_groups]\ngroups =\n    staff alice\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), entry_points=False)
    assert str(caught.value) == (
        f"{path}:5: [static_groups] groups: not 'group: user user ...': 'staff alice'")


@pytest.mark.parametrize("conftest", ["conftest.py",
                                      "conftest.py, every test checked for leaks"])
def test_the_test_kit_example_runs(tmp_path, conftest, run_suite) -> None:
    """The conftest.py and test file shown in plugins.md pass, as a plugin author runs them;
    with the conftest.py that checks every test for leaks too."""
    text = PLUGINS.read_text(encoding="utf-8")
    output = run_suite(tmp_path, {
        "conftest.py": _fenced_after(text, f"<!-- file: {conftest} -->"),
        "test_deny_ports.py": _fenced_after(text, "<!-- file: test_deny_ports.py -->"),
    }, pythonpath=[EXAMPLES])
    assert "4 passed" in output, output


def _comparable(transcript: str, known: set[str]) -> list[str]:
    """The lines of an explain transcript, without trailing blanks and without the lines of
    plugins outside ``known``: entry points installed in one environment and not another."""
    lines = []
    for line in transcript.splitlines():
        plugin = re.match(r"  (\S+) ", line)
        if plugin and plugin.group(1) not in known:
            continue
        lines.append(line.rstrip())
    return lines


def test_the_explain_transcripts_are_what_explain_prints(tmp_path) -> None:
    """Each ``geproxy explain`` run shown in plugins.md, rerun on the configuration shown."""
    text = PLUGINS.read_text(encoding="utf-8")
    (tmp_path / "geproxy.ini").write_text(_fenced_after(text, "<!-- file: geproxy.ini -->"))
    blocks = re.findall(r"<!-- explain -->\n```console\n(.*?)^```$", text,
                        re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 3
    known = {name for name, _ in DEFAULT_PLUGINS} | {"deny_ports"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # This checkout's geproxy, as the in-process tests import it.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(EXAMPLES), str(ROOT), env.get("PYTHONPATH")]))
    for block in blocks:
        command, *shown = block.splitlines()
        assert command.startswith("$ geproxy explain "), command
        result = subprocess.run(
            [sys.executable, "-m", "geproxy", *shlex.split(command[2:])[1:]],
            cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False)
        printed = result.stdout.decode(errors="replace")
        assert _comparable(printed, known) == _comparable("\n".join(shown), known), (
            f"{command}\n{printed}{result.stderr.decode(errors='replace')}")
        refused = shown[-1].split() == ["verdict", "refused"]
        assert result.returncode == (1 if refused else 0), command


def test_every_kit_fixture_and_helper_is_documented() -> None:
    part = _part(PLUGINS.read_text(encoding="utf-8"), 2, "The test kit")
    assert part, "plugins.md has no '## The test kit'"
    source = inspect.getsource(geproxy.testing)
    fixtures = re.findall(r"^@pytest\.fixture[^\n]*\ndef (\w+)", source, re.MULTILINE)
    assert "proxy_factory" in fixtures and "dns_server" in fixtures
    for name in [*fixtures, *geproxy.testing.__all__]:
        assert re.search(rf"`{re.escape(name)}[`(]", part), (
            f"plugins.md, The test kit: {name} is not documented")


def test_python_blocks_in_the_docs_compile() -> None:
    compiled = 0
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        blocks = re.findall(r"^( *)```python\n(.*?)^\1```$", text, re.DOTALL | re.MULTILINE)
        for number, (indent, block) in enumerate(blocks):
            code = textwrap.dedent(block) if indent else block
            compile(code, f"{doc.name}, python block {number + 1}", "exec")
            compiled += 1
    assert compiled >= 10, compiled  # the examples were found, not skipped


# -- (d) links ---------------------------------------------------------------------------


def _markdown_files() -> list[Path]:
    others = [ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md", ROOT / "fuzz" / "README.md",
              ROOT / "examples" / "blocklist" / "README.md"]
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *(p for p in others if p.exists())]


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```$", "", text, flags=re.DOTALL | re.MULTILINE)  # not in code blocks
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            slugs = {_slug(h) for h in _headings(linked.read_text(encoding="utf-8"))}
            assert anchor in slugs, f"{doc.name}: link to {target}: no such heading"


# -- (e) the systemd unit ----------------------------------------------------------------


def test_the_systemd_unit_runs_geproxy_with_its_config() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    service = unit["Service"]
    command = service["ExecStart"].split()
    assert command[0].endswith("/geproxy")
    assert "--config" in command and command[command.index("--config") + 1].endswith(".ini")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["LimitNOFILE"]) >= 2 * 10000 + 4096
    # The stop timeout leaves room for the sample's graceful_timeout and the 5 s kill grace.
    sample = configparser.ConfigParser(interpolation=None)
    sample.read(SAMPLE, encoding="utf-8")
    graceful = parse_duration(sample["geproxy"]["graceful_timeout"])
    assert parse_duration(service["TimeoutStopSec"]) > graceful + 5
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP reloads


def test_deployment_names_every_dependency() -> None:
    """The installation section lists what ``pip install`` will bring: setup.py's
    install_requires, by name."""
    import ast

    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(setup) if isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    names = {re.split(r"[\[<>=~!; ]", ast.literal_eval(item))[0]
             for item in requires.elts}  # type: ignore[attr-defined]
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    installing = text.split("## Installing", 1)[1].split("\n## ", 1)[0]
    missing = sorted(name for name in names if name not in installing)
    assert not missing, f"deployment.md's Installing section does not name {missing}"
