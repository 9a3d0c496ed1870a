"""HTTP/2 to the proxy: CONNECT streams as tunnels, plain requests, flow control, resets.

The client is built on the h2 package (geproxy.testing.h2client), not on geproxy's code.
"""

from __future__ import annotations

import hashlib
import json
import socket

import gevent
import gevent.event
import h2.errors
import h2.exceptions
import h2.settings
import pytest

from geproxy.testing import (
    echo,
    kit_ini,
    pattern,
    pattern_sha256,
    wait_for_records,
    wait_until,
)
from geproxy.testing.h2client import H2Client

# Every test here twice: CONNECT streams relaying with their greenlet waiting, and detached
# from it at once.
pytestmark = pytest.mark.usefixtures("relay_mode")

#: An echo that also says how many bytes it read, once the client half-closed.
EOF_MARK = b"<eof>"
#: The bound on the tests' own waits, in seconds.
LIMIT = 10


def h2_ini(tls_files, core="", **tls):
    """A plain and an HTTP/2 TLS listener; ``core`` lines for [geproxy], ``tls`` options."""
    return ("[geproxy]\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n" + core
            + tls_files.ini(http2="on", **tls))


@pytest.fixture
def h2_proxy(proxy_factory, tls_files):
    from geproxy.testing import StaticResolver

    resolver = StaticResolver({"origin.test": ["127.0.0.1"]})
    return proxy_factory(h2_ini(tls_files), resolver=resolver)


@pytest.fixture
def h2_pair(proxy_factory, tls_files):
    """``h2_pair(ini_extra="", cert=None)``: a proxy with an HTTP/2 TLS listener (origin.test
    resolving to 127.0.0.1) and an H2Client on it, closed at teardown."""
    from geproxy.testing import StaticResolver

    clients = []

    def start(extra="", cert=None, core="", **tls):
        proxy = proxy_factory(h2_ini(tls_files, core, **tls) + extra,
                              resolver=StaticResolver({"origin.test": ["127.0.0.1"]}))
        clients.append(H2Client(proxy.tls_address, tls_files.ca_file, cert_file=cert))
        return proxy, clients[-1]

    yield start
    for made in clients:
        made.close()


@pytest.fixture
def client(h2_proxy, tls_files):
    made = H2Client(h2_proxy.tls_address, tls_files.ca_file)
    yield made
    made.close()


def echo_then_mark(sock):
    """Echo until the client's EOF, then say so (the half-close reached the origin)."""
    echo(sock)
    sock.sendall(EOF_MARK)


def _flood(sock) -> None:
    """A raw_origin handler that sends 64 MiB, or until the proxy lets go of it."""
    try:
        for piece in pattern(64 * 1024 * 1024):
            sock.sendall(piece)
    except OSError:
        pass


def test_fifty_tunnels_on_one_connection_some_reset_midway(h2_proxy, client, raw_origin):
    origin = raw_origin(echo_then_mark)
    size = 300 * 1024 + 7
    streams = [client.connect(f"origin.test:{origin.port}") for _ in range(50)]
    for stream in streams:
        assert stream.wait_head() == 200
    doomed = set(range(0, 50, 10))

    def drive(index, stream):
        digest = hashlib.sha256()
        got = 0
        pieces = list(pattern(size, 16 * 1024))
        for number, piece in enumerate(pieces):
            stream.send(piece)
            if index in doomed and number == len(pieces) // 2:
                stream.cancel()
                return "reset"
        stream.end()
        while True:
            data = stream.recv(timeout=30)
            if not data:
                break
            digest.update(data)
            got += len(data)
        return got, digest

    jobs = [gevent.spawn(drive, i, s) for i, s in enumerate(streams)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    expected = hashlib.sha256()
    for piece in pattern(size):
        expected.update(piece)
    expected.update(EOF_MARK)
    for index, job in enumerate(jobs):
        if index in doomed:
            assert job.value == "reset"
            continue
        got, digest = job.value
        assert got == size + len(EOF_MARK)
        assert digest.hexdigest() == expected.hexdigest()
    records = wait_for_records(h2_proxy, 50)
    tunnels = [r for r in records if r.method == "CONNECT"]
    assert len(tunnels) == 50
    assert all(r.version == "HTTP/2" and r.status == 200 for r in tunnels)
    assert sum(r.close_reason == "client reset" for r in tunnels) == len(doomed)
    done = [r for r in tunnels if r.close_reason == "done"]
    assert len(done) == 50 - len(doomed)
    assert all(r.bytes_in == size and r.bytes_out == size + len(EOF_MARK) for r in done)
    assert len({r.ctx.conn_id for r in tunnels}) == 50  # one id per stream


def test_plain_get_and_post_over_h2(h2_proxy, client, origin):
    status, headers, body = client.request("GET", f"http://origin.test:{origin.port}/bytes/70000")
    assert status == 200
    assert headers["content-length"] == "70000"
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(70000)
    assert "connection" not in headers and "via" in headers
    payload = b"".join(pattern(200_000))
    status, _, body = client.request("POST", f"http://origin.test:{origin.port}/sha256",
                                     body=payload)
    assert status == 200
    assert json.loads(body) == {"length": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}
    seen = origin.seen[-1]
    assert seen.headers.get("transfer-encoding") == "chunked"  # no length given: chunked
    status, _, body = client.request(
        "POST", f"http://origin.test:{origin.port}/sha256", body=b"abc",
        headers=[("content-length", "3")])
    assert status == 200 and json.loads(body)["length"] == 3
    assert origin.seen[-1].headers["content-length"] == "3"


def test_a_denied_stream_gets_403_and_the_others_go_on(h2_pair, raw_origin):
    origin = raw_origin(echo)
    _, client = h2_pair(f"[acl]\nconnect_ports = {origin.port}\n")
    good = client.connect(f"origin.test:{origin.port}")
    bad = client.connect("origin.test:25")
    assert bad.wait_head() == 403
    assert dict(bad.headers)["proxy-status"].endswith("error=http_request_denied")
    assert bad.read_all() == b"403 Forbidden\n"
    assert good.wait_head() == 200
    good.send(b"still here")
    assert good.recv() == b"still here"


def test_max_streams_is_advertised(h2_pair):
    _, client = h2_pair(max_streams="7")
    assert client.max_concurrent_streams == 7


def _holding(closed: list[bool]):
    """An origin handler that reads until its connection ends, then appends to ``closed``."""
    def hold(sock):
        sock.settimeout(LIMIT)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        closed.append(True)

    return hold


def test_closing_the_connection_closes_every_tunnel(h2_proxy, tls_files, raw_origin):
    closed: list[bool] = []
    origin = raw_origin(_holding(closed))
    client = H2Client(h2_proxy.tls_address, tls_files.ca_file)
    streams = [client.connect(f"origin.test:{origin.port}") for _ in range(5)]
    for stream in streams:
        assert stream.wait_head() == 200
        stream.send(b"x")
    client.sock.close()  # no GOAWAY: the TCP connection just ends
    client.reader.kill()
    assert wait_until(lambda: len(closed) == 5, LIMIT)  # every upstream saw its close
    records = wait_for_records(h2_proxy, 5)
    assert all(r.close_reason == "client" for r in records)


def test_a_stalled_stream_does_not_stall_the_others(h2_pair, raw_origin, stalled):
    """One tunnel's client reads nothing (its window fills up) and another's upstream reads
    nothing (the proxy's window for it fills up): a third still moves megabytes."""

    done = gevent.event.Event()
    deaf_sockets = []

    def deaf(sock):
        deaf_sockets.append(sock)
        done.wait(20)  # reads nothing until the test is over

    flooder, deaf_origin, echoer = raw_origin(_flood), raw_origin(deaf), raw_origin(echo)
    _, client = h2_pair()
    try:
        unread = client.connect(f"origin.test:{flooder.port}")
        unheard = client.connect(f"origin.test:{deaf_origin.port}")
        busy = client.connect(f"origin.test:{echoer.port}")
        for stream in (unread, unheard, busy):
            assert stream.wait_head() == 200
        gevent.spawn(unheard.send, b"z" * (8 * 1024 * 1024), False, 20)
        # Both stalls in place: the unread stream holds the whole window the client gave it,
        # and the proxy's writes to the deaf origin wait on full buffers.
        assert wait_until(lambda: sum(map(len, unread.data)) >= 65535, LIMIT)
        assert wait_until(lambda: deaf_sockets, LIMIT)
        assert wait_until(stalled(deaf_sockets[0]), LIMIT)
        size = 4 * 1024 * 1024
        got = 0
        sender = gevent.spawn(lambda: [busy.send(p) for p in pattern(size, 32 * 1024)])
        with gevent.Timeout(30):
            while got < size:
                got += len(busy.recv())
        sender.join()
        assert got == size
    finally:
        done.set()


def test_admin_close_resets_one_stream(h2_pair, raw_origin):
    origin = raw_origin(echo)
    proxy, client = h2_pair()
    first = client.connect(f"origin.test:{origin.port}")
    second = client.connect(f"origin.test:{origin.port}")
    assert first.wait_head() == 200 and second.wait_head() == 200
    tunnels = proxy.server.tunnels()
    assert len(tunnels) == 2 and all("-" in t["id"] for t in tunnels)
    assert proxy.server.close_connection(tunnels[0]["id"])
    assert wait_until(lambda: first.reset is not None or second.reset is not None, LIMIT)
    survivor = second if first.reset is not None else first
    survivor.send(b"ping")
    assert survivor.recv() == b"ping"
    record = wait_for_records(proxy, 1)[0]
    assert (record.close_reason, record.ctx.conn_id) == ("admin", tunnels[0]["id"])


def test_h2_not_offered_unless_configured(proxy_factory, tls_files):
    import ssl

    proxy = proxy_factory("[geproxy]\nlisten = tls://127.0.0.1:0\n" + tls_files.ini())
    context = ssl.create_default_context(cafile=tls_files.ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(proxy.tls_address, timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"


def test_an_upstream_reset_resets_its_stream_only(h2_proxy, client, raw_origin):
    import struct

    def reset_after_a_byte(sock):
        sock.recv(65536)
        sock.sendall(b"!")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    rude, polite = raw_origin(reset_after_a_byte), raw_origin(echo)
    doomed = client.connect(f"origin.test:{rude.port}")
    fine = client.connect(f"origin.test:{polite.port}")
    assert doomed.wait_head() == 200 and fine.wait_head() == 200
    doomed.send(b"hello")
    assert doomed.recv() == b"!"
    assert wait_until(lambda: doomed.reset is not None, LIMIT)
    assert doomed.reset == h2.errors.ErrorCodes.CONNECT_ERROR
    fine.send(b"ping")
    assert fine.recv() == b"ping"
    record = next(r for r in wait_for_records(h2_proxy, 1) if r.close_reason == "upstream")
    assert record.target == f"origin.test:{rude.port}"


def test_a_refused_upstream_answers_502_on_its_stream(h2_proxy, client):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    stream = client.connect(f"origin.test:{port}")
    assert stream.wait_head() == 502
    assert "error=connection_refused" in dict(stream.headers)["proxy-status"]
    assert stream.read_all() == b"502 Bad Gateway\n"
    status, _, body = client.request("GET", f"http://origin.test:{port}/")
    assert status == 502


def test_an_idle_tunnel_stream_is_closed_at_idle_timeout(h2_pair, raw_origin):
    origin = raw_origin(echo)
    proxy, client = h2_pair(core="idle_timeout = 300ms\n")
    stream = client.connect(f"origin.test:{origin.port}")
    assert stream.wait_head() == 200
    assert wait_until(lambda: stream.reset is not None, LIMIT)
    assert stream.reset == h2.errors.ErrorCodes.CANCEL
    assert wait_for_records(proxy, 1)[0].close_reason == "idle timeout"


def test_the_clients_goaway_closes_its_tunnels(h2_proxy, client, raw_origin):
    """The h2 state machine takes no frame after a GOAWAY, so a client's GOAWAY ends its
    open tunnels (recorded as the client's doing), and nothing is left open."""
    from hyperframe.frame import GoAwayFrame

    origin = raw_origin(echo)
    stream = client.connect(f"origin.test:{origin.port}")
    assert stream.wait_head() == 200
    stream.send(b"ping")
    assert stream.recv() == b"ping"
    # A raw frame: the client's own h2 state would take no frame after it.
    client.send_raw(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    record = wait_for_records(h2_proxy, 1)[0]
    assert record.close_reason == "client"


def test_a_stop_refuses_new_streams_then_cuts_the_rest(h2_proxy, client, raw_origin):
    origin = raw_origin(echo)
    stream = client.connect(f"origin.test:{origin.port}")
    assert stream.wait_head() == 200
    stopper = gevent.spawn(h2_proxy.server.stop, 0.5)
    assert wait_until(lambda: h2_proxy.server.stopping, LIMIT)
    late = client.connect(f"origin.test:{origin.port}")
    assert wait_until(lambda: late.reset is not None or client.error is not None, LIMIT)
    assert late.reset in (h2.errors.ErrorCodes.REFUSED_STREAM, -1)
    stopper.join(timeout=10)
    assert stopper.dead
    record = wait_for_records(h2_proxy, 1)[0]
    assert record.close_reason == "shutdown"


def test_healthz_and_mtls_user_over_h2(h2_pair, tls_files, origin):
    rules = "[acl]\nconnect_ports = 1-65535\nrules =\n    allow user svc-a\n    deny all\n"
    proxy, client = h2_pair(rules, cert=tls_files.client, client_cert="required",
                            client_ca=tls_files.client_ca)
    host, port = proxy.tls_address
    status, _, body = client.request("GET", f"https://{host}:{port}/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, body = client.request("GET", f"http://origin.test:{origin.port}/")
    assert (status, body) == (200, b"hello\n")
    records = wait_for_records(proxy, 2)
    assert records[-1].ctx.user == "svc-a"


def test_credentials_of_one_stream_are_not_anothers(h2_pair, origin, tmp_path):
    """Streams with different Basic credentials on one connection: each is its own."""
    import base64

    from passlib.hash import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{user}:{bcrypt.using(ident='2y', rounds=4).hash('pw')}\n"
                                for user in ("ann", "bob")))
    _, client = h2_pair(f"[auth]\nhtpasswd = {htpasswd}\n"
                        "[acl]\nconnect_ports = 1-65535\nrules =\n    allow user ann\n"
                        "    deny all\n")

    def basic(user):
        return [("proxy-authorization",
                 "Basic " + base64.b64encode(f"{user}:pw".encode()).decode())]

    url = f"http://origin.test:{origin.port}/"
    jobs = [gevent.spawn(client.request, "GET", url, headers=basic(user))
            for user in ("ann", "bob", "ann", "bob")]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [job.value[0] for job in jobs] == [200, 403, 200, 403]
    status, headers, _ = client.request("GET", url)
    assert status == 407 and "proxy-authenticate" in headers


def test_bad_authority_is_a_400_on_its_stream(client):
    stream = client.connect("origin.test")  # no port
    assert stream.wait_head() == 400
    assert "error=http_request_error" in dict(stream.headers)["proxy-status"]
    stream = client.open([(":method", "GET"), (":scheme", "https"),
                          (":authority", "origin.test"), (":path", "/")], end=True)
    assert stream.wait_head() == 400  # https:// is for CONNECT, not forwarded


def test_garbage_after_the_preface_gets_goaway_and_a_close(h2_proxy, tls_files, client,
                                                           raw_origin):
    """A broken connection ends alone: another client's tunnel goes on."""
    import ssl

    origin = raw_origin(echo)
    busy = client.connect(f"origin.test:{origin.port}")
    assert busy.wait_head() == 200
    context = ssl.create_default_context(cafile=tls_files.ca_file)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(h2_proxy.tls_address, timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            # A SETTINGS frame 5 bytes long: settings come in 6-byte entries.
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                         + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5)
            data = b""
            with gevent.Timeout(10):
                while True:
                    try:
                        piece = sock.recv(65536)
                    except (ssl.SSLError, ConnectionError):
                        break
                    if not piece:
                        break
                    data += piece
    frames = []
    while len(data) >= 9:  # frame headers: length (3), type (1), flags, stream id
        length = int.from_bytes(data[:3], "big")
        frames.append(data[3])
        data = data[9 + length:]
    assert 0x7 in frames  # GOAWAY
    busy.send(b"unaffected")
    assert busy.recv() == b"unaffected"


def test_streams_that_end_anywhere_leave_nothing_behind(h2_pair, tls_files, raw_origin,
                                                        origin):
    """Streams reset at random points, tunnels and requests mixed, on three connections,
    one of them cut off: the leak check (every test's) finds nothing left."""
    import random

    echoer = raw_origin(echo)
    proxy, first = h2_pair()
    others = [H2Client(proxy.tls_address, tls_files.ca_file) for _ in range(2)]
    rng = random.Random(5)

    def one(client, point):
        try:
            if rng.random() < 0.3:
                stream = client.open([(":method", "GET"), (":scheme", "http"),
                                      (":authority", f"origin.test:{origin.port}"),
                                      (":path", "/bytes/200000")], end=True)
            else:
                stream = client.connect(f"origin.test:{echoer.port}")
                stream.wait_head()
                stream.send(b"y" * rng.randrange(1, 100_000))
            if point == 0:
                stream.cancel()
                return
            stream.recv()
            if point == 1:
                stream.cancel()
        except (ConnectionError, h2.exceptions.ProtocolError):  # a stream or connection cut
            pass

    jobs = [gevent.spawn(one, rng.choice([first, *others]), rng.randrange(3))
            for _ in range(90)]
    # One connection goes away at a moment of the test's choosing, whatever its streams are
    # doing then: the moment is what is tested, not a wait for anything. (A stream the proxy
    # has not begun to serve when its connection ends is the test below.)
    gevent.sleep(0.2)
    others[1].sock.close()
    others[1].reader.kill()
    gevent.joinall(jobs, timeout=60)
    assert all(job.dead for job in jobs)
    for client in others:
        client.close()
    status, _, body = first.request("GET", f"http://origin.test:{origin.port}/")
    assert (status, body) == (200, b"hello\n")


@pytest.mark.parametrize("relay_mode", ["detached"], indirect=True)  # once: the wait is 2 s
def test_streams_of_a_connection_that_ends_at_once_are_not_left_behind(h2_proxy, tls_files,
                                                                       raw_origin):
    """The client opens CONNECT streams and closes the connection in the same breath: the
    proxy reads the HEADERS and the close in one go. Every stream ends, on record, and every
    upstream connection opened for them is closed."""
    closed: list[bool] = []
    origin = raw_origin(_holding(closed))
    client = H2Client(h2_proxy.tls_address, tls_files.ca_file)
    for _ in range(5):
        client.connect(f"origin.test:{origin.port}")
    client.sock.close()  # no yield since the HEADERS went: the proxy reads them, then the end
    client.reader.kill()
    try:
        # Bounded at 2 s: the proxy ends them at once, or never.
        assert wait_until(lambda: len(h2_proxy.records) == 5, 2), (
            f"{len(h2_proxy.records)} records; left behind: {sorted(h2_proxy.server.active)}")
        assert wait_until(lambda: not h2_proxy.server.active, 2)
        assert wait_until(lambda: len(closed) == origin.accepted, 2)
    finally:  # what it left behind is ended here, for the leak check
        for conn_id in list(h2_proxy.server.active):
            h2_proxy.server.close_connection(conn_id)


def test_streams_over_max_streams_before_the_settings_are_refused_alone(h2_pair, raw_origin):
    """A client may open streams before it has the proxy's SETTINGS (the limit is then
    unknown to it): those over max_streams are refused (REFUSED_STREAM, to retry), the
    others served, and the connection stays."""
    origin = raw_origin(echo)
    proxy, client = h2_pair(max_streams="5")
    client.conn.remote_settings.max_concurrent_streams = 100  # as if no SETTINGS came yet
    streams = [client.connect(f"origin.test:{origin.port}") for _ in range(8)]
    assert wait_until(lambda: all(s.headers is not None or s.reset is not None
                                  for s in streams), LIMIT)
    served = [s for s in streams if s.headers is not None]
    refused = [s for s in streams if s.reset == h2.errors.ErrorCodes.REFUSED_STREAM]
    assert (len(served), len(refused)) == (5, 3)
    for stream in served:
        stream.send(b"ok")
        assert stream.recv() == b"ok"
    assert client.error is None and client.goaway is None


def _connections(proxy):
    """The proxy's HTTP/2 connections, found on the heap (tests only)."""
    import gc

    from geproxy.serve.http2 import H2Connection

    return [obj for obj in gc.get_objects() if isinstance(obj, H2Connection)
            and obj.conn.server is proxy.server and not obj.closed]


def test_a_client_that_reads_nothing_costs_a_bounded_queue(h2_pair, tls_files, raw_origin):
    """It grants huge windows and then reads nothing: the proxy stops reading the upstreams
    (and the client) once OUTGOING_HIGH bytes wait for it; another client is served."""
    from geproxy.serve import http2

    origin, echoer = raw_origin(_flood), raw_origin(echo)
    proxy, greedy = h2_pair()
    greedy.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    greedy.flush()
    streams = [greedy.connect(f"origin.test:{origin.port}") for _ in range(4)]
    for stream in streams:
        assert stream.wait_head() == 200
    greedy.reader.kill()  # from here on it reads nothing at all
    [connection] = [c for c in _connections(proxy) if c.streams]
    assert wait_until(lambda: connection.choked, LIMIT), "the proxy never stopped producing"
    gevent.sleep(0.3)  # the floods go on: nothing more may queue up meanwhile
    assert connection.queued <= http2.OUTGOING_HIGH + 4 * 64 * 1024
    other = H2Client(proxy.tls_address, tls_files.ca_file)
    try:
        stream = other.connect(f"origin.test:{echoer.port}")
        assert stream.wait_head() == 200
        stream.send(b"fine")
        assert stream.recv() == b"fine"
    finally:
        other.close()


def test_rapid_reset_closes_the_connection(h2_pair, raw_origin):
    """Streams opened and reset as fast as the client can (CVE-2023-44487): past
    RESETS_PER_SECOND (plus max_streams) in a second, GOAWAY ENHANCE_YOUR_CALM."""
    origin = raw_origin(echo)
    proxy, client = h2_pair(max_streams="10")
    with gevent.Timeout(20):
        for _ in range(2000):
            if client.goaway is not None or client.error is not None:
                break
            try:
                client.connect(f"origin.test:{origin.port}").cancel()
            except (h2.exceptions.ProtocolError, OSError):
                break
    assert wait_until(lambda: client.goaway is not None or client.error is not None, LIMIT)
    assert client.goaway is not None and client.goaway[0] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_sni_inside_tunnels_is_read_and_enforced_over_h2(h2_pair, tls_files, tls_origin):
    """on_tunnel_data sees a CONNECT stream's first bytes as it sees a tunnel's: the name of
    the ClientHello inside is recorded, and a mismatch with the CONNECT closes the stream."""
    import ssl

    proxy, client = h2_pair("[sni]\nmode = enforce\n")
    context = ssl.create_default_context(cafile=tls_files.ca_file)

    def hello(stream, name):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        session = context.wrap_bio(incoming, outgoing, server_hostname=name)
        try:
            session.do_handshake()
        except ssl.SSLWantReadError:
            pass
        stream.send(outgoing.read())
        return stream.recv()

    good = client.connect(f"origin.test:{tls_origin.port}")
    assert good.wait_head() == 200
    assert hello(good, "origin.test")  # the origin's ServerHello comes back
    bad = client.connect(f"origin.test:{tls_origin.port}")
    assert bad.wait_head() == 200
    with pytest.raises(ConnectionResetError):
        hello(bad, "elsewhere.test")
    records = {r.ctx.conn_id: r for r in wait_for_records(proxy, 1)}
    denied = next(r for r in records.values() if r.rule == "sni_mismatch")
    assert denied.sni == "elsewhere.test" and denied.close_reason == "denied"


def test_a_stream_opened_after_a_reload_is_decided_by_it(h2_pair, raw_origin, tls_files):
    """Each stream is a request: one opened on a connection from before the reload follows
    the new configuration, and (reload_tunnels = recheck) the open streams are judged again."""
    revoked, kept = raw_origin(echo), raw_origin(echo)
    acl = "[acl]\nconnect_ports = 1-65535\nrules =\n"
    proxy, client = h2_pair(acl + "    allow all\n")
    doomed = client.connect(f"origin.test:{revoked.port}")
    spared = client.connect(f"origin.test:{kept.port}")
    assert doomed.wait_head() == 200 and spared.wait_head() == 200
    with open(proxy.server.config.path, "w", encoding="utf-8") as handle:
        handle.write(kit_ini(h2_ini(tls_files, "reload_tunnels = recheck\n") + acl
                             + f"    revoked: deny port {revoked.port}\n    allow all\n"))
    assert proxy.server.reload()
    refused = client.connect(f"origin.test:{revoked.port}")  # the same connection
    assert refused.wait_head() == 403
    with pytest.raises(ConnectionResetError):  # the stream is reset, the others go on
        doomed.recv()
    spared.send(b"still here")
    assert spared.recv() == b"still here"
    record = next(r for r in wait_for_records(proxy, 2) if r.close_reason == "reload")
    assert record.target == f"origin.test:{revoked.port}"


def test_a_request_that_needs_http11_is_reset_with_http_1_1_required(proxy_factory, tls_files,
                                                                     raw_origin):
    """A way to authenticate that holds for a connection (Negotiate) cannot answer a stream:
    its challenge raises HTTP11Required on HTTP/2, the stream is reset HTTP_1_1_REQUIRED and
    the connection's other streams go on; over HTTP/1.1 the same request gets its 407."""
    from geproxy import errors, hookimpl
    from geproxy.testing import StaticResolver, recv_all

    class ConnectionAuth:
        name = "connection_auth"

        @hookimpl
        def auth_challenge(self, ctx, request):
            if ctx.http2:
                raise errors.HTTP11Required("a connection-based challenge")
            return "Negotiate"

        @hookimpl
        def on_request(self, ctx, request):
            if request.host == "private.test":
                raise errors.AuthenticationRequired("no user",
                                                    challenges=ctx.challenges(request))
            return None

    origin = raw_origin(echo)
    proxy = proxy_factory(h2_ini(tls_files) + f"[acl]\nconnect_ports = {origin.port}\n",
                          plugins=[ConnectionAuth()],
                          resolver=StaticResolver({"origin.test": ["127.0.0.1"],
                                                   "private.test": ["127.0.0.1"]}))
    client = H2Client(proxy.tls_address, tls_files.ca_file)
    try:
        good = client.connect(f"origin.test:{origin.port}")
        refused = client.connect(f"private.test:{origin.port}")
        with gevent.Timeout(10):
            while refused.reset is None:
                refused.changed.wait(1)
                refused.changed.clear()
        assert refused.reset == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
        assert refused.headers is None  # no 407 went first
        assert good.wait_head() == 200
        good.send(b"still here")
        assert good.recv() == b"still here"
    finally:
        client.close()
    record = next(r for r in wait_for_records(proxy, 2) if r.target.startswith("private."))
    assert record.close_reason == "http/1.1 required" and record.error is None
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(f"CONNECT private.test:{origin.port} HTTP/1.1\r\n"
                     f"Host: private.test\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        head = recv_all(sock).split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 407 ")
    assert b"\r\nProxy-Authenticate: Negotiate" in head
