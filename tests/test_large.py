"""1 GiB each way, through a tunnel and through plain forwarding, with constant memory.

The proxy runs in its own process (as users run it), so its peak RSS can be read; the bytes
are checked with sha256 at the far end. Clients and hashing run in other processes.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from geproxy.testing import pattern, pattern_sha256

GIB = 1024**3
#: Peak RSS growth allowed during a transfer, whatever its size.
RSS_BUDGET_KIB = 30 * 1024


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "gib.bin"
    with open(path, "wb") as handle:
        for piece in pattern(GIB, block=1 << 20):
            handle.write(piece)
    yield path, pattern_sha256(GIB)
    path.unlink()


@pytest.fixture(scope="module")
def gib_sha256(big_file):
    return big_file[1]


@pytest.fixture
def measured(proxy_process):
    """A proxy process, warmed up; yields it and checks its peak RSS growth after."""
    proxy = proxy_process("access_log = off\n")
    yield proxy
    assert proxy.process.poll() is None, "the proxy died"


def _warm(proxy, origin) -> int:
    out = _sh(f"curl -sS -x {proxy.url} {origin.url('/')} && "
              f"curl -sS -p -x {proxy.url} {origin.url('/')}")
    assert out == "hello\nhello\n"
    return proxy.status("VmHWM")


def _sh(command: str, timeout: float = 300) -> str:
    done = subprocess.run(["sh", "-c", command], capture_output=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


@pytest.mark.parametrize("mode", ["-p", ""], ids=["tunnel", "plain"])
def test_download_1gib(measured, origin, gib_sha256, mode):
    before = _warm(measured, origin)
    out = _sh(f"curl -sS --noproxy '' {mode} -x {measured.url} "
              f"{origin.url(f'/bytes/{GIB}')} | sha256sum")
    assert out.split()[0] == gib_sha256
    grown = measured.status("VmHWM") - before
    print(f"peak RSS grew {grown} KiB")
    assert grown < RSS_BUDGET_KIB


@pytest.mark.parametrize("mode", ["-p", ""], ids=["tunnel", "plain"])
def test_upload_1gib(measured, origin, big_file, mode):
    path, digest = big_file
    before = _warm(measured, origin)
    # Through the tunnel with a Content-Length; plain forwarding chunked from a pipe,
    # decoded and re-framed by the proxy.
    source = f"-T {path}" if mode else f"-T - < {path}"
    out = _sh(f"curl -sS --noproxy '' {mode} -x {measured.url} {source} "
              f"{origin.url('/sha256')}")
    assert json.loads(out) == {"length": GIB, "sha256": digest}
    grown = measured.status("VmHWM") - before
    print(f"peak RSS grew {grown} KiB")
    assert grown < RSS_BUDGET_KIB
