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
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402

from geproxy.testing import Proxy, StaticResolver  # noqa: E402
from geproxy.testing.protocols import PROTOCOLS, ProxyClient, open_client, protocol_ini  # noqa: E402

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


@pytest.fixture
def refusing() -> Iterator[int]:
    """A port that refuses connections: bound, never listening, so nobody else takes it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def stalled() -> Callable[[Any], Callable[[], bool]]:
    """``stalled(sock)``: a condition for ``wait_until``: the bytes coming to ``sock``
    (which nobody reads) stopped coming, so their sender waits on full buffers. Its receive
    queue holds some, and no more than at the last look (``wait_until`` looks every 20 ms,
    and the sender, in this process or on loopback, fills a buffer in far less)."""
    import fcntl
    import struct
    import termios

    def condition(sock: Any) -> Callable[[], bool]:
        last = [-1]

        def check() -> bool:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                    b"\0\0\0\0"))[0]
            still = queued > 0 and queued == last[0]
            last[0] = queued
            return still

        return check

    return condition


@pytest.fixture(params=PROTOCOLS)
def client_protocol(request: pytest.FixtureRequest) -> str:
    """Runs a test once for each protocol a client may speak to the proxy: HTTP/1.1 on a
    plain listener, HTTP/1.1 over TLS, HTTP/2 (geproxy.testing.protocols)."""
    return str(request.param)


@pytest.fixture
def protocol_proxy(proxy_factory: Callable[..., Proxy], tls_files: Any,
                   client_protocol: str) -> Callable[..., Proxy]:
    """``protocol_proxy(core="", extra="", plugins=(), resolver=None, **tls)``: a proxy
    with the listener the test's client protocol needs (``core`` lines in [geproxy],
    ``extra`` sections, ``tls`` options in [tls]); ``origin.test`` resolves to 127.0.0.1
    unless a ``resolver`` is given."""

    def start(core: str = "", extra: str = "", plugins: Sequence[Any] = (),
              resolver: Optional[StaticResolver] = None, **tls: str) -> Proxy:
        return proxy_factory(protocol_ini(client_protocol, tls_files, core, extra, **tls),
                             plugins=plugins,
                             resolver=resolver or StaticResolver({"origin.test": ["127.0.0.1"]}))

    return start


@pytest.fixture
def proxy_client(proxy_factory: Callable[..., Proxy], tls_files: Any,
                 client_protocol: str) -> Iterator[Callable[..., ProxyClient]]:
    """``proxy_client(proxy, **h2_options)``: a client connection to ``proxy`` over the
    test's protocol; all are closed at teardown, before the proxies stop."""
    opened: list[ProxyClient] = []

    def connect(proxy: Proxy, **options: Any) -> ProxyClient:
        opened.append(open_client(proxy, client_protocol, tls_files.ca_file, **options))
        return opened[-1]

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def protocol_pair(protocol_proxy: Callable[..., Proxy],
                  proxy_client: Callable[..., ProxyClient]
                  ) -> Callable[..., tuple[Proxy, ProxyClient]]:
    """``protocol_pair(core="", extra="", plugins=(), resolver=None, **tls)``: a proxy (as
    ``protocol_proxy`` starts it) and a client connected to it over the test's protocol."""

    def start(*args: Any, **kwargs: Any) -> tuple[Proxy, ProxyClient]:
        proxy = protocol_proxy(*args, **kwargs)
        return proxy, proxy_client(proxy)

    return start
