"""The test kit checks itself: its leak counters see what a leak would leave behind, and a
plugin author's suite that uses it as the docs say passes."""

from __future__ import annotations

import socket

import gevent
import pytest

from geproxy.testing import (
    curl,
    head_field,
    live_greenlets,
    open_fds,
    pattern,
    settle,
    wait_for_records,
    wait_until,
)


def test_the_leak_counters_see_sockets_and_greenlets():
    fds, greenlets = open_fds(), live_greenlets()
    sock = socket.socket()
    waiter = gevent.spawn(gevent.sleep, 30)
    gevent.sleep(0)
    try:
        assert open_fds() == fds + 1
        assert live_greenlets() == greenlets + 1
        # settle() gives up (bounded) and reports the leak rather than hiding it.
        assert settle(fds, greenlets, limit=0.1) == (fds + 1, greenlets + 1)
    finally:
        sock.close()
        waiter.kill()
    assert settle(fds, greenlets, limit=2) == (fds, greenlets)


def test_the_pattern_does_not_depend_on_the_piece_size():
    whole = b"".join(pattern(200_003))
    assert len(whole) == 200_003
    assert b"".join(pattern(200_003, block=7_001)) == whole
    assert whole[:65504] == whole[65504:131008]  # the block repeats
    assert whole[:65536] != whole[65536:131072]  # but not at a power-of-two period


def test_the_dns_server_answers_counts_truncates_and_fails(dns_server):
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode

    port = dns_server.address[1]
    dns_server.add("a.test", "A", "127.0.0.1", "127.0.0.2", ttl=30)
    query = dns.message.make_query("a.test", "A")
    answer = dns.query.udp(query, "127.0.0.1", port=port, timeout=5)
    assert sorted(r.address for r in answer.answer[0]) == ["127.0.0.1", "127.0.0.2"]
    assert answer.answer[0].ttl == 30
    dns_server.truncate = True
    assert dns.query.udp(query, "127.0.0.1", port=port, timeout=5).flags & dns.flags.TC
    assert len(dns.query.tcp(query, "127.0.0.1", port=port, timeout=5).answer[0]) == 2
    missing = dns.message.make_query("nowhere.test", "A")
    assert dns.query.udp(missing, "127.0.0.1", port=port, timeout=5).rcode() == dns.rcode.NXDOMAIN
    assert dns_server.count("a.test") == 3 and dns_server.count("nowhere.test", "A") == 1


def test_the_fake_clock(fake_clock):
    start = fake_clock()
    fake_clock.advance(90)
    assert fake_clock() == start + 90


def test_the_pool_audit_sees_an_unsound_pool(proxy, origin):
    out = curl("-x", proxy.url, origin.url("/"))
    assert out.returncode == 0
    assert proxy.pool_problems() == []  # one healthy keep-alive connection to the origin
    pool = proxy.server.pool
    (key, sock), = pool.idle()
    pool.put(key, sock, ("127.0.0.1", origin.port))  # the same one again
    assert proxy.pool_problems() == ["a connection is pooled twice"]
    pool.per_key = 1  # as if put() had let a second one past upstream_keepalive
    assert f"{key}: 2 pooled, over upstream_keepalive" in proxy.pool_problems()
    sock.close()
    assert f"{key}: a closed connection is pooled" in proxy.pool_problems()
    proxy.server.pool.clear()  # leave a sound pool to the teardown's own audit
    assert proxy.pool_problems() == []


def test_response_reader_reads_pipelined_answers_one_by_one():
    """Two answers in one segment (Content-Length, then chunked): each read gives one, and a
    close in the middle of a third fails the test."""
    from geproxy.testing import ResponseReader

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\ntwo\r\n4;x=y\r\nfour\r\n0\r\n\r\n"
                       b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ncut")
        theirs.shutdown(socket.SHUT_WR)
        answers = ResponseReader(ours, timeout=5)
        assert answers.read() == (b"HTTP/1.1 200 OK\r\nContent-Length: 3", b"one")
        assert answers.read()[1] == b"twofour"
        with pytest.raises(AssertionError, match="in the middle of a body"):
            answers.read()


@pytest.mark.pure
def test_wait_until_is_bounded_and_says_whether_it_held():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3, limit=5)
    assert len(calls) == 3
    assert not wait_until(lambda: False, limit=0.05)


@pytest.mark.pure
def test_head_field_finds_a_field_whatever_its_case():
    head = b"HTTP/1.1 403 Forbidden\r\nProxy-Status: geproxy; error=x\r\nX-A:  1 \r\nx-a: 2"
    assert head_field(head, b"proxy-status") == b"geproxy; error=x"
    assert head_field(head, b"x-a") == b"1"
    assert head_field(head, b"via") is None


AUTOUSE_NO_LEAKS = """
    from gevent import monkey

    monkey.patch_all()

    import pytest


    @pytest.fixture(autouse=True)
    def _no_leaks(no_leaks):
        yield
"""


def test_no_leaks_made_autouse_passes_a_first_test_that_starts_a_proxy(tmp_path, run_suite):
    """gevent makes its hub, and the hub its loop's descriptors, on first use: the kit must
    not charge them to the first test that starts a server."""
    output = run_suite(tmp_path, {"conftest.py": AUTOUSE_NO_LEAKS, "test_first.py": """
        from geproxy.testing import curl


        def test_the_first_test_starts_a_proxy(proxy, origin):
            out = curl("-x", proxy.url, origin.url("/", host="origin.test"))
            assert out.stdout == b"hello\\n", out.stderr


        def test_a_second_one_too(proxy_factory, origin):
            out = curl("-p", "-x", proxy_factory().url, origin.url("/"))
            assert out.stdout == b"hello\\n", out.stderr
    """})
    assert "2 passed" in output, output


def test_no_leaks_made_autouse_still_sees_a_leak(tmp_path, run_suite):
    """The warm-up hides no test's own leak: a socket left open fails its test."""
    files = {"conftest.py": AUTOUSE_NO_LEAKS, "test_leaky.py": """
        import socket

        KEPT = []


        def test_leaves_a_socket_open():
            KEPT.append(socket.socket())
    """}
    with pytest.raises(AssertionError, match="descriptors leaked"):
        run_suite(tmp_path, files)


def test_proxy_records_is_the_sequence_of_records(proxy, origin):
    from geproxy import Record

    assert len(proxy.records) == 0 and list(proxy.records) == [] and not proxy.records
    for path in ("/", "/status/404"):
        assert curl("-x", proxy.url, origin.url(path)).returncode == 0
    wait_for_records(proxy, 2)
    assert isinstance(proxy.records[-1], Record)
    assert [r.status for r in proxy.records] == [200, 404]
    assert len(proxy.records) == 2 and proxy.records[-1].status == 404
    assert proxy.records[:1] == [proxy.records[0]]
    assert proxy.records.records == list(proxy.records)  # the list, as before
    assert proxy.records.index(proxy.records[1]) == 1
    assert f"GET {origin.url('/status/404')} 404" in repr(proxy.records)


def test_proxy_process_log_is_lines_that_in_searches(proxy_process):
    from geproxy import DEFAULT_PLUGINS

    process = proxy_process("")
    assert all(isinstance(line, str) and line.endswith("\n") for line in process.log)
    assert "listening on 127.0.0.1:" in process.log  # within a line, not a whole line
    assert "no line says this" not in process.log
    assert "listening on 127.0.0.1:" in process.log.text
    assert process.log.text == "".join(process.log)
    # Its plugins, as the "listening on" line names them: the built-ins first, in order.
    builtins = [name for name, _ in DEFAULT_PLUGINS]
    assert process.plugins[:len(builtins)] == builtins
    assert process.stop() == 0
