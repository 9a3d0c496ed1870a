"""What a bad configuration is told with: every error at once, each at its line of the file
(a line of a value of several lines included, comments and blank lines between them
counted), with the closest name for an unknown one; through ``geproxy check-config`` and a
start run as real processes, through ``load``, and at a reload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from geproxy import Config, ConfigError, ConfigErrors, hookimpl
from geproxy.config import OptionRegistry, parse_lines, read_ini
from geproxy.inifile import IniLines
from geproxy.policy.plugins import get_plugin_manager, load
from geproxy.suggest import SQUID_NAMES, did_you_mean, option_hint, section_hint
from geproxy.testing import kit_ini

pytestmark = pytest.mark.timeout(60)

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "geproxy.ini"


def _write(tmp_path: Path, text: str, name: str = "geproxy.ini") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geproxy", *args], capture_output=True,
                          text=True, timeout=30)


class Rulebook:
    """A plugin with a ``lines`` option: each rule starts with allow or deny, and each
    one that does not is an error with its index in the list (``line=``)."""

    name = "rulebook"

    def __init__(self) -> None:
        self.configured = 0

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (registry.section("rulebook")
         .add("rules", "lines", "", "One rule per line.")
         .add("limit", "int", "1", "A number."))

    @hookimpl
    def configure(self, config: Config) -> None:
        self.configured += 1
        errors = [ConfigError(f"a rule starts with allow or deny: {rule!r}",
                              path=config.path, section="rulebook", key="rules", line=index)
                  for index, rule in enumerate(config["rulebook"]["rules"], start=1)
                  if rule.split()[0] not in ("allow", "deny")]
        if errors:
            raise ConfigErrors(errors)


class Limit:
    """A plugin that refuses ``[rulebook] limit`` above 2, with no ``line=``."""

    name = "limit_check"

    def __init__(self) -> None:
        self.configured = 0

    @hookimpl
    def configure(self, config: Config) -> None:
        self.configured += 1
        if config["rulebook"]["limit"] > 2:
            raise ConfigError("at most 2", path=config.path, section="rulebook", key="limit")


# Line numbers are on the left; the rules' value has comment lines, blank lines and an
# inline comment between its lines.
RULEBOOK = """\
[geproxy]
access_log = off

[rulebook]
# the rules, one per line
rules = allow a
    permit b
    # a comment between two rules

    ; another kind of comment
    deny c   # an inline comment
    forbid d

limit = 3
"""


def test_a_plugins_line_indexes_are_the_lines_of_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, RULEBOOK)
    rulebook, limit = Rulebook(), Limit()
    with pytest.raises(ConfigErrors) as caught:
        load(path, objects=[rulebook, limit], entry_points=False)
    errors = caught.value.errors
    assert [(e.section, e.key, e.line, e.file_line) for e in errors] == [
        ("rulebook", "rules", 2, 7), ("rulebook", "rules", 4, 12),
        ("rulebook", "limit", None, 14)]
    assert str(caught.value).splitlines() == [
        f"{path}:7: [rulebook] rules: a rule starts with allow or deny: 'permit b'",
        f"{path}:12: [rulebook] rules: a rule starts with allow or deny: 'forbid d'",
        f"{path}:14: [rulebook] limit: at most 2",
    ]
    # Limit raised first (pluggy calls the last registered first); Rulebook still ran.
    assert (rulebook.configured, limit.configured) == (1, 1)


def test_config_line_of_counts_the_lines_a_plugin_reads(tmp_path: Path) -> None:
    path = _write(tmp_path, RULEBOOK.replace("permit", "allow").replace("forbid", "deny")
                  .replace("limit = 3", "limit = 2"))
    _, config = load(path, objects=[Rulebook(), Limit()], entry_points=False)
    assert config["rulebook"]["rules"] == ["allow a", "allow b", "deny c", "deny d"]
    assert config.line_of("rulebook", "rules") == 6
    assert [config.line_of("rulebook", "rules", index) for index in range(1, 6)] == [
        6, 7, 11, 12, None]
    assert config.line_of("rulebook", "limit") == 14
    assert config.line_of("geproxy", "access_log") == 2
    assert config.line_of("geproxy", "listen") is None  # not in the file: the default
    assert config.line_of("nosuch", "key") is None
    assert Config("x.ini", {}).line_of("geproxy", "listen") is None  # not from a file


class Seen:
    """Records the limit each configure was handed."""

    name = "seen"

    def __init__(self) -> None:
        self.limits: list[int] = []

    @hookimpl
    def configure(self, config: Config) -> None:
        self.limits.append(config["rulebook"]["limit"])


def test_a_value_that_fails_to_parse_reaches_no_plugin_and_the_rest_is_reported(
        tmp_path: Path) -> None:
    path = _write(tmp_path, RULEBOOK.replace("limit = 3", "limit = many"))
    rulebook, seen = Rulebook(), Seen()
    with pytest.raises(ConfigErrors) as caught:
        load(path, objects=[rulebook, seen], entry_points=False)
    # The bad value and the plugins' own errors, in the file's order: the bad rules are
    # found beside it, configure having been handed the default in its place.
    assert str(caught.value).splitlines() == [
        f"{path}:7: [rulebook] rules: a rule starts with allow or deny: 'permit b'",
        f"{path}:12: [rulebook] rules: a rule starts with allow or deny: 'forbid d'",
        f"{path}:14: [rulebook] limit: invalid literal for int() with base 10: 'many'",
    ]
    assert seen.limits == [1]  # the default, never the value that did not parse


def test_configure_stays_historic(tmp_path: Path) -> None:
    """A plugin registered after the load is configured, as pluggy's historic call does."""
    path = _write(tmp_path, RULEBOOK.replace("permit", "allow").replace("forbid", "deny")
                  .replace("limit = 3", "limit = 2"))
    pm, config = load(path, objects=[Rulebook()], entry_points=False)
    late = Limit()
    pm.register(late)
    assert late.configured == 1


MANY = """\
[geproxy]
listen = 127.0.0.1:0
access_log = off
graceful_timout = 3s
header_timeout = soon
http_port = 3128
dns_nameservers = 10.0.0.53

[parent]
parents = http://127.0.0.1:3129

[resolver]
timeout = 3 seconds

[acl]
mode = sometimes
"""

#: Each error of MANY: its line and what the line starts and ends with.
MANY_ERRORS = [
    (4, "[geproxy] graceful_timout: unknown option", "; did you mean 'graceful_timeout'?"),
    (5, "[geproxy] header_timeout: not a duration: 'soon'", ""),
    (6, "[geproxy] http_port: unknown option", "; did you mean '[geproxy] listen'?"),
    (7, "[geproxy] dns_nameservers: unknown option",
     "; did you mean '[resolver] nameservers'?"),
    (9, "[parent]: unknown section (no plugin declares it)", "; did you mean '[parents]'?"),
    (13, "[resolver] timeout: not a duration: '3 seconds'", ""),
    (16, "[acl] mode: ", ""),
]


def _assert_many(lines: list[str], path: str, prefix: str) -> None:
    assert len(lines) == len(MANY_ERRORS), lines
    for line, (number, start, end) in zip(lines, MANY_ERRORS, strict=True):
        assert line.startswith(f"{prefix}{path}:{number}: {start}"), line
        assert line.endswith(end), line


def test_check_config_prints_every_error_with_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, MANY)
    result = _run("check-config", "--config", path)
    assert (result.returncode, result.stdout) == (1, "")
    assert "Traceback" not in result.stderr
    _assert_many(result.stderr.splitlines(), path, "geproxy: ")


def test_a_start_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    path = _write(tmp_path, MANY)
    result = _run("--config", path)
    assert (result.returncode, result.stdout) == (2, "")
    _assert_many(result.stderr.splitlines(), path, "geproxy: ")


def test_load_raises_every_error_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, MANY)
    with pytest.raises(ConfigErrors) as caught:
        load(path, entry_points=False)
    _assert_many(str(caught.value).splitlines(), path, "")
    first = caught.value.errors[0]
    assert (caught.value.path, caught.value.section, caught.value.key) == (
        path, first.section, first.key)


def test_the_text_a_master_hands_on_gives_the_lines(tmp_path: Path) -> None:
    """A worker loads the text its master read: its lines are the ones reported, whatever
    the file holds by then."""
    path = _write(tmp_path, "[geproxy]\naccess_log = off\n")
    with pytest.raises(ConfigError) as caught:
        load(path, entry_points=False, text="[geproxy]\n\n\naccess_log = off\nvia = a b\n")
    assert str(caught.value).startswith(f"{path}:5: [geproxy] via: ")


def test_a_reload_with_errors_keeps_the_running_configuration(proxy_factory: Any,
                                                               caplog: Any) -> None:
    proxy = proxy_factory("[acl]\nconnect_ports = 1-65535\nrules = allow src 127.0.0.1\n")
    path = proxy.server.config.path
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(kit_ini("[geproxy]\ngraceful_timout = 3s\n[acl]\nmode = sometimes\n"))
    before = proxy.server.gen
    assert not proxy.server.reload()
    assert proxy.server.gen is before
    refused = [record.getMessage() for record in caplog.records
               if "reload refused" in record.getMessage()]
    assert len(refused) == 1, refused
    assert "[geproxy] graceful_timout: unknown option" in refused[0]
    assert "[acl] mode: " in refused[0]
    assert "\n" not in refused[0]


# -- suggestions ----------------------------------------------------------------------------


def _declared() -> dict[str, dict[str, Any]]:
    pm = get_plugin_manager(entry_points=False)
    registry = OptionRegistry()
    pm.hook.add_options.call_historic(kwargs={"registry": registry})
    return registry.options


def test_every_squid_name_maps_to_an_option_of_a_built_in() -> None:
    options = _declared()
    for squid, (section, key) in SQUID_NAMES.items():
        assert key in options.get(section, {}), (squid, section, key)
        assert squid not in options[section], squid  # the same name needs no mapping


@pytest.mark.parametrize("section, key, hint", [
    ("geproxy", "graceful_timout", "; did you mean 'graceful_timeout'?"),
    ("geproxy", "Listen", "; did you mean 'listen'?"),
    ("geproxy", "http_port", "; did you mean '[geproxy] listen'?"),
    ("geproxy", "HTTP_PORT", "; did you mean '[geproxy] listen'?"),
    ("acl", "cache_peer", "; did you mean '[parents] parents'?"),
    ("resolver", "dns_nameservers", "; did you mean 'nameservers'?"),  # close enough
    ("geproxy", "dns_nameservers", "; did you mean '[resolver] nameservers'?"),
    ("geproxy", "shutdown_lifetime", "; did you mean '[geproxy] graceful_timeout'?"),
    ("geproxy", "nameservers", "; did you mean '[resolver] nameservers'?"),  # wrong section
    ("resolver", "workers", "; did you mean '[geproxy] workers'?"),
    ("geproxy", "frobnicate", ""),
])
def test_an_unknown_option_gets_the_closest_name(section: str, key: str, hint: str) -> None:
    assert option_hint(section, key, _declared()) == hint


@pytest.mark.parametrize("section, hint", [
    ("parent", "; did you mean '[parents]'?"),
    ("resolvers", "; did you mean '[resolver]'?"),
    ("cache_peer", "; did you mean '[parents]'?"),
    ("http_access", "; did you mean '[acl]'?"),
    ("frobnicate", ""),
])
def test_an_unknown_section_gets_the_closest_name(section: str, hint: str) -> None:
    assert section_hint(section, _declared()) == hint


def test_a_squid_name_whose_plugin_is_gone_is_not_suggested() -> None:
    options = {name: keys for name, keys in _declared().items() if name != "resolver"}
    assert option_hint("geproxy", "dns_nameservers", options) == ""
    assert section_hint("dns_nameservers", options) == ""


def test_did_you_mean_keeps_its_contract() -> None:
    assert did_you_mean("dstdomian", ["dstdomain", "src"]) == "; did you mean 'dstdomain'?"
    assert did_you_mean("DSTDOMAIN", [], {"dstdomain": "dst"}) == "; did you mean 'dst'?"
    assert did_you_mean("zzz", ["dstdomain"]) == ""


def test_an_unknown_disabled_plugin_gets_the_closest_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "[geproxy]\naccess_log = off\ndisable = acces_log, nosuch\n")
    with pytest.raises(ConfigErrors) as caught:
        load(path, entry_points=False)
    assert str(caught.value).splitlines() == [
        f"{path}:3: [geproxy] disable: no built-in or installed plugin named 'acces_log'; "
        "did you mean 'access_log'?",
        f"{path}:3: [geproxy] disable: no built-in or installed plugin named 'nosuch'",
    ]


# -- the errors themselves ------------------------------------------------------------------


def test_config_error_forms() -> None:
    error = ConfigError("bad", path="g.ini", section="acl", key="rules", line=3)
    assert str(error) == "g.ini: [acl] rules: line 3: bad"  # no file line known
    error.file_line = 21
    assert str(error) == "g.ini:21: [acl] rules: bad"
    assert error.errors == [error]
    assert str(ConfigError("cannot read", path="g.ini")) == "g.ini: cannot read"
    other = ConfigError("worse", path="g.ini", section="tls", key="key")
    both = ConfigErrors([ConfigErrors([error]), other])
    assert both.errors == [error, other]
    assert str(both) == "g.ini:21: [acl] rules: bad\ng.ini: [tls] key: worse"
    assert both.report() == ("geproxy: g.ini:21: [acl] rules: bad\n"
                             "geproxy: g.ini: [tls] key: worse")
    assert isinstance(both, ConfigError) and both.file_line == 21
    with pytest.raises(ValueError):
        ConfigErrors([])


def test_an_index_past_the_value_keeps_its_place_in_words(tmp_path: Path) -> None:
    class PastTheEnd:
        @hookimpl
        def configure(self, config: Config) -> None:
            raise ConfigError("no such line", section="geproxy", key="via", line=5)

    path = _write(tmp_path, "[geproxy]\naccess_log = off\nvia = proxy\n")
    with pytest.raises(ConfigError) as caught:
        load(path, objects=[PastTheEnd()], entry_points=False)
    # The path is filled in for an error that names a section but no file.
    assert str(caught.value) == f"{path}: [geproxy] via: line 5: no such line"


# -- the scan agrees with configparser ------------------------------------------------------

SCANNED = """\
; a comment before any section
[one]
a = 1
b: two words # comment
c =
  x
  y\\#not a comment
\t# comment
  \tz

d=last
[two] # a header with a comment
  e  =  spaced key
key with spaces = v
f = #only a comment
    first
        deeper
    second
"""


@pytest.mark.parametrize("text", [SCANNED, SAMPLE.read_text(), RULEBOOK, MANY],
                         ids=["crafted", "sample", "rulebook", "many"])
def test_the_scan_finds_every_key_and_value_line_configparser_has(text: str) -> None:
    parser = read_ini("x.ini", text)
    lines = IniLines.scan(text)
    raw = text.splitlines()
    for section in parser.sections():
        assert lines.section_line(section) is not None, section
        for key, value in parser.items(section):
            number = lines.key_line(section, key)
            assert number is not None and key in raw[number - 1], (section, key)
            items = parse_lines(value)
            found = [lines.key_line(section, key, index)
                     for index in range(1, len(items) + 2)]
            assert found[-1] is None, (section, key)  # no line past the last
            for item, at in zip(items, found, strict=False):
                assert at is not None
                # Each item is on its line (with "\#" written for "#").
                assert item.replace("#", "\\#") in raw[at - 1] or item in raw[at - 1], (
                    section, key, item, at)


def test_the_crafted_scan_exactly() -> None:
    lines = IniLines.scan(SCANNED)
    assert (lines.section_line("one"), lines.section_line("two")) == (2, 12)
    assert [lines.key_line("one", key) for key in "abcd"] == [3, 4, 5, 11]
    assert [lines.key_line("one", "c", index) for index in (1, 2, 3, 4)] == [6, 7, 9, None]
    assert lines.key_line("two", "e") == 13
    assert lines.key_line("two", "key with spaces") == 14
    assert [lines.key_line("two", "f", index) for index in (1, 2, 3)] == [16, 17, 18]


class Holder:
    """Counts what it holds: configure takes one, unconfigure gives it back."""

    name = "holder"

    def __init__(self) -> None:
        self.held = 0
        self.released = 0

    @hookimpl
    def configure(self, config: Config) -> None:
        self.held += 1

    @hookimpl
    def unconfigure(self, config: Config) -> None:
        self.released += 1


@pytest.mark.parametrize("change", [("limit = 2", "limit = many"),  # a value that fails
                                    ("allow a", "permit a")])        # a plugin's error
def test_a_refused_configuration_is_released_at_once(tmp_path: Path, change) -> None:
    path = _write(tmp_path, RULEBOOK.replace("permit", "allow").replace("forbid", "deny")
                  .replace("limit = 3", "limit = 2").replace(*change))
    assert change[1] in Path(path).read_text()
    holder = Holder()
    with pytest.raises(ConfigError):
        load(path, objects=[Rulebook(), holder], entry_points=False)
    assert (holder.held, holder.released) == (1, 1)
    holder = Holder()
    good = _write(tmp_path, RULEBOOK.replace("permit", "allow").replace("forbid", "deny")
                  .replace("limit = 3", "limit = 2"), "good.ini")
    load(good, objects=[Rulebook(), holder], entry_points=False)
    assert (holder.held, holder.released) == (1, 0)  # in force: released by its server
