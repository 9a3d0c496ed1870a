"""Test setup: gevent patched in first, the geproxy test kit, and a leak check on every test."""

from gevent import monkey

monkey.patch_all()

import functools  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Mapping, Sequence  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402

# The kit (geproxy.testing) comes in through its pytest11 entry point.


def pytest_sessionstart(session: pytest.Session) -> None:
    # Warm up what gevent creates once per process (the resolver's thread pool, the child
    # watcher), so that the leak check counts only what a test itself leaves behind.
    gevent.get_hub().threadpool.apply(lambda: None)
    if shutil.which("curl"):
        subprocess.run(["curl", "--version"], capture_output=True, timeout=10)


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> None:
    """Every test that does I/O: no descriptor or greenlet left behind (see
    geproxy.testing.no_leaks). Tests marked ``pure`` (bytes in, events out) are spared."""
    if request.node.get_closest_marker("pure") is None:
        request.getfixturevalue("no_leaks")


@pytest.fixture
def run_suite() -> Callable[..., str]:
    """``run_suite(directory, files, pythonpath=())``: pytest run on a fresh suite of
    ``files`` (name -> text, dedented) in ``directory``, as a plugin author runs theirs: its
    own process, the kit from the pytest11 entry point, ``pythonpath`` directories first on
    the module path. Returns its output; fails (AssertionError) when the suite failed."""

    def run(directory: Path, files: Mapping[str, str], pythonpath: Sequence[Path] = ()
            ) -> str:
        for name, text in files.items():
            (directory / name).write_text(textwrap.dedent(text))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env["PYTHONPATH"] = os.pathsep.join(
            [*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
             "timeout=120", str(directory)],
            cwd=directory, env=env, capture_output=True, timeout=240, check=False)
        output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        assert result.returncode == 0, output
        return output

    return run


@pytest.fixture(params=["waiting", "detached"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    """Runs a test twice: tunnels relaying with their connection's greenlet waiting (as short
    ones do), and detached from it at once (as every tunnel is after the server's
    ``detach_after``): the proxies of ``proxy_factory`` are started so."""
    return str(request.param)


@pytest.fixture
def proxy_factory(proxy_factory: Callable[..., Any], request: pytest.FixtureRequest
                  ) -> Callable[..., Any]:
    """The kit's, with proxies whose tunnels detach at once in a test run as
    ``relay_mode`` "detached"."""
    if "relay_mode" not in request.fixturenames or (
            request.getfixturevalue("relay_mode") != "detached"):
        return proxy_factory
    return functools.partial(proxy_factory, detach_after=0.001)
