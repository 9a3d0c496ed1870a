"""README.md's quick start is what a newcomer runs and what CI runs: the two commands, the
extras they install, and .ci/run, which must run the same test command (tox too).

These read the repository's files and the installed distribution's metadata; nothing here
starts a process or opens a socket.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
VENV = "python3 -m venv .venv && . .venv/bin/activate && "
#: What the project's own development adds to the kit's needs, which plugin authors skip.
DEVELOPMENT_ONLY = {"hypothesis", "atheris", "ruff", "mypy", "import-linter", "pyyaml"}
#: The static checks .ci/run runs between the install and the tests.
STATIC_CHECKS = ["python -m ruff check .", "python -m mypy geproxy plugins", "lint-imports"]


def quick_start() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]


def commands() -> list[str]:
    """The quick start's commands: its indented lines that make the virtual environment."""
    return [line[4:] for line in quick_start().splitlines()
            if line.startswith("    python3 -m venv ")]


def ci_lines() -> list[str]:
    """.ci/run's commands: its lines that are neither blank nor comments."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    return [line for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def extra(name: str) -> set[str]:
    """The distributions geproxy's extra ``name`` adds, as installed here."""
    found = set()
    for text in importlib.metadata.requires("geproxy") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is not None and "extra" in str(marker) and marker.evaluate({"extra": name}):
            found.add(canonicalize_name(requirement.name))
    return found


def test_the_two_commands_install_into_a_virtual_environment():
    run, tests = commands()
    assert run == VENV + "pip install . && geproxy --config etc/geproxy.ini"
    assert tests == VENV + "pip install -e '.[dev]' -e ./examples/blocklist && python -m pytest"
    # Why the virtual environment, and what Debian and Ubuntu need for it.
    text = " ".join(quick_start().split())
    assert "externally-managed-environment" in text and "`python3-venv`" in text


def test_ci_runs_the_test_command_of_the_readme_with_only_static_checks_around_it():
    tests = commands()[1]
    install, _, run = tests.rpartition(" && ")
    assert run == "python -m pytest"
    lines = ci_lines()
    assert install in lines, ".ci/run does not install as README.md's test command does"
    after = lines[lines.index(install):]
    # The README's `python -m pytest`, with .ci/run's arguments, in a loopback-only namespace.
    unshare = f"exec unshare --net -- sh -c 'ip link set lo up && {run} \"$@\"' sh \"$@\""
    # Beyond the README's install, only the optional extras whose tests need the Debian
    # packages .ci/run installs, each named in the README.
    extras = [line for line in after[1:] if line.startswith("pip install")]
    assert extras == ["pip install -e '.[kerberos]'"]
    text = " ".join(quick_start().split())
    assert "`pip install -e '.[kerberos]'`" in text
    assert after == [install, *extras, *STATIC_CHECKS, "export GEPROXY_REQUIRE_TOOLS=1",
                     unshare]
    before = "\n".join(lines[:lines.index(install)])
    assert not re.search(r"\bpip\b", before)  # Python gets nothing but the README's install
    text = " ".join(quick_start().split())
    for check in STATIC_CHECKS:
        assert f"`{check}`" in text, f"README.md does not say that .ci/run runs {check}"


def test_tox_installs_what_the_test_command_installs():
    tox = (ROOT / "tox.ini").read_text(encoding="utf-8")
    testenv = tox.split("[testenv]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^extras = dev$", testenv, re.M)
    assert re.search(r"^commands_pre = python -m pip install -e \{toxinidir\}/examples/blocklist$",
                     testenv, re.M)
    assert re.search(r"^testpaths = tests examples/blocklist/tests$", tox, re.M)


def test_tox_runs_the_static_checks_of_ci_before_the_tests():
    tox = (ROOT / "tox.ini").read_text(encoding="utf-8")
    testenv = tox.split("[testenv]\n", 1)[1].split("\n[", 1)[0]
    found = re.search(r"^commands =\n((?:    .*\n)+)", testenv + "\n", re.M)
    assert found, "tox.ini's [testenv] has no commands list"
    commands = [line.strip() for line in found.group(1).splitlines()]
    assert commands == [*STATIC_CHECKS, "python -m pytest {posargs}"]


def test_pip_builds_through_the_build_system_of_pyproject():
    """PEP 517: pip builds with the backend pyproject.toml names, not setup.py's legacy path;
    the interpreters claimed are the ones CI runs."""
    import tomllib

    build = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(Requirement(text).name == "setuptools" for text in build["requires"])
    metadata = importlib.metadata.metadata("geproxy")
    assert metadata["Requires-Python"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")


def test_plugin_authors_install_the_kit_without_the_projects_development_tools():
    testing, dev = extra("testing"), extra("dev")
    assert {"pytest", "pytest-timeout", "trustme", "requests", "dnslib"} <= testing
    assert not testing & DEVELOPMENT_ONLY
    assert dev == testing | DEVELOPMENT_ONLY
    assert "test" not in (importlib.metadata.metadata("geproxy").get_all("Provides-Extra") or [])


def test_every_library_the_kit_imports_comes_with_geproxy_or_its_testing_extra():
    imported: set[str] = set()
    for path in (ROOT / "geproxy" / "testing").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"geproxy", "__future__"}
    distributions = importlib.metadata.packages_distributions()
    installed = {canonicalize_name(Requirement(text).name)
                 for text in importlib.metadata.requires("geproxy") or []
                 if Requirement(text).marker is None} | extra("testing")
    for module in sorted(third_party):
        names = {canonicalize_name(name) for name in distributions.get(module, [module])}
        assert names & installed, f"geproxy.testing imports {module}, which neither geproxy " \
                                  "nor its testing extra requires"


def test_the_docs_name_the_extras_that_exist():
    kit = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert "`pip install 'geproxy[testing]'` brings the Python parts" in " ".join(kit.split())
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "fuzz" / "README.md", ROOT / "bench" / "README.md",
             ROOT / "examples" / "blocklist" / "README.md"]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"\[test\]", text), f"{page.name} names the old [test] extra"
