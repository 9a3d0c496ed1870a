"""Requests for the proxy itself: the pages the proxy port exposes, and ``docroot``."""

from __future__ import annotations

import hashlib
import os

import pytest

from geproxy.errors import ConfigError
from geproxy.testing import curl, exchange, pattern


@pytest.fixture
def docroot(tmp_path):
    root = tmp_path / "www"
    (root / "docs").mkdir(parents=True)
    (root / "index.html").write_text("<h1>egress</h1>\n")
    (root / "docs" / "index.html").write_text("docs index\n")
    (root / "proxy.txt").write_text("use the proxy\n")
    (root / "big.bin").write_bytes(b"".join(pattern(3 * 1024 * 1024 + 5)))
    (tmp_path / "secret.txt").write_text("outside\n")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    return root


def test_docroot_serves_files_and_indexes(proxy_factory, docroot):
    proxy = proxy_factory(f"docroot = {docroot}\n")
    out = curl("-i", f"{proxy.url}/")
    assert out.stdout.startswith(b"HTTP/1.1 200 ") and out.stdout.endswith(b"<h1>egress</h1>\n")
    assert b"Content-Type: text/html; charset=utf-8\r\n" in out.stdout
    assert curl(f"{proxy.url}/docs/").stdout == b"docs index\n"
    assert curl(f"{proxy.url}/proxy.txt").stdout == b"use the proxy\n"
    big = curl(f"{proxy.url}/big.bin")
    assert hashlib.sha256(big.stdout).hexdigest() == hashlib.sha256(
        (docroot / "big.bin").read_bytes()).hexdigest()
    head = curl("-I", f"{proxy.url}/proxy.txt").stdout
    assert b"Content-Length: 14\r\n" in head
    assert curl("-i", f"{proxy.url}/healthz").stdout.endswith(b"ok\n")  # still the page


@pytest.mark.parametrize("path", ["/../secret.txt", "/%2e%2e/secret.txt", "/docs/../../secret.txt",
                                  "/link.txt", "/nowhere.txt", "/%00", "//etc/passwd"])
def test_no_path_escapes_the_docroot(proxy_factory, docroot, path):
    proxy = proxy_factory(f"docroot = {docroot}\n")
    answer = exchange(proxy.address,
                      f"GET {path} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode())
    assert b"outside" not in answer and b"root:" not in answer
    assert answer.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 400 "))


def test_requests_pipelined_behind_a_local_page_are_answered(proxy_factory, origin):
    """The bytes behind a bodiless request for the proxy itself are the next request: kept,
    and answered in order (they were dropped, and the client left waiting)."""
    proxy = proxy_factory()
    pipelined = (b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
                 + f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                 + b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    answer = exchange(proxy.address, pipelined)
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3, answer
    assert answer.endswith(b"\r\n\r\nok\n") and b"\r\n\r\nhello\n" in answer
    assert [seen.path for seen in origin.seen] == ["/"]


def test_local_paths_expose_admin_pages_on_the_proxy_port(proxy_factory):
    proxy = proxy_factory("local_paths = /healthz /readyz /metrics\n")
    assert curl(f"{proxy.url}/readyz").stdout == b"ready\n"
    assert b"geproxy_requests_total" in curl(f"{proxy.url}/metrics").stdout
    assert curl("-i", f"{proxy.url}/tunnels").stdout.startswith(b"HTTP/1.1 404 ")
    only_health = proxy_factory()
    assert curl("-i", f"{only_health.url}/readyz").stdout.startswith(b"HTTP/1.1 404 ")


def test_bad_local_paths_or_docroot_stop_the_start(proxy_factory, tmp_path):
    with pytest.raises(ConfigError, match="local_paths"):
        proxy_factory("local_paths = /tunnels\n")
    with pytest.raises(ConfigError, match="docroot"):
        proxy_factory(f"docroot = {tmp_path / 'missing'}\n")
