"""The example plugin's own tests, written with geproxy's test kit as any plugin author would."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
from geproxy_blocklist import Blocklist

from geproxy import ConfigError
from geproxy.testing import FakeClock, curl, exchange, wait_for_records


def _ini(path, interval="2s"):
    return f"[blocklist]\nfile = {path}\ncheck_interval = {interval}\n"


def test_a_listed_destination_is_refused(proxy_factory, origin, tmp_path):
    listed = tmp_path / "blocklist.txt"
    listed.write_text("# refused\nblocked.test\n.bad.test\n")
    proxy = proxy_factory(_ini(listed), plugins=[Blocklist()])
    for name in ("blocked.test", "bad.test", "www.bad.test"):
        proxy.resolver.add(name, "127.0.0.1")
        answer = exchange(proxy.address, f"CONNECT {name}:{origin.port} HTTP/1.1\r\n\r\n"
                          .encode(), until_close=False)
        assert answer.startswith(b"HTTP/1.1 403 "), name
    assert wait_for_records(proxy, 3)[-1].rule == "blocklist"
    proxy.resolver.add("fine.test", "127.0.0.1")
    out = curl("-x", proxy.url, origin.url("/", host="fine.test"))
    assert out.stdout == b"hello\n"
    proxy.resolver.add("notbad.test", "127.0.0.1")
    out = curl("-x", proxy.url, origin.url("/", host="notbad.test"))
    assert out.stdout == b"hello\n"  # .bad.test does not cover notbad.test


def test_the_file_is_reloaded_when_it_changes(proxy_factory, origin, tmp_path):
    listed = tmp_path / "blocklist.txt"
    listed.write_text("")
    clock = FakeClock()
    plugin = Blocklist(clock=clock)
    proxy = proxy_factory(_ini(listed), plugins=[plugin])
    proxy.resolver.add("soon.test", "127.0.0.1")
    url = origin.url("/", host="soon.test")
    assert curl("-x", proxy.url, url).stdout == b"hello\n"
    listed.write_text("soon.test\n")
    os.utime(listed, ns=(1, 1))  # a different stamp, whatever the file system's resolution
    assert curl("-x", proxy.url, url).stdout == b"hello\n"  # not checked again yet
    clock.advance(3)
    assert curl("-i", "-x", proxy.url, url).stdout.startswith(b"HTTP/1.1 403 ")


def test_an_unreadable_file_stops_the_start(proxy_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"\[blocklist\] file: cannot read"):
        proxy_factory(_ini(tmp_path / "missing.txt"), plugins=[Blocklist()])


def test_installed_it_is_found_through_the_entry_point(proxy_process):
    names = {ep.name for ep in importlib.metadata.entry_points(group="geproxy")}
    if "blocklist" not in names:
        if os.environ.get("GEPROXY_REQUIRE_TOOLS"):
            pytest.fail("geproxy-blocklist is not installed (pip install examples/blocklist)")
        pytest.skip("geproxy-blocklist is not installed")
    # geproxy started as users start it, with no plugins = line: it finds the plugin itself.
    process = proxy_process("")
    assert "blocklist" in process.plugins
