"""Configuration: value parsers, the sample file, validation errors and plugin loading.

In-process and socket-free: ``plugins.load`` reads a file, builds a plugin manager and
configures the plugins, which is everything a start does before it binds.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest

from geproxy import ConfigError, hookimpl
from geproxy.config import (
    OptionRegistry,
    parse_bool,
    parse_duration,
    parse_lines,
    parse_list,
    parse_listen,
    parse_port_ranges,
    parse_size,
    read_ini,
)
from geproxy.policy.plugins import DEFAULT_PLUGINS, get_plugin_manager, load, plugin_names

pytestmark = pytest.mark.timeout(30)

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "geproxy.ini"


def write_ini(tmp_path: Path, text: str, name: str = "geproxy.ini") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def declared_options() -> OptionRegistry:
    """The options of the core and of every built-in plugin, as a start would collect them."""
    pm = get_plugin_manager(entry_points=False)
    registry = OptionRegistry()
    pm.hook.add_options.call_historic(kwargs={"registry": registry})
    return registry


# -- value parsers -------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25),
    ("3s", 3.0),
    ("5m", 300.0),
    ("1h", 3600.0),
    ("2d", 172800.0),
    ("1.5s", 1.5),
    ("10", 10.0),
    (" 30s ", 30.0),
    ("0s", 0.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    value = parse_duration(text)
    assert value == pytest.approx(seconds)
    assert isinstance(value, float)


@pytest.mark.parametrize("text", ["", "soon", "s", "ms", "-1s", "3 seconds", "10x", "1e3s",
                                  "1h30m", "3s3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text, size", [
    ("512", 512),
    ("64KiB", 65536),
    ("1MiB", 1048576),
    ("2GiB", 2 * 1024**3),
    ("64 KiB", 65536),
    ("100B", 100),
    ("0", 0),
])
def test_parse_size(text: str, size: int) -> None:
    value = parse_size(text)
    assert value == size
    assert isinstance(value, int)


@pytest.mark.parametrize("text", ["", "KiB", "-1", "1.5MiB", "64XB", "64KiB KiB", "lots",
                                  "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text, value", [
    ("on", True), ("off", False), ("ON", True), (" Off ", False),
    ("yes", True), ("no", False), ("true", True), ("false", False), ("1", True), ("0", False),
])
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "onn", "enabled"])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool(text)


def test_parse_list() -> None:
    assert parse_list("a b,c\n  d,, e ") == ["a", "b", "c", "d", "e"]
    assert parse_list("   ") == []
    assert parse_list("") == []


@pytest.mark.pure
def test_parse_port_ranges() -> None:
    assert parse_port_ranges(["443", "8000-8999", "1-65535"]) == (
        (443, 443), (8000, 8999), (1, 65535))
    for bad in ("0", "65536", "90-80", "https", "-443", "443-"):
        with pytest.raises(ValueError, match="not a port or a port range"):
            parse_port_ranges([bad])


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:3128 [::1]:3128 :3128") == [
        ("127.0.0.1", 3128), ("::1", 3128), ("0.0.0.0", 3128)]
    assert parse_listen("127.0.0.1:0, localhost:8080") == [("127.0.0.1", 0),
                                                           ("127.0.0.1", 8080)]
    assert parse_listen("[::]:65535") == [("::", 65535)]


@pytest.mark.parametrize("text", [
    "",
    "127.0.0.1",
    "127.0.0.1:",
    "127.0.0.1:65536",
    "127.0.0.1:http",
    "127.0.0.1:-1",
    "example.com:80",
    "1.2.3:80",
    "[::1]",
    "[::1]:",
    "::1",
    "::1:3128",
    "[127.0.0.1]:3128",
    "127.0.0.1:\u0663",
    "127.0.0.1:3128 nonsense",
])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


# -- the sample file -----------------------------------------------------------------------


def test_sample_loads() -> None:
    pm, config = load(str(SAMPLE), entry_points=False)
    assert config.path == str(SAMPLE)
    assert config.core["listen"] == [("127.0.0.1", 3128)]
    assert set(plugin_names(pm)) == {name for name, _ in DEFAULT_PLUGINS}


def _sample_entries() -> dict[tuple[str, str], tuple[str, str]]:
    """(section, key) -> (value, the line right above) for every option set in the sample."""
    entries: dict[tuple[str, str], tuple[str, str]] = {}
    section = ""
    previous = ""
    values = read_ini(str(SAMPLE))  # whole values, continuation lines included
    for line in SAMPLE.read_text().splitlines():
        header = re.fullmatch(r"\[([^\]]+)\]\s*", line)
        option = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if header:
            section = header.group(1)
        elif option:
            entries[(section, option.group(1))] = (values[section][option.group(1)], previous)
        previous = line
    return entries


def test_every_option_in_sample_commented() -> None:
    """Every option declared by the core or a built-in plugin is in etc/geproxy.ini, with a
    comment line right above it and its default value."""
    entries = _sample_entries()
    problems = []
    for option in declared_options():
        where = f"[{option.section}] {option.key}"
        if (option.section, option.key) not in entries:
            problems.append(f"{where}: missing from {SAMPLE.name}")
            continue
        value, above = entries[(option.section, option.key)]
        if not above.lstrip().startswith("#") or not above.lstrip("# ").strip():
            problems.append(f"{where}: no comment line right above it")
        if option.parse(value) != option.parse(option.default):
            problems.append(f"{where}: the sample shows {value!r}, the default is "
                            f"{option.default!r}")
    assert not problems, "\n".join(problems)


def test_sample_documents_nothing_undeclared() -> None:
    declared = {(option.section, option.key) for option in declared_options()}
    assert set(_sample_entries()) <= declared


def test_sample_check_detects_a_missing_option() -> None:
    """The sample check above is not vacuous: a plugin option absent from the sample is
    reported."""

    class Extra:
        name = "extra"

        @hookimpl
        def add_options(self, registry: OptionRegistry) -> None:
            registry.section("extra").add("size", "size", "1KiB", "An extra size.")

    pm = get_plugin_manager(objects=[Extra()], entry_points=False)
    registry = OptionRegistry()
    pm.hook.add_options.call_historic(kwargs={"registry": registry})
    entries = _sample_entries()
    missing = [o.key for o in registry if (o.section, o.key) not in entries]
    assert missing == ["size"]


# -- defaults ------------------------------------------------------------------------------


def test_defaults_are_typed(tmp_path: Path) -> None:
    _, config = load(write_ini(tmp_path, "[geproxy]\n"), entry_points=False)
    core = config.core
    for key, seconds in [("header_timeout", 10.0), ("connect_timeout", 10.0),
                         ("idle_timeout", 300.0), ("graceful_timeout", 30.0),
                         ("upstream_idle_timeout", 60.0)]:
        assert isinstance(core[key], float), key
        assert core[key] == seconds, key
    assert core["max_header_size"] == 65536
    assert type(core["max_header_size"]) is int
    assert core["max_connections"] == 10000
    assert type(core["max_connections"]) is int
    assert core["upstream_keepalive"] == 32
    assert core["listen"] == [("127.0.0.1", 3128)]
    assert core["plugins"] == [] and core["disable"] == []
    assert core["via"] == "geproxy"
    assert core["access_log"] == "-"


def test_empty_file_gets_every_default(tmp_path: Path) -> None:
    _, config = load(write_ini(tmp_path, ""), entry_points=False)
    assert config.core["idle_timeout"] == 300.0
    assert set(config.core) == {o.key for o in declared_options() if o.section == "geproxy"}


def test_values_are_typed(tmp_path: Path) -> None:
    path = write_ini(tmp_path, """\
        [geproxy]
        listen = 127.0.0.1:0 [::1]:0
        header_timeout = 250ms
        idle_timeout = 1h
        max_header_size = 1MiB
        max_connections = 12
        via = 100%proxy
        """)
    _, config = load(path, entry_points=False)
    assert config.core["listen"] == [("127.0.0.1", 0), ("::1", 0)]
    assert config.core["header_timeout"] == pytest.approx(0.25)
    assert config.core["idle_timeout"] == 3600.0
    assert config.core["max_header_size"] == 1048576
    assert config.core["max_connections"] == 12
    # Interpolation is off: a % is a plain character.
    assert config.core["via"] == "100%proxy"


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("body, section, key", [
    ("[geproxy]\nheader_timeout = soon\n", "geproxy", "header_timeout"),
    ("[geproxy]\nmax_header_size = big\n", "geproxy", "max_header_size"),
    ("[geproxy]\nmax_header_size = 512\n", "geproxy", "max_header_size"),  # under minimum
    ("[geproxy]\nmax_connections = 0\n", "geproxy", "max_connections"),
    ("[geproxy]\nmax_connections = many\n", "geproxy", "max_connections"),
    ("[geproxy]\nidle_timeout = 0s\n", "geproxy", "idle_timeout"),
    ("[geproxy]\nlisten = 127.0.0.1\n", "geproxy", "listen"),
    ("[geproxy]\nlisten =\n", "geproxy", "listen"),
    ("[geproxy]\nlisten_on = 127.0.0.1:0\n", "geproxy", "listen_on"),
    ("[geproxy]\nListen = 127.0.0.1:0\n", "geproxy", "Listen"),
    ("[acl]\nconnect_ports = 443 https\n", "acl", "connect_ports"),
    ("[sni]\nrequire_ports = 90-80\n", "sni", "require_ports"),
])
def test_bad_key_or_value_names_file_section_key(tmp_path: Path, body: str, section: str,
                                                 key: str) -> None:
    path = write_ini(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    message = str(info.value)
    assert (info.value.path, info.value.section, info.value.key) == (path, section, key)
    assert info.value.file_line == 2
    assert message.startswith(f"{path}:2: [{section}] {key}: "), message
    assert "\n" not in message


def test_unknown_section_names_file_and_section(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[geproxy]\n\n[nosuch]\nkey = 1\n")
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    assert str(info.value).startswith(f"{path}:3: [nosuch]: ")
    assert "unknown section" in str(info.value)


@pytest.mark.parametrize("body", [
    "listen = 127.0.0.1:0\n",  # no section header
    "[geproxy]\nlisten = 127.0.0.1:0\nlisten = 127.0.0.1:1\n",  # duplicate key
    "[geproxy]\n[geproxy]\n",  # duplicate section
    "[geproxy\n",
])
def test_not_an_ini_file(tmp_path: Path, body: str) -> None:
    path = write_ini(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    message = str(info.value)
    assert message.startswith(f"{path}: not a valid INI file")
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nosuch.ini")
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


# -- disable and plugins = -----------------------------------------------------------------


def test_disable_removes_builtin(tmp_path: Path) -> None:
    pm, _ = load(write_ini(tmp_path, "[geproxy]\n"), entry_points=False)
    assert pm.get_plugin("access_log") is not None
    pm, _ = load(write_ini(tmp_path, "[geproxy]\ndisable = access_log\n"), entry_points=False)
    assert pm.get_plugin("access_log") is None
    assert "access_log" not in plugin_names(pm)
    assert "system_resolver" in plugin_names(pm)
    assert not any(impl.plugin_name == "access_log"
                   for impl in pm.hook.on_close.get_hookimpls())


def test_disable_unknown_is_an_error(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[geproxy]\ndisable = access_log, nosuch\n")
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    assert str(info.value).startswith(f"{path}:2: [geproxy] disable: ")
    assert "nosuch" in str(info.value)


@pytest.mark.parametrize("spec", [
    "nosuchmodule",
    "geproxy_plugins.access_log:NoSuchClass",
    ":Nothing",
    # A second plugin under a name already taken, or the same module twice.
    "geproxy_plugins.access_log:AccessLog",
    "json json",
])
def test_bad_plugins_line_names_geproxy_plugins(tmp_path: Path, spec: str) -> None:
    path = write_ini(tmp_path, f"[geproxy]\nplugins = {spec}\n")
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    message = str(info.value)
    assert message.startswith(f"{path}:2: [geproxy] plugins: "), message
    assert "\n" not in message


PLUGIN_SOURCE = '''
from geproxy import ConfigError, hookimpl


class Quota:
    name = "quota"

    def __init__(self):
        self.values = None

    @hookimpl
    def add_options(self, registry):
        (registry.section("quota")
         .add("window", "duration", "1m", "Length of a quota window.")
         .add("limit", "size", "1MiB", "Bytes allowed per window.")
         .add("strict", "bool", "off", "Refuse instead of warn.")
         .add("hosts", "list", "", "Hosts the quota applies to."))

    @hookimpl
    def configure(self, config):
        self.values = dict(config.section("quota"))
        self.core_timeout = config.core["header_timeout"]
        if self.values["limit"] == 0:
            raise ConfigError("must be more than 0", path=config.path, section="quota",
                              key="limit")
'''


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[Callable[[str, str], str]]:
    """``plugin_module(name, source)`` writes an importable module; it is forgotten after."""
    names: list[str] = []
    directory = tmp_path / "site"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))

    def write(name: str, source: str) -> str:
        (directory / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_plugin_from_config_declares_section_and_is_configured(
        tmp_path: Path, plugin_module: Callable[[str, str], str]) -> None:
    module = plugin_module("geproxy_test_quota", PLUGIN_SOURCE)
    path = write_ini(tmp_path, f"""\
        [geproxy]
        plugins = {module}:Quota
        header_timeout = 2s

        [quota]
        window = 5m
        limit = 64KiB
        strict = on
        hosts = a.example, b.example
        """)
    pm, config = load(path, entry_points=False)
    plugin = pm.get_plugin("quota")
    assert plugin is not None and type(plugin).__name__ == "Quota"
    assert "quota" in plugin_names(pm)
    expected = {"window": 300.0, "limit": 65536, "strict": True,
                "hosts": ["a.example", "b.example"]}
    assert plugin.values == expected
    assert dict(config.section("quota")) == expected
    assert plugin.core_timeout == 2.0


def test_plugin_section_defaults(tmp_path: Path,
                                 plugin_module: Callable[[str, str], str]) -> None:
    module = plugin_module("geproxy_test_quota_defaults", PLUGIN_SOURCE)
    path = write_ini(tmp_path, f"[geproxy]\nplugins = {module}:Quota\n")
    pm, _ = load(path, entry_points=False)
    assert pm.get_plugin("quota").values == {"window": 60.0, "limit": 1048576,
                                             "strict": False, "hosts": []}


@pytest.mark.parametrize("line, key", [
    ("window = later", "window"),
    ("strict = perhaps", "strict"),
    ("limits = 1KiB", "limits"),
])
def test_plugin_section_errors_name_its_key(tmp_path: Path,
                                            plugin_module: Callable[[str, str], str],
                                            line: str, key: str) -> None:
    module = plugin_module("geproxy_test_quota_errors", PLUGIN_SOURCE)
    path = write_ini(tmp_path, f"[geproxy]\nplugins = {module}:Quota\n\n[quota]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    assert str(info.value).startswith(f"{path}:5: [quota] {key}: ")


def test_plugin_section_unknown_without_plugin(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[geproxy]\n\n[quota]\nwindow = 5m\n")
    with pytest.raises(ConfigError, match=r"\[quota\]: unknown section"):
        load(path, entry_points=False)


def test_configure_error_stops_loading(tmp_path: Path,
                                       plugin_module: Callable[[str, str], str]) -> None:
    module = plugin_module("geproxy_test_quota_configure", PLUGIN_SOURCE)
    path = write_ini(tmp_path, f"[geproxy]\nplugins = {module}:Quota\n\n[quota]\nlimit = 0\n")
    with pytest.raises(ConfigError) as info:
        load(path, entry_points=False)
    assert str(info.value) == f"{path}:5: [quota] limit: must be more than 0"


def test_plugin_module_without_class(tmp_path: Path,
                                     plugin_module: Callable[[str, str], str]) -> None:
    """A plain module is a plugin too, registered under its spec."""
    module = plugin_module("geproxy_test_module_plugin", textwrap.dedent('''
        from geproxy import hookimpl

        seen = []

        @hookimpl
        def configure(config):
            seen.append(config.core["via"])
        '''))
    path = write_ini(tmp_path, f"[geproxy]\nplugins = {module}\nvia = corp-proxy\n")
    pm, _ = load(path, entry_points=False)
    plugin = pm.get_plugin(module)
    assert plugin is sys.modules[module]
    assert plugin.seen == ["corp-proxy"]


# -- comments ------------------------------------------------------------------------------
#
# A `#` at the start of a value's line or after white space starts a comment, in every kind
# of value alike; `\#` is a `#` itself; a `#` after any other character is part of the value.


def test_a_comment_may_follow_any_kind_of_value(tmp_path: Path) -> None:
    """What docs/tls.md and docs/deployment.md showed, and users copy: a value followed by
    `  # comment`, for every kind of value the built-ins declare."""
    path = write_ini(tmp_path, """\
        [geproxy]
        listen = 127.0.0.1:0 [::1]:0     # listen: this host only
        workers = 1                      # workers
        max_connections = 12             # int
        header_timeout = 250ms           # duration
        max_header_size = 1MiB           # size
        via = egress-1                   # token
        forwarded_for = delete           # str with choices
        local_paths = /healthz /readyz   # list
        proxy_protocol_from = 10.0.0.5   # networks
        admin_listen = 127.0.0.1:0       # address
        access_log = off                 # logfile
        docroot =                        # path: empty, none

        [tls]
        client_cert = required          # or optional: certificates verified when sent
        http2 = on                      # bool
        handshake_timeout = 3s	# after a tab

        [acl]
        connect_ports = 443 8443         # ports
        rules =
            office: allow src 10.0.0.0/8   # lines: after a rule
            # a line of its own
            deny all
        """)
    _, config = load(path, entry_points=False)
    core = config.core
    assert core["listen"] == [("127.0.0.1", 0), ("::1", 0)]
    assert (core["workers"], core["max_connections"]) == (1, 12)
    assert core["header_timeout"] == pytest.approx(0.25)
    assert core["max_header_size"] == 1048576
    assert (core["via"], core["forwarded_for"]) == ("egress-1", "delete")
    assert core["local_paths"] == ["/healthz", "/readyz"]
    assert [str(n) for n in core["proxy_protocol_from"]] == ["10.0.0.5/32"]
    assert core["admin_listen"] == ("127.0.0.1", 0)
    assert (core["access_log"], core["docroot"]) == ("off", "")
    tls = config["tls"]
    assert (tls["client_cert"], tls["http2"], tls["handshake_timeout"]) == ("required", True,
                                                                             3.0)
    assert config["acl"]["connect_ports"] == ((443, 443), (8443, 8443))
    assert config["acl"]["rules"] == ["office: allow src 10.0.0.0/8", "deny all"]


def test_a_hash_after_another_character_is_part_of_the_value(tmp_path: Path) -> None:
    """Only white space (or the start of a line) before `#` makes a comment: `a#b` is a
    value, in a `lines` value too (which cut at any `#` before)."""
    path = write_ini(tmp_path, """\
        [auth]
        realm = Floor#3 proxy

        [parents]
        rules =
            direct c#.example  # a comment
        """)
    parser = read_ini(path)
    assert parser["auth"]["realm"] == "Floor#3 proxy"
    registry = declared_options()
    rules = registry.options["parents"]["rules"].parse(parser["parents"]["rules"])
    assert rules == ["direct c#.example"]


def test_an_escaped_hash_stands_for_itself(tmp_path: Path) -> None:
    r"""`\#` is a `#` that white space before it would have made a comment; it is the only
    escape: other backslashes are ordinary characters."""
    path = write_ini(tmp_path, r"""
        [auth]
        realm = Floor 3 \#2   # the realm is 'Floor 3 #2'
        """)
    _, config = load(path, entry_points=False)
    assert config["auth"]["realm"] == "Floor 3 #2"
    path = write_ini(tmp_path, r"""
        [x]
        lines =
            a\.b \#c  # two items, a backslash kept
        """, name="other.ini")
    assert parse_lines(read_ini(path)["x"]["lines"]) == [r"a\.b #c"]


def test_a_semicolon_starts_a_comment_only_at_the_start_of_a_line(tmp_path: Path) -> None:
    path = write_ini(tmp_path, """\
        ; a comment
        [auth]
        realm = a;b ; part of the value
        [parents]
        rules =
            ; a comment line inside the value
            direct .corp.example
        """)
    parser = read_ini(path)
    assert parser["auth"]["realm"] == "a;b ; part of the value"
    assert parser["parents"]["rules"] == "\ndirect .corp.example"


@pytest.mark.pure
def test_port_ranges_are_public_api():
    """geproxy.parse_port_ranges: what a ``ports`` option holds, for plugins (acl's port
    conditions use it)."""
    from geproxy import parse_port_ranges

    assert parse_port_ranges(["443", "8000-8999", "1-65535"]) == (
        (443, 443), (8000, 8999), (1, 65535))
    for bad in ("0", "65536", "9-8", "443,444", "https"):
        with pytest.raises(ValueError, match=re.escape(f"(1-65535): {bad!r}")):
            parse_port_ranges([bad])
