"""Every INI example in README.md and docs/*.md passes ``geproxy check-config``.

The convention the examples follow (docs/README.md says it for authors): a code block of a
geproxy configuration is fenced, with ``ini`` as the first word of its info string and
these words after it:

    ```ini                        a whole geproxy.ini: check-config accepts it as it is
    ```ini fragment               part of one (sections with their headers): merged into a
                                  minimal valid file (FRAGMENT_BASE), which it overrides
    ```ini fragment [acl]         lines of one section, without its header
    ```ini invalid                check-config refuses it, naming a section and key of it
    ```ini not-geproxy            another program's INI file (pip.conf ...): not checked

In a fragment, a key given more than once shows alternatives (``listen = A``, then
``listen = B``): each is checked on its own. Files the examples name (certificates, the
htpasswd file, the docroot ...) are replaced by test files of the same kind, by option
(TEST_FILES); an option that names a file and has none there fails the test, so a new one
cannot go unchecked. An unfenced code block that looks like a geproxy configuration (a
built-in section's header, or a line setting a built-in option) fails the test too.

The checks run in one process, ``geproxy.cli.main(["check-config", ...])`` for each file,
from a working directory of their own, with an audit hook that records every socket
connect, send, bind and name lookup: check-config contacts nothing, whatever nameservers,
parents or directories the examples name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from geproxy.config import OptionRegistry
from geproxy.policy.plugins import get_plugin_manager

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What the examples' plugins need on the Python path: the example plugin of plugins.md.
PYTHONPATH = ROOT / "docs" / "examples"

#: Modules the examples name as plugins that stand for the reader's own: empty stand-ins.
STAND_IN_MODULES = {"acme_policy": '"""A stand-in for a policy plugin of your own."""\n'}

#: The words that may follow ``ini`` in a fence's info string.
WORDS = {"fragment", "invalid", "not-geproxy"}

#: What a fragment is merged into: the smallest file that checks every section, a TLS
#: listener included (so that [tls] fragments load their certificates).
FRAGMENT_BASE = {
    "geproxy": {"listen": "127.0.0.1:0 tls://127.0.0.1:0"},
    "tls": {"certificate": "{certificate}"},
}

#: The test file standing for each option that names one. ``{...}`` are ExampleFiles fields.
TEST_FILES = {
    ("geproxy", "docroot"): "{docroot}",
    ("geproxy", "access_log"): "{access_log}",
    ("tls", "certificate"): "{certificate}",
    ("tls", "key"): "{key}",
    ("tls", "client_ca"): "{client_ca}",
    ("auth", "htpasswd"): "{htpasswd}",
    ("acl", "group_file"): "{groups}",
    ("acl", "deny_page"): "{deny_page}",
    ("acl", "error_dir"): "{error_dir}",
    ("auth", "ldap_ca_file"): "{client_ca}",
    ("auth", "ldap_bind_password_file"): "{secret}",
    ("auth", "keytab"): "{keytab}",
}

#: The kinds whose values name files (geproxy.config resolves these against the directory).
FILE_KINDS = {"path", "logfile"}
#: Values of a ``path`` or ``logfile`` that name no file (``off`` in any case).
NO_FILE = {"", "-", "off"}

#: Audit events that would mean the check contacted something, or could have.
NETWORK_EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind",
                  "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                  "socket.getnameinfo")

#: Run in a process of its own: check-config on each file named, as the command does.
CHECKER = textwrap.dedent("""\
    import contextlib, io, json, logging, sys

    watched = set(sys.argv[1].split(","))
    events, watching = [], [False]

    def audit(event, args):
        if watching[0] and event in watched:
            events.append(event + " " + repr(args))

    sys.addaudithook(audit)
    from gevent import monkey
    monkey.patch_all()
    from geproxy.cli import main

    class ToCurrentStderr(logging.Handler):
        def emit(self, record):
            sys.stderr.write(self.format(record) + "\\n")

    handler = ToCurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    results = []
    for path in sys.argv[2:]:
        out, err = io.StringIO(), io.StringIO()
        del events[:]
        watching[0] = True
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check-config", "--config", path])
        watching[0] = False
        results.append({"path": path, "code": code, "stdout": out.getvalue(),
                        "stderr": err.getvalue(), "network": list(events)})
    print(json.dumps(results))
""")


# -- finding the examples ------------------------------------------------------------------


@dataclass
class Block:
    """A code block of a Markdown file: fenced (with its info string) or indented."""

    doc: Path
    line: int  # of the fence, or of the first indented line
    info: Optional[str]  # None for an indented block
    lines: list[str]

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


def code_blocks(doc: Path) -> Iterator[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            indent, marks, info = fence.groups()
            end = i + 1
            while end < len(lines) and not re.match(
                    rf"^\s*{re.escape(marks[0])}{{{len(marks)},}}\s*$", lines[end]):
                end += 1
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                    for line in lines[i + 1:end]]
            yield Block(doc, i + 1, info.strip(), body)
            i = end + 1
            continue
        starts = i == 0 or not lines[i - 1].strip()
        if lines[i].startswith("    ") and lines[i].strip() and starts:
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            body = textwrap.dedent("\n".join(lines[i:end])).strip("\n").splitlines()
            yield Block(doc, i + 1, None, body)
            i = end
            continue
        i += 1


@dataclass
class Example:
    """A geproxy INI example: a block fenced ``ini`` with its words."""

    block: Block
    fragment: bool = False
    invalid: bool = False
    section: Optional[str] = None  # a fragment's section for lines before any header

    @property
    def where(self) -> str:
        return self.block.where


def parse_info(block: Block) -> Optional[Example]:
    """The example an ``ini`` block is, None for other blocks and ``not-geproxy``; a word
    the convention does not know is a ValueError (a typo would skip the check)."""
    words = (block.info or "").split()
    if not words or words[0] != "ini":
        return None
    example = Example(block)
    for word in words[1:]:
        header = re.fullmatch(r"\[([\w.-]+)\]", word)
        if header:
            example.section = header.group(1)
        elif word in WORDS:
            if word == "not-geproxy":
                return None
            setattr(example, word, True)
        else:
            raise ValueError(f"{block.where}: ```{block.info}: unknown word {word!r} "
                             f"(known: {', '.join(sorted(WORDS))}, [SECTION])")
    if example.section and not example.fragment:
        raise ValueError(f"{block.where}: ```{block.info}: a section goes with 'fragment'")
    return example


def examples() -> list[Example]:
    found = []
    for doc in DOCUMENTS:
        for block in code_blocks(doc):
            example = parse_info(block)
            if example is not None:
                found.append(example)
    return found


# -- turning an example into files ---------------------------------------------------------


@dataclass
class Item:
    """A key line of an INI text with its continuation lines, or any other line."""

    section: Optional[str]
    key: Optional[str]
    lines: list[str] = field(default_factory=list)


_HEADER = re.compile(r"\[([^\]]+)\]")
_KEY = re.compile(r"([^\s=:#;\[][^=:]*?)\s*[=:]")


def items(lines: list[str], section: Optional[str]) -> list[Item]:
    out: list[Item] = []
    for line in lines:
        header = _HEADER.match(line)
        key = _KEY.match(line)
        continued = line[:1].isspace() and line.strip() and out and out[-1].key is not None
        if continued:
            out[-1].lines.append(line)
        elif header:
            section = header.group(1)
            out.append(Item(section, None, [line]))
        elif key and not line[:1].isspace():
            out.append(Item(section, key.group(1), [line]))
        else:
            out.append(Item(section, None, [line]))
    return out


def variants(example: Example) -> list[list[Item]]:
    """The files an example stands for: one, or one per alternative of a fragment."""
    lines = list(example.block.lines)
    if example.section:
        lines.insert(0, f"[{example.section}]")
    parsed = items(lines, None)
    if not example.fragment:
        return [parsed]
    counts: dict[tuple[Optional[str], str], int] = {}
    for item in parsed:
        if item.key is not None:
            counts[(item.section, item.key)] = counts.get((item.section, item.key), 0) + 1
    out = []
    for number in range(max(counts.values(), default=1)):
        seen: dict[tuple[Optional[str], str], int] = {}
        kept = []
        for item in parsed:
            if item.key is not None:
                name = (item.section, item.key)
                index = seen[name] = seen.get(name, -1) + 1
                if index != min(number, counts[name] - 1):
                    continue
            kept.append(item)
        out.append(kept)
    return out


@dataclass
class ExampleFiles:
    certificate: str
    key: str
    client_ca: str
    htpasswd: str
    docroot: str
    access_log: str
    groups: str
    deny_page: str
    error_dir: str
    secret: str
    keytab: str


def file_kinds() -> dict[tuple[str, str], str]:
    """(section, key) -> kind of every option that names a file, built-ins and the plugins
    the examples load."""
    sys.path.insert(0, str(PYTHONPATH))
    try:
        pm = get_plugin_manager(extra=["deny_ports:DenyPorts"], entry_points=False)
    finally:
        sys.path.remove(str(PYTHONPATH))
    registry = OptionRegistry()
    pm.hook.add_options.call_historic(kwargs={"registry": registry})
    return {(o.section, o.key): o.kind for o in registry if o.kind in FILE_KINDS}


def render(example: Example, kept: list[Item], files: ExampleFiles,
           kinds: dict[tuple[str, str], str]) -> str:
    """The file to check: the example's lines, each file it names replaced by a test file,
    and, for a fragment, FRAGMENT_BASE's sections and keys it does not set."""
    out: list[str] = []
    headers: dict[str, int] = {}
    for item in kept:
        name = (item.section or "", item.key or "")
        if item.key is None or name not in kinds:
            if item.key is None and _HEADER.match(item.lines[0]):
                headers.setdefault(item.section or "", len(out))
            out.extend(item.lines)
            continue
        # The file name is the first word after "=" (the examples' names have no space); it
        # is read here without geproxy's parser, whose comment rule is under test.
        first, _, rest = item.lines[0].partition("=")
        words = rest.split()
        value = words[0] if words and not words[0].startswith("#") else ""
        if value.lower() in NO_FILE:
            out.extend(item.lines)
            continue
        if name not in TEST_FILES:
            raise AssertionError(f"{example.where}: [{name[0]}] {name[1]} names a file: add a "
                                 "test file for it to TEST_FILES")
        stand_in = TEST_FILES[name].format(**vars(files))
        out.append(first + "=" + rest.replace(value, stand_in, 1))  # its comment stays
        out.extend(item.lines[1:])
    if example.fragment:
        given = {(item.section, item.key) for item in kept if item.key is not None}
        for section, options in FRAGMENT_BASE.items():
            extra = [f"{key} = {value.format(**vars(files))}" for key, value in options.items()
                     if (section, key) not in given]
            if section in headers:
                at = headers[section] + 1
                out[at:at] = extra
                headers = {s: n + len(extra) if n >= at else n for s, n in headers.items()}
            elif extra:
                out.extend(["", f"[{section}]", *extra])
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def test_files(tmp_path_factory: pytest.TempPathFactory) -> ExampleFiles:
    import trustme
    from passlib.hash import bcrypt

    directory = tmp_path_factory.mktemp("files")
    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / "proxy.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "proxy.key"))
    trustme.CA().cert_pem.write_to_path(str(directory / "clients-ca.pem"))
    (directory / "htpasswd").write_text(
        f"alice:{bcrypt.using(ident='2y', rounds=4).hash('alice-pw')}\n")
    (directory / "www").mkdir()
    (directory / "logs").mkdir()
    (directory / "groups").write_text("staff: alice\n")
    (directory / "errors").mkdir()
    (directory / "ldap.secret").write_text("service-pw\n")
    # check-config reads no key from it (nothing Kerberos is done before a worker's first
    # token): a file that is there and readable is all it asks.
    (directory / "proxy.keytab").write_bytes(b"\x05\x02")
    page = "<html><body><p>Refused by the egress policy.</p></body></html>\n"
    (directory / "errors" / "denied.html").write_text(page)
    for name in ("blocked", "no-uploads"):  # the pages the examples' rules name
        (directory / "errors" / f"{name}.html").write_text(page)
    return ExampleFiles(str(directory / "proxy.pem"), str(directory / "proxy.key"),
                     str(directory / "clients-ca.pem"), str(directory / "htpasswd"),
                     str(directory / "www"), str(directory / "logs" / "access.log"),
                     str(directory / "groups"), str(directory / "errors" / "denied.html"),
                     str(directory / "errors"), str(directory / "ldap.secret"),
                     str(directory / "proxy.keytab"))


def run_checks(paths: list[str], directory: Path,
               modules: dict[str, str]) -> dict[str, dict[str, Any]]:
    """check-config on each of ``paths``, in one process started in a directory of its own
    under ``directory``, with ``modules`` (name -> source) importable: path -> its result
    (``code``, ``stdout``, ``stderr``, and ``network``: the audit events it caused)."""
    elsewhere = directory / "cwd"
    elsewhere.mkdir()
    importable = directory / "modules"
    importable.mkdir()
    for name, source in modules.items():
        (importable / f"{name}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHONPATH), str(importable),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", CHECKER, ",".join(NETWORK_EVENTS), *paths],
                          capture_output=True, text=True, timeout=100, env=env, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    return {result["path"]: result for result in json.loads(done.stdout)}


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory,
            test_files: ExampleFiles) -> dict[str, list[dict[str, Any]]]:
    """Every variant of every example, checked: where -> one result per variant."""
    directory = tmp_path_factory.mktemp("examples")
    kinds = file_kinds()
    paths: dict[str, list[str]] = {}
    for number, example in enumerate(examples()):
        for index, kept in enumerate(variants(example)):
            path = directory / f"example-{number}-{index}.ini"
            path.write_text(render(example, kept, test_files, kinds))
            paths.setdefault(example.where, []).append(str(path))
    results = run_checks([path for group in paths.values() for path in group], directory,
                         STAND_IN_MODULES)
    return {where: [results[path] for path in group] for where, group in paths.items()}


# -- the tests -----------------------------------------------------------------------------


EXAMPLES = examples()


def test_the_examples_are_found() -> None:
    """The search is not vacuous: the examples of each document that has some are there."""
    by_doc: dict[str, int] = {}
    for example in EXAMPLES:
        by_doc[example.block.doc.name] = by_doc.get(example.block.doc.name, 0) + 1
    assert by_doc.get("configuration.md", 0) >= 15, by_doc
    assert {"deployment.md", "tls.md", "plugins.md"} <= set(by_doc), by_doc
    assert any(e.invalid for e in EXAMPLES) and any(e.fragment for e in EXAMPLES)
    assert any(len(variants(e)) > 1 for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_the_example_passes_check_config(example: Example,
                                         checked: dict[str, list[dict[str, Any]]]) -> None:
    for number, result in enumerate(checked[example.where]):
        text = Path(result["path"]).read_text()
        shown = f"{example.where} (alternative {number + 1}):\n{text}\n{result['stderr']}"
        assert result["network"] == [], f"{shown}\ncontacted: {result['network']}"
        if not example.invalid:
            assert result["code"] == 0, shown
            assert result["stdout"] == f"{result['path']}: ok\n", shown
            continue
        assert result["code"] == 1, f"{shown}\nan invalid example was accepted"
        named = {(item.section, item.key) for kept in variants(example) for item in kept
                 if item.key is not None}
        assert any(f": [{section}] {key}: " in result["stderr"] for section, key in named), (
            f"{shown}\nthe error names no section and key of the example")


def test_no_unmarked_block_is_a_geproxy_configuration() -> None:
    """A geproxy configuration in an indented or differently fenced block would escape the
    check: it must be fenced ``ini`` (or ``ini not-geproxy`` for another program's)."""
    pm = get_plugin_manager(entry_points=False)
    registry = OptionRegistry()
    pm.hook.add_options.call_historic(kwargs={"registry": registry})
    sections = set(registry.options)
    keys = {option.key for option in registry}
    problems = []
    for doc in DOCUMENTS:
        for block in code_blocks(doc):
            words = (block.info or "").split()
            if words and words[0] not in ("text", "console", "sh", "ini"):
                continue  # python, toml, json ...: another language
            if words and words[0] == "ini":
                parse_info(block)  # raises on a word it does not know
                continue
            for line in block.lines:
                header = re.fullmatch(r"\[([\w.-]+)\]\s*", line)
                key = _KEY.match(line)
                if (header and header.group(1) in sections) or (
                        key and not line[:1].isspace() and key.group(1) in keys
                        and "=" in line[:key.end()]):
                    problems.append(f"{block.where}: {line!r}")
                    break
    assert not problems, "geproxy INI outside ```ini blocks:\n" + "\n".join(problems)


# -- the convention itself -----------------------------------------------------------------


def _example(info: str, text: str) -> Example:
    block = Block(ROOT / "docs" / "x.md", 1, info, textwrap.dedent(text).splitlines())
    example = parse_info(block)
    assert example is not None
    return example


@pytest.mark.pure
def test_a_repeated_key_of_a_fragment_is_an_alternative() -> None:
    example = _example("ini fragment [geproxy]", """\
        listen = 127.0.0.1:3128      # one
        listen = :3128               # the other
        idle_timeout = 5m
        """)
    got = [[line for item in kept for line in item.lines] for kept in variants(example)]
    assert got == [["[geproxy]", "listen = 127.0.0.1:3128      # one", "idle_timeout = 5m"],
                   ["[geproxy]", "listen = :3128               # the other",
                    "idle_timeout = 5m"]]


def test_a_fragment_is_merged_into_the_base_and_its_files_replaced(
        test_files: ExampleFiles) -> None:
    example = _example("ini fragment", """\
        [tls]
        client_cert = required
        client_ca = /etc/geproxy/tls/services-ca.pem   # the comment stays
        [acl]
        rules =
            deny all
        """)
    (kept,) = variants(example)
    text = render(example, kept, test_files, file_kinds())
    assert text == (f"[tls]\ncertificate = {test_files.certificate}\n"
                    f"client_cert = required\nclient_ca = {test_files.client_ca}   "
                    "# the comment stays\n"
                    "[acl]\nrules =\n    deny all\n\n"
                    "[geproxy]\nlisten = 127.0.0.1:0 tls://127.0.0.1:0\n")


@pytest.mark.pure
@pytest.mark.parametrize("info", ["ini fragmnet", "ini [acl]", "ini invalid extra"])
def test_an_unknown_word_in_the_info_string_is_refused(info: str) -> None:
    with pytest.raises(ValueError):
        parse_info(Block(ROOT / "docs" / "x.md", 1, info, []))


def test_the_network_watch_sees_a_lookup(tmp_path: Path) -> None:
    """The audit hook is not blind: a plugin whose configure looks a name up (a numeric
    one, which sends nothing) is reported."""
    source = textwrap.dedent("""\
        import socket
        from geproxy import hookimpl

        class LooksUp:
            name = "looks_up"

            @hookimpl
            def configure(self, config):
                socket.getaddrinfo("127.0.0.1", 53)
        """)
    path = tmp_path / "geproxy.ini"
    path.write_text("[geproxy]\nplugins = looks_up:LooksUp\naccess_log = off\n")
    (result,) = run_checks([str(path)], tmp_path, {"looks_up": source}).values()
    assert result["code"] == 0, result["stderr"]
    assert [event.split()[0] for event in result["network"]] == ["socket.getaddrinfo"]


@pytest.mark.pure
def test_other_blocks_are_not_examples() -> None:
    for info in ("ini not-geproxy", "python", "", None):
        assert parse_info(Block(ROOT / "docs" / "x.md", 1, info, ["[global]"])) is None
