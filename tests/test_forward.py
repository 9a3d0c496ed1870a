"""Plain HTTP forwarding end to end: curl, requests and urllib through the proxy."""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.request

import gevent
import gevent.pool
import requests

from geproxy.testing import (
    ResponseReader,
    curl,
    exchange,
    pattern,
    pattern_sha256,
    wait_for_records,
)


def _json(out) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_get_is_forwarded_in_origin_form(proxy, origin):
    echo = _json(curl("-x", proxy.url, origin.url("/echo?a=1", host="origin.test")))
    assert echo["path"] == "/echo" and echo["query"] == "a=1"
    assert echo["headers"]["host"] == f"origin.test:{origin.port}"
    assert echo["headers"]["via"] == "1.1 geproxy"


def test_head(proxy, origin):
    out = curl("-I", "-x", proxy.url, origin.url("/bytes/12345"))
    assert out.returncode == 0, out.stderr
    head = out.stdout.decode()
    assert head.startswith("HTTP/1.1 200 ")
    assert "Content-Length: 12345\r\n" in head  # the length the GET would have
    assert origin.seen[-1].method == "HEAD"


def test_head_then_get_on_one_upstream_connection(proxy, origin):
    out = curl("-x", proxy.url, "-I", origin.url("/bytes/100"), "--next", "-x", proxy.url,
               origin.url("/bytes/100"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(b"".join(pattern(100)))
    assert [seen.method for seen in origin.seen] == ["HEAD", "GET"]
    assert origin.seen[0].remote_port == origin.seen[1].remote_port  # pooled, and sound


def test_post_with_content_length(proxy, origin, tmp_path):
    body = b"".join(pattern(300_000))
    (tmp_path / "body").write_bytes(body)
    answer = _json(curl("-x", proxy.url, "--data-binary", f"@{tmp_path / 'body'}",
                        origin.url("/sha256")))
    assert answer == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert origin.seen[-1].headers["content-length"] == str(len(body))


def test_chunked_upload(proxy, origin, tmp_path):
    body = b"".join(pattern(200_001))
    (tmp_path / "body").write_bytes(body)
    answer = _json(curl("-x", proxy.url, "-H", "Transfer-Encoding: chunked",
                        "--data-binary", f"@{tmp_path / 'body'}", origin.url("/sha256")))
    assert answer == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_put_upload_with_T(proxy, origin, tmp_path):
    body = b"".join(pattern(150_000))
    (tmp_path / "file").write_bytes(body)
    answer = _json(curl("-x", proxy.url, "-T", str(tmp_path / "file"), origin.url("/sha256")))
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert origin.seen[-1].method == "PUT"


def test_upload_from_a_pipe_is_chunked(proxy, origin):
    body = b"".join(pattern(100_000))
    answer = _json(curl("-x", proxy.url, "-T", "-", origin.url("/sha256"), input=body))
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_response_reaches_the_client_whole(proxy, origin):
    out = curl("-x", proxy.url, origin.url("/chunked/500000"))
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == pattern_sha256(500000)


def test_expect_100_continue(proxy, origin, tmp_path):
    body = b"".join(pattern(2_000_000))
    (tmp_path / "body").write_bytes(body)
    out = curl("-x", proxy.url, "-H", "Expect: 100-continue", "--data-binary",
               f"@{tmp_path / 'body'}", "-w", "\n%{http_code}", origin.url("/sha256"))
    data, _, code = out.stdout.rpartition(b"\n")
    assert code == b"200"
    assert json.loads(data)["sha256"] == hashlib.sha256(body).hexdigest()
    assert origin.seen[-1].headers.get("expect") == "100-continue"


def test_expect_answered_with_a_final_status(proxy, raw_origin):
    """The origin refuses before the body: the client gets that answer, no body is sent."""

    def refuse(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\n\r\nnope")
        gevent.sleep(0.5)

    server = raw_origin(refuse)
    request = (f"PUT http://127.0.0.1:{server.port}/ HTTP/1.1\r\nHost: x\r\n"
               "Expect: 100-continue\r\nContent-Length: 10\r\n\r\n").encode()
    answer = exchange(proxy.address, request)  # the body is never sent
    assert answer.startswith(b"HTTP/1.1 417 ")
    assert answer.endswith(b"\r\n\r\nnope")
    assert b"Connection: close" in answer  # the unsent body leaves the framing in doubt


def test_hop_by_hop_fields_are_removed(proxy, origin):
    echo = _json(curl(
        "-x", proxy.url, "-H", "Connection: X-Private, keep-alive", "-H", "X-Private: 1",
        "-H", "Keep-Alive: timeout=5", "-H", "Proxy-Connection: keep-alive",
        "-H", "Proxy-Authorization: Basic Zm9vOmJhcg==", "-H", "TE: trailers",
        "-H", "X-End-To-End: kept", origin.url("/echo")))
    headers = echo["headers"]
    for name in ("x-private", "keep-alive", "proxy-connection", "proxy-authorization", "te"):
        assert name not in headers, name
    assert headers["x-end-to-end"] == "kept"


def test_host_is_rewritten_from_the_target(proxy, origin):
    echo = _json(curl("-x", proxy.url, "-H", "Host: elsewhere.example",
                      origin.url("/echo", host="origin.test")))
    assert echo["headers"]["host"] == f"origin.test:{origin.port}"


def test_response_hop_by_hop_fields_are_removed(proxy, raw_origin):
    def answer(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
                     b"Keep-Alive: timeout=3\r\nX-Kept: 2\r\nContent-Length: 2\r\n\r\nok")

    server = raw_origin(answer)
    out = curl("-i", "-x", proxy.url, f"http://127.0.0.1:{server.port}/")
    head = out.stdout.split(b"\r\n\r\n")[0].decode().lower()
    assert "x-hop" not in head and "keep-alive" not in head
    assert "x-kept: 2" in head and "via: 1.1 geproxy" in head
    assert out.stdout.endswith(b"\r\n\r\nok")


def test_close_delimited_response_is_rechunked_for_http11(proxy, raw_origin):
    def answer(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for piece in pattern(100_000):
            sock.sendall(piece)

    server = raw_origin(answer)
    request = f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    sock = proxy.connect()
    answers = ResponseReader(sock)
    try:
        sock.sendall(request)
        head, body = answers.read()
        assert b"Transfer-Encoding: chunked" in head
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(100_000)
        # The client connection survives: chunked framing told it where the body ended.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        head, body = answers.read()
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"ok\n"
    finally:
        sock.close()


def test_http10_client(proxy, origin):
    answer = exchange(proxy.address,
                      f"GET http://127.0.0.1:{origin.port}/chunked/1000 HTTP/1.0\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(1000)
    assert origin.seen[-1].headers["via"] == "1.0 geproxy"


def test_http10_keep_alive(proxy, origin):
    sock = proxy.connect()
    answers = ResponseReader(sock)
    try:
        for _ in range(2):
            sock.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.0\r\n"
                         "Connection: keep-alive\r\n\r\n".encode())
            head, body = answers.read()
            assert b"Connection: keep-alive" in head and body == b"hello\n"
    finally:
        sock.close()


def test_requests_reuse_connections_both_sides(proxy, origin):
    proxies = {"http": proxy.url}
    with requests.Session() as session:
        session.trust_env = False
        for _ in range(3):
            answer = session.get(origin.url("/"), proxies=proxies, timeout=10)
            assert answer.text == "hello\n"
    # One upstream connection carried all three requests, and one client connection too.
    assert len({seen.remote_port for seen in origin.seen}) == 1
    records = wait_for_records(proxy, 3)
    assert len({record.ctx.conn_id for record in records}) == 1


def test_urllib_through_the_proxy(proxy, origin):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    with opener.open(origin.url("/echo", host="origin.test"), timeout=10) as answer:
        echo = json.loads(answer.read())
    assert echo["headers"]["host"] == f"origin.test:{origin.port}"


def test_200_concurrent_clients(proxy, origin):
    def one(i: int) -> str:
        with requests.Session() as session:
            session.trust_env = False
            return session.get(origin.url(f"/echo?i={i}"), proxies={"http": proxy.url},
                               timeout=30).json()["query"]

    pool = gevent.pool.Pool(200)
    results = pool.map(one, range(200))
    assert results == [f"i={i}" for i in range(200)]


def test_pipelined_requests_are_answered_in_order(proxy, origin):
    request = "GET http://127.0.0.1:{}/echo?n={} HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = proxy.connect()
    answers = ResponseReader(sock)
    try:
        sock.sendall(b"".join(request.format(origin.port, n).encode() for n in range(5)))
        for n in range(5):
            _, body = answers.read()
            assert json.loads(body)["query"] == f"n={n}"
    finally:
        sock.close()


def test_upgrade_switches_to_a_tunnel(proxy, raw_origin):
    def websocket_like(sock: socket.socket) -> None:
        head = server.read_head(sock)
        assert b"upgrade: websocket" in head.lower()
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        while True:
            piece = sock.recv(100)
            if not piece:
                return
            sock.sendall(piece.upper())

    server = raw_origin(websocket_like)
    sock = proxy.connect()
    try:
        sock.sendall(f"GET http://127.0.0.1:{server.port}/ws HTTP/1.1\r\nHost: x\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode())
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1000)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Upgrade: websocket" in head
        sock.sendall(b"frames")
        assert sock.recv(100) == b"FRAMES"
    finally:
        sock.close()


def test_origin_form_is_answered_locally(proxy):
    out = curl("-i", f"{proxy.url}/healthz")
    assert out.stdout.startswith(b"HTTP/1.1 200 ") and out.stdout.endswith(b"ok\n")
    out = curl("-i", f"{proxy.url}/elsewhere")
    assert out.stdout.startswith(b"HTTP/1.1 404 ")


def test_target_on_the_proxy_itself_is_local(proxy):
    out = curl("-i", "-x", proxy.url, f"{proxy.url}/healthz")
    assert out.stdout.startswith(b"HTTP/1.1 200 ") and out.stdout.endswith(b"ok\n")
    assert "via" not in out.stdout.decode().lower()  # answered, not forwarded to itself


def test_connect_to_the_proxy_itself_is_a_loop(proxy):
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{proxy.port} HTTP/1.1\r\n\r\n".encode(),
                      until_close=False)
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"error=proxy_loop_detected" in answer


def test_max_forwards_zero_is_answered_by_the_proxy(proxy, origin):
    out = curl("-i", "-X", "OPTIONS", "-H", "Max-Forwards: 0", "-x", proxy.url, origin.url("/"))
    assert out.stdout.startswith(b"HTTP/1.1 200 ")
    assert origin.seen == []
    echo = _json(curl("-X", "OPTIONS", "-H", "Max-Forwards: 3", "-x", proxy.url,
                      origin.url("/echo")))
    assert echo["headers"]["max-forwards"] == "2"


def test_idle_pooled_connections_expire(proxy_factory, origin):
    proxy = proxy_factory("upstream_idle_timeout = 200ms\n")
    first = curl("-x", proxy.url, origin.url("/"))
    assert first.stdout == b"hello\n"
    assert len(proxy.server.pool) == 1
    for _ in range(300):  # bounded: 3 s at most
        if len(proxy.server.pool) == 0:
            break
        gevent.sleep(0.01)
    assert len(proxy.server.pool) == 0
    second = curl("-x", proxy.url, origin.url("/"))
    assert second.stdout == b"hello\n"
    assert len({seen.remote_port for seen in origin.seen}) == 2  # a new connection


def test_an_upstream_that_closed_while_pooled_is_not_reused(proxy, raw_origin):
    """The origin answers once and closes its side: the next request opens a new one."""

    def answer_once(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")

    server = raw_origin(answer_once)
    url = f"http://127.0.0.1:{server.port}/"
    for _ in range(2):
        out = curl("-x", proxy.url, url)
        assert out.stdout == b"one", out.stderr
    assert server.accepted == 2


def test_requests_https_through_connect(proxy, tls_origin, ca_file):
    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(tls_origin.url("/echo", host="origin.test"),
                             proxies={"https": proxy.url}, verify=ca_file, timeout=10)
    assert answer.status_code == 200 and answer.json()["path"] == "/echo"


def test_a_request_that_went_through_this_proxy_is_a_loop(proxy, origin):
    for data in (f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n"
                 "Via: 1.1 upstream-cache, 1.1 GEPROXY\r\n\r\n",
                 f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nVia: 1.0 geproxy\r\n\r\n"):
        answer = exchange(proxy.address, data.encode(), until_close=False)
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert b"error=proxy_loop_detected" in answer
    assert origin.seen == []
    # Another proxy's name, or a comment that merely mentions ours, is no loop.
    echo = _json(curl("-x", proxy.url, "-H", "Via: 1.1 other (geproxy)", origin.url("/echo")))
    vias = [v.strip() for v in echo["headers"]["via"].split(",")]
    assert vias == ["1.1 other (geproxy)", "1.1 geproxy"]


def test_forwarded_for_off_on_delete(proxy_factory, origin):
    client_headers = ("-H", "X-Forwarded-For: 10.9.8.7", "-H", "Forwarded: for=10.9.8.7")
    seen = {}
    for mode in ("off", "on", "delete"):
        proxy = proxy_factory(f"forwarded_for = {mode}\n")
        seen[mode] = _json(curl("-x", proxy.url, *client_headers, origin.url("/echo")))["headers"]
    assert seen["off"]["x-forwarded-for"] == "10.9.8.7"  # passed on, nothing added
    assert seen["off"]["forwarded"] == "for=10.9.8.7"
    assert seen["on"]["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
    assert seen["on"]["forwarded"] == "for=10.9.8.7, for=127.0.0.1"
    assert "x-forwarded-for" not in seen["delete"] and "forwarded" not in seen["delete"]


# -- the keep-alive waits on the connection's reused timer (sockets.IdleWait) ---------------

def _ask(answers: ResponseReader, port: int) -> bytes:
    """One GET on a kept connection; its whole answer."""
    answers.sock.sendall(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"
                         "\r\n\r\n".encode())
    head, body = answers.read()
    return head + b"\r\n\r\n" + body


def test_a_kept_connection_lives_past_idle_timeout_while_used(proxy_factory, origin):
    """A request every 0.4 s for 2 s with idle_timeout 1 s: each wait re-arms the one timer,
    so none is cut, though the connection as a whole outlives idle_timeout twice over."""
    proxy = proxy_factory("idle_timeout = 1s\n")
    with socket.create_connection(proxy.address, timeout=10) as sock:
        answers = ResponseReader(sock)
        for _ in range(5):
            answer = _ask(answers, origin.port)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello\n")
            gevent.sleep(0.4)
    records = wait_for_records(proxy, 5)
    assert [record.status for record in records] == [200] * 5
    assert len({seen.remote_port for seen in origin.seen}) == 1  # one upstream connection


def test_a_kept_connection_idle_past_idle_timeout_is_closed(proxy_factory, origin):
    """After its answer the client says nothing: the proxy closes at idle_timeout (the wait for
    the next request is on the reused timer), and serves the next client."""
    proxy = proxy_factory("idle_timeout = 300ms\n")
    with socket.create_connection(proxy.address, timeout=10) as sock:
        assert _ask(ResponseReader(sock), origin.port).endswith(b"hello\n")
        sock.settimeout(10)  # far past idle_timeout: the proxy's close ends this read
        assert sock.recv(1) == b""
    assert curl("-x", proxy.url, origin.url("/")).stdout == b"hello\n"
    assert proxy.server.active == {}


def test_an_upstream_silent_on_a_later_request_gets_504(proxy_factory, raw_origin):
    """The first answer comes; the second never does: 504 at idle_timeout, from the same
    reused timer that bounded the first wait, and the client connection goes on."""
    answered = []

    def once_then_silent(sock: socket.socket) -> None:
        while server.read_head(sock):
            if answered:
                gevent.sleep(3)  # three times the proxy's idle_timeout
                return
            answered.append(True)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")

    server = raw_origin(once_then_silent)
    proxy = proxy_factory("idle_timeout = 1s\n")
    with socket.create_connection(proxy.address, timeout=10) as sock:
        answers = ResponseReader(sock)
        assert _ask(answers, server.port).endswith(b"hello\n")
        second = _ask(answers, server.port)
        assert second.startswith(b"HTTP/1.1 504 "), second
        assert b"error=http_response_timeout" in second
    statuses = [record.status for record in wait_for_records(proxy, 2)]
    assert statuses == [200, 504]


def test_a_cut_http2_preface_is_answered_at_once(proxy_factory):
    """"PRI * HTTP/2.0" and nothing more (a prior-knowledge HTTP/2 client on a plain
    listener, its preface cut): a 400 for its version when that line ends, not the 408 that
    header_timeout would give the head it never finishes."""
    proxy = proxy_factory("header_timeout = 1s\n")
    answer = exchange(proxy.address, b"PRI * HTTP/2.0\r\n", timeout=10)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Connection: close" in answer
    record, = wait_for_records(proxy, 1)
    assert (record.status, record.error) == (400, "http_request_error")
    assert record.close_reason != "header timeout"
