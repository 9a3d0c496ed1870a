"""The test kit: a pytest plugin with a running proxy, real origins, a DNS server, fakes.

Installing geproxy registers it with pytest (the ``pytest11`` entry point), so its fixtures
are there in any test suite; the suite's conftest.py must patch gevent in, first thing::

    from gevent import monkey; monkey.patch_all()

Everything listens on loopback, on port 0. Names are resolved by :class:`StaticResolver`
(the names a test adds) or the :class:`DNSServer` fixture, never by the system resolver, so
no test sends a packet beyond loopback.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gevent
import pytest

from .certs import TLSFiles, issue_client_cert, make_tls_files
from .clients import (
    ResponseReader,
    curl,
    echo,
    exchange,
    free_port,
    head_field,
    live_greenlets,
    open_fds,
    open_tunnel,
    recv_all,
    require_tool,
    settle,
    stop_process,
    wait_until,
)
from .data import pattern, pattern_sha256
from .directory import ldap_directory  # noqa: F401  (the fixture, for pytest)
from .dns import DNSServer, FakeClock
from .fakes import HookRecorder, RecordCollector, StaticResolver
from .kerberos import kerberos, kerberos_kdc  # noqa: F401  (fixtures: a KDC on loopback)
from .servers import (
    Origin,
    Proxy,
    ProxyProcess,
    RawOrigin,
    kit_ini,
    start_origin,
    start_proxy,
    wait_for_lines,
    wait_for_records,
)

__all__ = [
    "Proxy",
    "Origin",
    "ProxyProcess",
    "RawOrigin",
    "StaticResolver",
    "DNSServer",
    "FakeClock",
    "HookRecorder",
    "RecordCollector",
    "curl",
    "echo",
    "open_tunnel",
    "exchange",
    "recv_all",
    "ResponseReader",
    "pattern",
    "pattern_sha256",
    "wait_for_records",
    "wait_for_lines",
    "open_fds",
    "live_greenlets",
    "settle",
    "require_tool",
    "stop_process",
    "free_port",
    "head_field",
    "wait_until",
    "start_origin",
    "start_proxy",
    "kit_ini",
    "TLSFiles",
    "issue_client_cert",
    "make_tls_files",
]


# -- pytest fixtures -----------------------------------------------------------------------


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fails the test if descriptors or greenlets are left behind once it tore down."""
    # gevent's hub opens its loop's descriptors (an epoll and an eventfd) the first time it
    # is asked for, and keeps them for the life of the process: made before the count, they
    # are not charged to the first test that starts a server.
    gevent.get_hub()
    fds, greenlets = open_fds(), live_greenlets()
    yield
    after_fds, after_greenlets = settle(fds, greenlets)
    assert after_fds <= fds, f"descriptors leaked: {fds} before, {after_fds} after"
    assert after_greenlets <= greenlets, (
        f"greenlets leaked: {greenlets} before, {after_greenlets} after")


def _require_patched() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        pytest.fail("geproxy.testing runs the proxy in the test process: call "
                    "gevent.monkey.patch_all() at the top of conftest.py")


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """``proxy_factory(ini="", plugins=(), resolver=None, detach_after=None)`` starts a
    proxy (``detach_after``: seconds before a tunnel's greenlet lets go, see
    ``ProxyServer``); all are stopped at teardown,
    which fails the test if an upstream pool is unsound (``Proxy.pool_problems``) or still
    holds a connection after the stop."""
    _require_patched()
    started: list[Proxy] = []

    def factory(ini: str = "", plugins: Sequence[Any] = (),
                resolver: Optional[StaticResolver] = None,
                detach_after: Optional[float] = None) -> Proxy:
        proxy = start_proxy(tmp_path, ini, plugins, resolver, detach_after)
        started.append(proxy)
        return proxy

    yield factory
    problems = [problem for proxy in started for problem in proxy.pool_problems()]
    for proxy in started:
        proxy.server.stop(timeout=2)
        if len(proxy.server.pool):
            problems.append(f"{len(proxy.server.pool)} connections pooled after the stop")
    assert not problems, "upstream pool: " + "; ".join(problems)


@pytest.fixture
def proxy(proxy_factory: Callable[..., Proxy]) -> Proxy:
    """A proxy with the default configuration; ``*.test`` names resolve to 127.0.0.1."""
    resolver = StaticResolver({"origin.test": ["127.0.0.1"], "localhost.test": ["127.0.0.1"]})
    return proxy_factory(resolver=resolver)


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[[str], ProxyProcess]]:
    """``proxy_process(ini)`` runs geproxy in its own process; stopped at teardown."""
    started: list[ProxyProcess] = []

    def factory(ini: str = "") -> ProxyProcess:
        path = tmp_path / f"process-{len(started)}.ini"
        path.write_text(kit_ini(ini, access_log="-"))
        started.append(ProxyProcess(str(path)))
        return started[-1]

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = start_origin()
    yield server
    server.server.stop(timeout=1)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


@pytest.fixture(scope="session")
def tls_ca() -> Any:
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tls_files(tls_ca: Any, tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """Certificates for a TLS listener and for mTLS clients (see TLSFiles); the proxy's is
    from ``tls_ca``, so ``ca_file`` trusts both it and ``tls_origin``."""
    return make_tls_files(tls_ca, tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_origin(tls_ca: Any) -> Iterator[Origin]:
    """An HTTPS origin whose certificate (from ``tls_ca``) names ``origin.test``."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("origin.test", "127.0.0.1").configure_cert(context)
    server = start_origin(context)
    yield server
    server.server.stop(timeout=1)


@pytest.fixture
def raw_origin() -> Iterator[Callable[..., RawOrigin]]:
    """``raw_origin(handler)`` starts a RawOrigin; all are stopped at teardown."""
    started: list[RawOrigin] = []

    def factory(handler: Callable[[socket.socket], None]) -> RawOrigin:
        server = RawOrigin(handler)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A scripted DNS server on loopback; see :class:`DNSServer`."""
    server = DNSServer()
    yield server
    server.stop()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
