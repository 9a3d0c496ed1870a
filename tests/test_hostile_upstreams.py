"""Hostile or failing upstreams: origins, nameservers and parent proxies that misbehave in exact
ways, over real sockets.

Every case checks three things:

- what the client gets: while nothing of the response went out, a clean answer of the proxy's
  own (502 with the Proxy-Status error of docs/configuration.md, 504 for timeouts); once
  something did, a connection closed by the proxy after a response that is visibly cut (fewer
  bytes than its Content-Length, no last chunk), never one that looks complete;
- that the upstream connection was not pooled: the origin sees the proxy close it, the pool is
  empty, and the next request goes on a new upstream connection;
- that nothing else is disturbed: a request pipelined behind the bad one on the same client
  connection is never served when the framing of the stream is in doubt (and is, on a new
  upstream connection, when it is not), and a new client's request works.

The proxy's own bounds are 1 s (connect_timeout, idle_timeout), so a timeout case takes about
a second; every wait of the tests themselves is bounded by LIMIT.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import gevent
import gevent.event
import gevent.server
import h2.errors
import pytest

from geproxy.testing import (
    Proxy,
    RawOrigin,
    StaticResolver,
    curl,
    open_tunnel,
    recv_all,
    wait_for_records,
    wait_until,
)
from geproxy.testing.protocols import H2RequestClient, ProxyClient

INI = "connect_timeout = 1s\nidle_timeout = 1s\nmax_header_size = 4KiB\n"
#: For the cases run again over TLS and HTTP/2: the same, with the timeouts they wait for
#: halved.
QUICK = INI.replace("idle_timeout = 1s", "idle_timeout = 500ms")
GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood"
#: The bound on every wait of the tests themselves, in seconds.
LIMIT = 10
#: How long a slow upstream keeps going: three times the proxy's bound.
OUTLAST = 3
REASONS = {502: "Bad Gateway", 504: "Gateway Timeout"}


# -- scripted upstreams ---------------------------------------------------------------------

#: Script steps: bytes are sent; an Event is waited for (bounded); a callable gets the socket.
Step = Union[bytes, gevent.event.Event, Callable[[socket.socket], Any]]


def FIN(sock: socket.socket) -> None:
    """Half-close: the proxy reads EOF (the socket stays open to see the proxy close it)."""
    sock.shutdown(socket.SHUT_WR)


def RESET(sock: socket.socket) -> str:
    """End with a reset (RST) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return "reset"


def _slowly(first: bytes, then: bytes, every: float) -> Callable[[socket.socket], Any]:
    """Send ``first``, then ``then`` every ``every`` seconds for as long as the proxy takes
    them; a proxy that is still reading after OUTLAST seconds gets a reset, which fails a
    test that expects the proxy to give up first."""

    def run(sock: socket.socket) -> Any:
        try:
            sock.sendall(first)
            for _ in range(int(OUTLAST / every)):
                gevent.sleep(every)
                sock.sendall(then)
        except OSError:
            return None  # the proxy closed: what the test waits for
        return RESET(sock)

    return run


def trickle(start: bytes) -> Callable[[socket.socket], Any]:
    """A head that never ends: ``start``, then one byte of a field value every 100 ms."""
    return _slowly(start, b"a", 0.1)


def storm() -> Callable[[socket.socket], Any]:
    """Interim 100 Continue answers, one every 50 ms, never a final one."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    return _slowly(interim, interim, 0.05)


def _until_closed(sock: socket.socket, limit: float = LIMIT) -> bool:
    """Wait (bounded) for the peer to close ``sock``, dropping what it sends; True if it did."""
    with gevent.Timeout(limit, False):
        while True:
            try:
                if not sock.recv(65536):
                    return True
            except OSError:
                return True
    return False


class Scripted:
    """A raw origin (or parent) that answers ``/good`` with GOOD and keeps the connection for
    the next request, and anything else with ``steps``. After the steps the connection is
    held until the proxy closes it (or reset, if a step said so), unless ``serve_on``;
    ``closed_by_proxy`` lists the connections the proxy closed, ``seen`` every request as
    (connection number, target)."""

    def __init__(self, raw_origin: Callable[..., RawOrigin], *steps: Step,
                 serve_on: bool = False) -> None:
        self.steps = steps
        #: After the steps, serve the next requests on the connection instead of holding it.
        self.serve_on = serve_on
        self.seen: list[tuple[int, str]] = []
        self.closed_by_proxy: set[int] = set()
        self.server = raw_origin(self._handle)

    @property
    def port(self) -> int:
        return self.server.port

    def bad_connections(self) -> set[int]:
        return {number for number, target in self.seen if target != "/good"}

    def _handle(self, sock: socket.socket) -> None:
        number = self.server.accepted
        while True:
            head = self.server.read_head(sock, limit=LIMIT)
            if b"\r\n\r\n" not in head:
                return
            target = head.split(b" ", 2)[1].decode()
            self.seen.append((number, target))
            if target != "/good":
                if not self.serve_on:
                    break
                self._run(sock)
            else:
                sock.sendall(GOOD)
        if self._run(sock) != "reset" and _until_closed(sock):
            self.closed_by_proxy.add(number)

    def _run(self, sock: socket.socket) -> Any:
        ending = None
        for step in self.steps:
            if isinstance(step, bytes):
                sock.sendall(step)
            elif isinstance(step, gevent.event.Event):
                assert step.wait(LIMIT), "the test never released the script"
            else:
                ending = step(sock)
        return ending


# -- a client that reads answers one at a time ----------------------------------------------


@dataclass
class Answer:
    status: int  # 0: the connection closed before a complete head
    head: bytes
    body: bytes
    #: The body ended where its framing says, not at a close.
    complete: bool

    def field(self, name: str) -> Optional[str]:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.encode():
                return value.strip().decode("latin-1")
        return None


class Client:
    """One client connection to a proxy."""

    def __init__(self, proxy: Proxy) -> None:
        self.sock = proxy.connect()
        self.sock.settimeout(LIMIT)
        self.data = b""  # received and not read as an answer yet
        self.eof = False

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(b"".join(requests))

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            piece = self.sock.recv(65536)
        except ConnectionResetError:
            piece = b""
        if not piece:
            self.eof = True
            return False
        self.data += piece
        return True

    def wait_for(self, marker: bytes) -> None:
        while marker not in self.data:
            assert self._fill(), f"closed before {marker!r} came: {self.data!r}"

    def answer(self, method: str = "GET") -> Answer:
        while b"\r\n\r\n" not in self.data:
            if not self._fill():
                data, self.data = self.data, b""
                return Answer(0, data, b"", False)
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        answer = Answer(status, head, b"", True)
        if method == "HEAD" or status < 200 or status in (204, 304) or (
                method == "CONNECT" and status == 200):
            return answer
        if answer.field("transfer-encoding") == "chunked":
            answer.body, answer.complete = self._chunked()
        elif answer.field("content-length") is not None:
            length = int(answer.field("content-length") or "")
            while len(self.data) < length and self._fill():
                pass
            answer.body, self.data = self.data[:length], self.data[length:]
            answer.complete = len(answer.body) == length
        else:  # close-delimited: the proxy never sends one to an HTTP/1.1 client
            while self._fill():
                pass
            answer.body, self.data, answer.complete = self.data, b"", False
        return answer

    def _chunked(self) -> tuple[bytes, bool]:
        body = b""
        while True:
            while b"\r\n" not in self.data:
                if not self._fill():
                    return body, False
            line, _, self.data = self.data.partition(b"\r\n")
            size = int(line, 16)
            while len(self.data) < size + 2:
                if not self._fill():
                    body, self.data = body + self.data[:size], b""
                    return body, False
            body += self.data[:size]
            assert self.data[size:size + 2] == b"\r\n", self.data
            self.data = self.data[size + 2:]
            if size == 0:
                return body, True

    def closed(self) -> bool:
        """Whether the proxy closes the connection with nothing more said (a silent, open
        connection fails the test at LIMIT)."""
        while self._fill():
            pass
        return self.data == b""


@pytest.fixture
def proxy(raw_origin: Callable[..., RawOrigin], proxy_factory: Callable[..., Proxy]) -> Proxy:
    """A proxy with 1 s bounds. raw_origin comes first, so its servers stop after the proxy:
    the pooled connections the proxy closes at its stop end their handlers."""
    return proxy_factory(INI)


@pytest.fixture
def client() -> Iterator[Callable[[Proxy], Client]]:
    opened: list[Client] = []

    def connect(proxy: Proxy) -> Client:
        opened.append(Client(proxy))
        return opened[-1]

    yield connect
    for one in opened:
        one.sock.close()


def _get(port: int, path: str, method: str = "GET", host: str = "127.0.0.1",
         fields: str = "") -> bytes:
    return (f"{method} http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"{fields}\r\n").encode()


def _poll(check: Callable[[], bool], what: str) -> None:
    assert wait_until(check, LIMIT), f"not within {LIMIT}s: {what}"


def _is_error(answer: Answer, status: int, error: str, rcode: Optional[str] = None) -> None:
    """A clean answer of the proxy's own: the status, its Proxy-Status error, a short body."""
    assert answer.status == status, answer
    expected = f"geproxy; error={error}" + (f'; rcode="{rcode}"' if rcode else "")
    assert answer.field("proxy-status") == expected, answer
    assert answer.body == f"{status} {REASONS[status]}\n".encode() and answer.complete


def _not_reused(proxy: Proxy, upstream: Scripted, connect: Callable[[Proxy], Client],
                records: int, reset: bool = False, pooled: int = 0) -> None:
    """Once ``records`` requests are done: the bad answer's upstream connection is not pooled
    (the proxy closed it, unless the upstream reset it; ``pooled`` good ones are), and a new
    client's request works on another upstream connection, pooled after it."""

    def good() -> tuple[int, bytes, bool]:
        fresh = connect(proxy)
        fresh.send(_get(upstream.port, "/good"))
        answer = fresh.answer()
        return answer.status, answer.body, answer.complete

    _not_reused_by(proxy, upstream, good, records, reset, pooled)


def _not_reused_by(proxy: Proxy, upstream: Scripted, good: Callable[[], tuple[int, bytes, bool]],
                   records: int, reset: bool = False, pooled: int = 0) -> None:
    """``_not_reused``, the good request made by ``good()`` (its status, body, whether
    complete)."""
    wait_for_records(proxy, records)
    bad = upstream.bad_connections()
    assert bad
    if not reset:
        _poll(lambda: bad <= upstream.closed_by_proxy, "the proxy closes the bad connection")
    assert len(proxy.server.pool) == pooled
    assert good() == (200, b"good", True)
    assert upstream.seen[-1][1] == "/good" and upstream.seen[-1][0] not in bad
    _poll(lambda: len(proxy.server.pool) == 1, "the good connection is pooled")


# -- nothing of the response went out: a clean 502 or 504 ------------------------------------

OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
HTTP10_CHUNKED = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"

NOTHING_SENT: dict[str, tuple[tuple[Step, ...], int, str]] = {
    # framing the proxy must refuse rather than guess
    "CL and TE": ((OK_HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"0\r\n\r\n",), 502, "http_response_incomplete"),
    "two different Content-Lengths": ((OK_HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n"
                                       b"\r\nabcd",), 502, "http_response_incomplete"),
    "Content-Length list": ((OK_HEAD + b"Content-Length: 3, 3\r\n\r\nabc",),
                            502, "http_response_incomplete"),
    "negative Content-Length": ((OK_HEAD + b"Content-Length: -1\r\n\r\nabc",),
                                502, "http_response_incomplete"),
    "Content-Length overflow": ((OK_HEAD + b"Content-Length: 184467440737095516160\r\n\r\n",),
                                502, "http_response_incomplete"),
    "Transfer-Encoding gzip": ((OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\nabc",),
                               502, "http_response_incomplete"),
    "chunked in an HTTP/1.0 response": ((HTTP10_CHUNKED,), 502, "http_response_incomplete"),
    "bad chunk size": ((CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n",), 502, "http_response_incomplete"),
    "chunk size overflow": ((CHUNKED + b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n",),
                            502, "http_response_incomplete"),
    "no CRLF after chunk data": ((CHUNKED + b"5\r\nhelloXY0\r\n\r\n",),
                                 502, "http_response_incomplete"),
    # heads
    "head over max_header_size": ((OK_HEAD + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 90)
                                                      for i in range(60)) + b"\r\n",),
                                  502, "http_response_incomplete"),
    "one field over max_header_size": ((OK_HEAD + b"X-Big: " + b"v" * 5000 + b"\r\n\r\n",),
                                       502, "http_response_incomplete"),
    "bare LF line ends": ((b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",),
                          502, "http_response_incomplete"),
    "bare LF in a field": ((OK_HEAD + b"X-A: 1\nContent-Length: 2\r\n\r\nok",),
                           502, "http_response_incomplete"),
    "bare CR in a field": ((OK_HEAD + b"X-A: 1\rX-B: 2\r\nContent-Length: 2\r\n\r\nok",),
                           502, "http_response_incomplete"),
    "obs-fold": ((OK_HEAD + b"X-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok",),
                 502, "http_response_incomplete"),
    "NUL in a value": ((OK_HEAD + b"X-A: 1\x002\r\nContent-Length: 2\r\n\r\nok",),
                       502, "http_response_incomplete"),
    "space before a colon": ((OK_HEAD + b"Content-Length : 2\r\n\r\nok",),
                             502, "http_response_incomplete"),
    "status not a number": ((b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",),
                            502, "http_response_incomplete"),
    "status of four digits": ((b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",),
                              502, "http_response_incomplete"),
    "status under 100": ((b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok",),
                         502, "http_response_incomplete"),
    "HTTP/2.0 status line": ((b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",),
                             502, "http_response_incomplete"),
    "not HTTP (ICY)": ((b"ICY 200 OK\r\n\r\nok",), 502, "http_response_incomplete"),
    "HTTP/0.9 answer without a head": ((b"<html>hello</html>\n", FIN),
                                       502, "http_response_incomplete"),
    "101 to a request without Upgrade": ((SWITCHING,), 502, "http_response_incomplete"),
    # cut before the head was whole (RFC 9209: connection_terminated while nothing came)
    "closed without a byte": ((FIN,), 502, "connection_terminated"),
    "reset without a byte": ((RESET,), 502, "connection_terminated"),
    "closed mid-head": ((OK_HEAD + b"Content-Le", FIN), 502, "http_response_incomplete"),
    "reset mid-head": ((OK_HEAD + b"Content-Le", RESET), 502, "http_response_incomplete"),
    # too slow
    "no answer": ((), 504, "http_response_timeout"),
    "a head trickled byte by byte": ((trickle(OK_HEAD + b"X-Slow: "),),
                                     504, "http_response_timeout"),
}


@pytest.mark.parametrize("case", list(NOTHING_SENT))
def test_nothing_sent_yet_is_a_clean_error_and_closes(proxy, raw_origin, client, case):
    steps, status, error = NOTHING_SENT[case]
    upstream = Scripted(raw_origin, *steps)
    first = client(proxy)
    # A request pipelined behind the bad one: the framing is in doubt, it is never served.
    first.send(_get(upstream.port, "/bad"), _get(upstream.port, "/good"))
    answer = first.answer()
    _is_error(answer, status, error)
    assert answer.field("connection") == "close" and first.closed()
    assert wait_for_records(proxy, 1)[0].error == error
    _not_reused(proxy, upstream, client, 1, reset=RESET in steps)
    assert [target for _, target in upstream.seen] == ["/bad", "/good"]


# -- part of the response went out: the client sees a cut -------------------------------------

PART = b"0123456789"
CL_HEAD = OK_HEAD + b"Content-Length: 100\r\n\r\n"
FIRST_CHUNK = CHUNKED + b"a\r\n" + PART + b"\r\n"
#: In a MID_BODY script: wait until the client received PART.
GATE = gevent.event.Event()

MID_BODY: dict[str, tuple[tuple[Step, ...], str]] = {
    "Content-Length, FIN": ((CL_HEAD + PART, GATE, FIN), "http_response_incomplete"),
    "Content-Length, reset": ((CL_HEAD + PART, GATE, RESET), "http_response_incomplete"),
    "Content-Length, stall": ((CL_HEAD + PART, GATE), "http_response_timeout"),
    "chunked, FIN between chunks": ((FIRST_CHUNK, GATE, FIN), "http_response_incomplete"),
    "chunked, FIN inside a chunk": ((FIRST_CHUNK, GATE, b"10\r\nabc", FIN),
                                    "http_response_incomplete"),
    "chunked, reset": ((FIRST_CHUNK, GATE, RESET), "http_response_incomplete"),
    "chunked, stall": ((FIRST_CHUNK, GATE), "http_response_timeout"),
    "chunked, bad chunk size": ((FIRST_CHUNK, GATE, b"zz\r\n"), "http_response_incomplete"),
    "chunked, chunk size overflow": ((FIRST_CHUNK, GATE, b"f" * 17 + b"\r\n"),
                                     "http_response_incomplete"),
    "chunked, no CRLF after chunk data": ((FIRST_CHUNK, GATE, b"5\r\nhelloXY"),
                                          "http_response_incomplete"),
    "chunked, malformed trailer": ((FIRST_CHUNK, GATE, b"0\r\nno colon\r\n\r\n"),
                                   "http_response_incomplete"),
    "close-delimited, reset": ((OK_HEAD + b"Connection: close\r\n\r\n" + PART, GATE, RESET),
                               "http_response_incomplete"),
}


@pytest.mark.parametrize("case", list(MID_BODY))
def test_a_response_cut_mid_body_closes_the_client(proxy, raw_origin, client, case):
    steps, error = MID_BODY[case]
    received = gevent.event.Event()
    upstream = Scripted(raw_origin, *[received if step is GATE else step for step in steps])
    first = client(proxy)
    first.send(_get(upstream.port, "/bad"), _get(upstream.port, "/good"))
    first.wait_for(PART)  # the head went out: only the close can tell the client now
    received.set()
    answer = first.answer()
    assert answer.status == 200 and answer.body.startswith(PART), answer
    assert not answer.complete, "a cut response must not look complete"
    assert first.closed()
    assert wait_for_records(proxy, 1)[0].error == error
    _not_reused(proxy, upstream, client, 1, reset=RESET in steps)
    assert [target for _, target in upstream.seen] == ["/bad", "/good"]


@pytest.mark.parametrize("case", ["Content-Length, FIN", "chunked, FIN between chunks",
                                  "chunked, bad chunk size", "close-delimited, reset"])
def test_a_cut_an_http10_client_can_tell(proxy, raw_origin, case):
    """An HTTP/1.0 client gets no chunked framing: when the upstream's body had none either,
    its answer ends at the close, and a cut must not look like that end. It ends with a reset
    instead (a Content-Length still shows the cut by itself)."""
    steps, _ = MID_BODY[case]
    received = gevent.event.Event()
    upstream = Scripted(raw_origin, *[received if step is GATE else step for step in steps])
    sock = proxy.connect()
    try:
        sock.sendall(f"GET http://127.0.0.1:{upstream.port}/bad HTTP/1.0\r\n\r\n".encode())
        data, reset = b"", False
        sock.settimeout(LIMIT)
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not piece:
                break
            data += piece
            if PART in data:
                received.set()
    finally:
        sock.close()
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding" not in head
    if case.startswith("Content-Length"):
        assert b"Content-Length: 100" in head and data.endswith(b"\r\n\r\n" + PART)
    else:
        assert reset, "the close after a cut must not look like the end of the body"
    assert wait_for_records(proxy, 1)[0].error is not None


# -- the same over TLS and HTTP/2 ---------------------------------------------------------------

#: The cases above that run again over HTTP/1.1 on a TLS listener: one of each kind (its
#: answers are the plain listener's, byte for byte). HTTP/2 runs every case: its answers are
#: HEADERS and DATA, and a cut is a RST_STREAM on a connection that goes on.
TLS_NOTHING_SENT = ("CL and TE", "closed without a byte", "reset mid-head", "no answer")
TLS_MID_BODY = ("Content-Length, FIN", "chunked, bad chunk size", "close-delimited, reset")
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR


def _over_tls_and_h2(table: dict[str, Any], tls_cases: tuple[str, ...]) -> Any:
    """Parametrizes ``client_protocol`` (indirectly) and ``case``."""
    return pytest.mark.parametrize("client_protocol, case", [
        *(pytest.param("http1-tls", case, id=f"http1-tls-{case}") for case in tls_cases),
        *(pytest.param("h2", case, id=f"h2-{case}") for case in table)],
        indirect=["client_protocol"])


def _good_by(client: ProxyClient, port: int) -> tuple[int, bytes, bool]:
    reply = client.request("GET", f"http://127.0.0.1:{port}/good", timeout=LIMIT)
    return reply.status, reply.body, reply.complete


def _h2_still_open(client: ProxyClient, error: str) -> bool:
    """An HTTP/2 connection goes on after an error on one of its streams: whether the test
    may use it again. After one that took idle_timeout it may end at any moment, with a
    GOAWAY NO_ERROR (a defect of today's: test_forward.py,
    test_a_connection_is_kept_for_idle_timeout_after_its_last_answer): not again, then."""
    assert isinstance(client, H2RequestClient)
    goaway = client.h2.goaway
    if error == "http_response_timeout":
        assert goaway is None or goaway[0] == NO_ERROR
        return False
    assert goaway is None and client.h2.error is None
    return True


@_over_tls_and_h2(NOTHING_SENT, TLS_NOTHING_SENT)
def test_nothing_sent_yet_over_tls_and_h2(protocol_pair, proxy_client, raw_origin,
                                           client_protocol, case):
    steps, status, error = NOTHING_SENT[case]
    upstream = Scripted(raw_origin, *steps)
    proxy, client = protocol_pair(QUICK)
    reply = client.request("GET", f"http://127.0.0.1:{upstream.port}/bad", timeout=LIMIT)
    assert reply.status == status, reply
    assert reply.field("proxy-status") == f"geproxy; error={error}", reply
    assert reply.body == f"{status} {REASONS[status]}\n".encode() and reply.complete
    if client_protocol == "h2":  # the stream ends cleanly
        assert reply.reset is None and reply.field("connection") is None
        _h2_still_open(client, error)
    else:
        assert reply.field("connection") == "close" and reply.closed
    assert wait_for_records(proxy, 1)[0].error == error
    _not_reused_by(proxy, upstream, lambda: _good_by(proxy_client(proxy), upstream.port), 1,
                   reset=RESET in steps)


@_over_tls_and_h2(MID_BODY, TLS_MID_BODY)
def test_a_response_cut_mid_body_over_tls_and_h2(protocol_pair, proxy_client, raw_origin,
                                                client_protocol, case):
    """HTTP/1.1 closes the connection; HTTP/2 resets the stream (INTERNAL_ERROR), and its
    connection goes on: the next request on it is served, on a new upstream connection."""
    steps, error = MID_BODY[case]
    received = gevent.event.Event()
    upstream = Scripted(raw_origin, *[received if step is GATE else step for step in steps])
    proxy, client = protocol_pair(QUICK)
    pending = client.begin("GET", f"http://127.0.0.1:{upstream.port}/bad", timeout=LIMIT)
    pending.wait_for(PART)  # the head went out: only the end can tell the client now
    received.set()
    reply = pending.reply(LIMIT)
    assert reply.status == 200 and reply.body.startswith(PART), reply
    assert not reply.complete, "a cut response must not look complete"
    assert wait_for_records(proxy, 1)[0].error == error
    if client_protocol == "h2":
        assert reply.reset == INTERNAL_ERROR, reply
        if _h2_still_open(client, error):  # the next stream on the same connection
            _not_reused_by(proxy, upstream, lambda: _good_by(client, upstream.port), 1,
                           reset=RESET in steps)
            return
    else:
        assert reply.closed
    _not_reused_by(proxy, upstream, lambda: _good_by(proxy_client(proxy), upstream.port), 1,
                   reset=RESET in steps)


@pytest.mark.parametrize("client_protocol", ["h2"], indirect=True)
@pytest.mark.parametrize("case", ["endless storm", "interim answer with a body"])
def test_interim_answers_that_never_end_well_over_h2(protocol_pair, proxy_client, raw_origin,
                                                     case):
    """A final answer that never comes, or cannot be framed, after interim ones: a stream
    that got interim answers is reset (as an HTTP/1.1 client's connection is closed); one
    that got none (today's HTTP/2, which relays none: test_forward.py,
    test_interim_answers_are_relayed) gets the proxy's clean error."""
    if case == "endless storm":
        steps: tuple[Step, ...] = (storm(),)
        status, error = 504, "http_response_timeout"
    else:
        steps = (b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello" + GOOD,)
        status, error = 502, "http_response_incomplete"
    upstream = Scripted(raw_origin, *steps)
    proxy, client = protocol_pair(QUICK)
    reply = client.request("GET", f"http://127.0.0.1:{upstream.port}/bad", timeout=LIMIT)
    if reply.interim:
        assert (reply.status, reply.reset) == (0, INTERNAL_ERROR), reply
    else:
        assert reply.status == status, reply
        assert reply.field("proxy-status") == f"geproxy; error={error}"
    assert wait_for_records(proxy, 1)[0].error == error
    _not_reused_by(proxy, upstream, lambda: _good_by(proxy_client(proxy), upstream.port), 1)


# -- a pooled connection that fails on its next request ----------------------------------------


@pytest.mark.parametrize("method, failure, expected", [
    ("GET", FIN, 200),  # the usual keep-alive race: retried on a new connection
    ("POST", FIN, 502),  # its body was sent on the pooled one: it cannot go again
    ("GET", OK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok", 502),
], ids=["closes, no body", "closes, a body", "bad framing"])
def test_a_pooled_connection_failing_on_its_next_request(protocol_pair, raw_origin,
                                                        client_protocol, method, failure,
                                                        expected):
    """Each upstream connection answers its first request and fails on its second one. A
    502 closes an HTTP/1.1 client's connection (the body, sent or not, leaves its stream in
    doubt); an HTTP/2 stream just ends."""
    requests: list[tuple[int, str]] = []
    closed: list[int] = []

    def handler(sock: socket.socket) -> None:
        number = server.accepted
        for index in range(2):
            head = server.read_head(sock, limit=LIMIT)
            if b"\r\n\r\n" not in head:
                return
            requests.append((number, head.split(b" ", 2)[1].decode()))
            if index == 0:
                sock.sendall(GOOD)
        if isinstance(failure, bytes):
            sock.sendall(failure)
        else:
            failure(sock)
        if _until_closed(sock):
            closed.append(number)

    server = raw_origin(handler)
    proxy, first = protocol_pair(INI)
    url = f"http://127.0.0.1:{server.port}"
    assert first.request("GET", url + "/one", timeout=LIMIT).body == b"good"
    _poll(lambda: len(proxy.server.pool) == 1, "the connection is pooled")
    body = b"hello" if method == "POST" else b""
    answer = first.request(method, url + "/two", body=body, timeout=LIMIT)
    if expected == 200:
        assert (answer.status, answer.body) == (200, b"good"), answer
        assert requests == [(1, "/one"), (1, "/two"), (2, "/two")]
    else:
        error = "connection_terminated" if failure is FIN else "http_response_incomplete"
        assert answer.status == 502 and answer.field("proxy-status") == f"geproxy; error={error}"
        if client_protocol == "h2":
            assert answer.complete and not answer.closed
        else:
            assert answer.field("connection") == "close" and answer.closed
        assert requests == [(1, "/one"), (1, "/two")]
    _poll(lambda: closed == [1], "the proxy closes the failed connection")
    assert len(proxy.server.pool) == (1 if expected == 200 else 0)


# -- interim answers ----------------------------------------------------------------------------


def test_a_storm_of_interim_answers_then_a_final_one(protocol_pair, raw_origin,
                                                     client_protocol):
    upstream = Scripted(raw_origin, b"HTTP/1.1 100 Continue\r\n\r\n" * 300 + GOOD,
                        serve_on=True)
    proxy, first = protocol_pair(INI)
    answer = first.request("GET", f"http://127.0.0.1:{upstream.port}/bad", timeout=LIMIT)
    assert (answer.status, answer.body, answer.complete) == (200, b"good", True), answer
    if client_protocol != "h2":  # HTTP/2: test_forward.py, test_interim_answers_are_relayed
        assert [status for status, _ in answer.interim] == [100] * 300
    # The framing ended cleanly: the connection is pooled, and the client may go on.
    _poll(lambda: len(proxy.server.pool) == 1, "the upstream connection is pooled")
    assert first.request("GET", f"http://127.0.0.1:{upstream.port}/good").body == b"good"
    assert len({number for number, _ in upstream.seen}) == 1


@pytest.mark.parametrize("case", ["endless storm", "interim answer with a body"])
def test_interim_answers_that_never_end_well(proxy, raw_origin, client, case):
    """Interim answers went out already: a final answer that never comes (past idle_timeout)
    or cannot be framed ends with the close."""
    if case == "endless storm":
        steps: tuple[Step, ...] = (storm(),)
        error = "http_response_timeout"
    else:
        steps = (b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello" + GOOD,)
        error = "http_response_incomplete"
    upstream = Scripted(raw_origin, *steps)
    first = client(proxy)
    first.send(_get(upstream.port, "/bad"), _get(upstream.port, "/good"))
    statuses = []
    for _ in range(LIMIT * 100):
        answer = first.answer()
        statuses.append(answer.status)
        if answer.status != 100:
            break
    assert statuses[-1] == 0 and set(statuses[:-1]) == {100}, statuses[-3:]
    assert wait_for_records(proxy, 1)[0].error == error
    _not_reused(proxy, upstream, client, 1)


# -- the framing is sound, but more bytes came than it says ------------------------------------

EXTRA: dict[str, tuple[str, bytes, int, bytes]] = {
    "Content-Length shorter than the body": ("GET", OK_HEAD + b"Content-Length: 2\r\n\r\nok",
                                             200, b"ok"),
    "a body on a HEAD answer": ("HEAD", OK_HEAD + b"Content-Length: 4\r\n\r\n", 200, b""),
    "a body on a 204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    "a body on a 304": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n",
                        304, b""),
}
#: What follows the sound answer: a whole smuggled response.
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


@pytest.mark.parametrize("case", list(EXTRA))
def test_bytes_after_the_framing_at_once(proxy, raw_origin, client, case):
    """The extra bytes come with the answer: they never reach the client, the client
    connection goes on (the proxy frames its answers itself), the upstream one does not."""
    method, answer_bytes, status, body = EXTRA[case]
    upstream = Scripted(raw_origin, answer_bytes + SMUGGLED)
    first = client(proxy)
    first.send(_get(upstream.port, "/bad", method), _get(upstream.port, "/good"))
    answer = first.answer(method)
    assert (answer.status, answer.body, answer.complete) == (status, body, True), answer
    second = first.answer()
    assert (second.status, second.body) == (200, b"good"), second
    assert upstream.seen[-1][0] not in upstream.bad_connections()
    _not_reused(proxy, upstream, client, 2, pooled=1)


@pytest.mark.parametrize("case", list(EXTRA))
def test_bytes_after_the_framing_later(proxy, raw_origin, client, case):
    """The extra bytes come once the answer was relayed and the connection pooled: they must
    not be read as the answer to the next request (a desync), which goes on a new upstream
    connection."""
    method, answer_bytes, status, body = EXTRA[case]
    relayed, sent = gevent.event.Event(), gevent.event.Event()
    upstream = Scripted(raw_origin, answer_bytes, relayed, SMUGGLED, lambda sock: sent.set())
    first = client(proxy)
    first.send(_get(upstream.port, "/bad", method))
    answer = first.answer(method)
    assert (answer.status, answer.body, answer.complete) == (status, body, True), answer
    relayed.set()
    assert sent.wait(LIMIT)  # on loopback the bytes are in the proxy's socket now
    first.send(_get(upstream.port, "/good"))
    second = first.answer()
    assert (second.status, second.body) == (200, b"good"), second
    assert upstream.seen[-1][0] not in upstream.bad_connections()
    _not_reused(proxy, upstream, client, 2, pooled=1)


# -- Expect: 100-continue ----------------------------------------------------------------------


@pytest.mark.parametrize("idle", ["1s", "300ms"])
def test_a_final_head_split_across_the_expect_wait(raw_origin, proxy_factory, client, idle):
    """The origin starts its final answer within the proxy's 1 s wait for 100 Continue and
    ends it once the body came: no byte of it is lost. (An idle_timeout under that wait
    must not turn the wait into a 504 either.)"""

    def slow(sock: socket.socket) -> None:
        head = server.read_head(sock)
        sock.sendall(b"HTTP/1.1 2")
        body = head.partition(b"\r\n\r\n")[2]
        with gevent.Timeout(LIMIT, False):
            while len(body) < 5:
                body += sock.recv(100) or b"-----"
        bodies.append(body)
        sock.sendall(b"00 OK\r\nContent-Length: 2\r\n\r\nok")
        _until_closed(sock)

    bodies: list[bytes] = []
    server = raw_origin(slow)
    proxy = proxy_factory(INI.replace("idle_timeout = 1s", f"idle_timeout = {idle}"))
    first = client(proxy)
    first.send(_get(server.port, "/upload", "POST",
                    fields="Expect: 100-continue\r\nContent-Length: 5\r\n") + b"hello")
    answer = first.answer()
    assert (answer.status, answer.body, answer.complete) == (200, b"ok", True), answer
    assert bodies == [b"hello"]


# -- an answer before the request body is all sent ---------------------------------------------

#: A request body larger than what socket buffers between the proxy and the origin hold.
BIG_BODY = 32 * 1024 * 1024


@pytest.mark.parametrize("then", ["reset", "hold"])
def test_an_early_answer_to_a_large_upload_reaches_the_client(proxy, raw_origin, tmp_path,
                                                              then):
    """The origin answers 413 after the head and reads no more of the body; then it resets
    (closing with unread bytes does) or just holds the connection. The client gets the 413,
    not a 502 or a 504 at idle_timeout, and the connection is not reused."""
    done = gevent.event.Event()
    server = _refusing_uploads(raw_origin, then, done)
    upload = tmp_path / "upload"
    with open(upload, "wb") as handle:
        handle.truncate(BIG_BODY)
    out = curl("-x", proxy.url, "-H", "Expect:", "--data-binary", f"@{upload}",
               "-w", "|%{http_code}", f"http://127.0.0.1:{server.port}/upload")
    done.set()
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"too large|413"
    record = wait_for_records(proxy, 1)[-1]
    assert record.status == 413 and record.error is None
    assert record.bytes_in < BIG_BODY  # the rest of the body was never read
    assert len(proxy.server.pool) == 0


def _refusing_uploads(raw_origin: Any, then: str, done: gevent.event.Event) -> Any:
    """An origin that answers 413 after the head, reads no more of the body, then resets
    (``then`` "reset") or holds the connection until ``done``."""
    def refuse(sock: socket.socket) -> None:
        server.read_head(sock)
        sock.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n\r\ntoo large")
        if then == "reset":
            RESET(sock)
        else:
            done.wait(LIMIT)

    server = raw_origin(refuse)
    return server


@pytest.mark.parametrize("client_protocol", ["http1-tls", "h2"], indirect=True)
@pytest.mark.parametrize("then", ["reset", "hold"])
def test_an_early_answer_to_a_large_upload_over_tls_and_h2(protocol_pair, raw_origin,
                                                           client_protocol, then):
    """As above: the 413 reaches the client. HTTP/1.1 closes after it (the rest of the body
    is never read); HTTP/2 asks the client to stop sending (RST_STREAM NO_ERROR after the
    whole answer) and the connection goes on."""
    done = gevent.event.Event()
    server = _refusing_uploads(raw_origin, then, done)
    proxy, client = protocol_pair(INI)
    try:
        reply = client.request("POST", f"http://127.0.0.1:{server.port}/upload",
                               body=bytes(BIG_BODY), timeout=LIMIT)
    finally:
        done.set()
    assert (reply.status, reply.body, reply.complete) == (413, b"too large", True), reply
    if client_protocol == "h2":
        assert reply.reset == NO_ERROR and not reply.closed
        assert client.request("GET", "/healthz").body == b"ok\n"
    else:
        assert reply.field("connection") == "close" and reply.closed
    record = wait_for_records(proxy, 1)[0]
    assert record.status == 413 and record.error is None
    assert record.bytes_in < BIG_BODY  # the rest of the body was never read
    assert len(proxy.server.pool) == 0


def test_an_interim_answer_in_the_middle_of_a_body_is_relayed(proxy, raw_origin, client,
                                                              stalled):
    """An origin that stops reading to say 100 Continue (unasked) mid-body, then reads the
    rest: the proxy relays the 100, sends on, and the final answer follows the whole body."""
    got: list[int] = []

    def interim(sock: socket.socket) -> None:
        head = server.read_head(sock)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received = len(head.partition(b"\r\n\r\n")[2])
        assert wait_until(stalled(sock), LIMIT)  # the proxy's writes wait on full buffers
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        with gevent.Timeout(LIMIT, False):
            while received < length:
                received += len(sock.recv(1 << 20) or b"")
        got.append(received)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        _until_closed(sock)

    server = raw_origin(interim)
    sender = client(proxy)
    sender.send(_get(server.port, "/upload", "POST",
                     fields=f"Content-Length: {BIG_BODY}\r\n"))
    pusher = gevent.spawn(sender.sock.sendall, b"b" * BIG_BODY)
    try:
        first = sender.answer()
        assert first.status == 100
        final = sender.answer()
        assert (final.status, final.body, final.complete) == (200, b"ok", True), final
        assert got == [BIG_BODY]
    finally:
        pusher.kill()


# -- tunnels ----------------------------------------------------------------------------------


def _tunnel_origin(raw_origin: Callable[..., RawOrigin], first_echo: bool, end: Step
                   ) -> tuple[RawOrigin, list[bool]]:
    """A CONNECT target that echoes one piece (if ``first_echo``), then ends with ``end``;
    the list gets True when the proxy then closed the connection."""
    closed: list[bool] = []

    def handler(sock: socket.socket) -> None:
        if first_echo:
            sock.sendall(sock.recv(100))
        if end is RESET:
            RESET(sock)
            return
        FIN(sock)
        closed.append(_until_closed(sock))

    return raw_origin(handler), closed


@pytest.mark.parametrize("first_echo", [False, True], ids=["at once", "mid-tunnel"])
@pytest.mark.parametrize("end", [FIN, RESET], ids=["closes", "resets"])
def test_a_tunnel_whose_origin_closes_or_resets(proxy, raw_origin, first_echo, end):
    origin, closed = _tunnel_origin(raw_origin, first_echo, end)
    sock, head = open_tunnel(proxy, f"127.0.0.1:{origin.port}", timeout=LIMIT)
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        if first_echo:
            sock.sendall(b"ping")
            assert sock.recv(100) == b"ping"
        assert recv_all(sock, timeout=LIMIT) == b""  # the client sees the close
        if end is FIN:  # a half-close is passed on: the client closes its side too
            sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()
    record = wait_for_records(proxy, 1)[0]
    assert record.close_reason == ("done" if end is FIN else "upstream")
    assert record.bytes_out == len(head) + (4 if first_echo else 0)
    if end is FIN:
        _poll(lambda: closed == [True], "the proxy closes the upstream side")


@pytest.mark.parametrize("early", [b"", b"early bytes"], ids=["at once", "after early bytes"])
@pytest.mark.parametrize("end", [FIN, RESET], ids=["closes", "resets"])
@pytest.mark.parametrize("extra", [b"", b"hello"], ids=["", "client spoke first"])
def test_a_tunnel_whose_parent_closes_after_its_200(raw_origin, proxy_factory, early, end,
                                                    extra):
    """The parent said 200 (and maybe sent bytes of the tunnel with it), then ends: the
    client gets the 200, those bytes, and the close, whatever it sent with its CONNECT."""
    parent = Scripted(raw_origin, b"HTTP/1.1 200 Connection established\r\n\r\n" + early, end)
    child = proxy_factory(INI + f"[parents]\nparents = http://127.0.0.1:{parent.port}\n")
    sock, head = open_tunnel(child, "origin.test:443", extra=extra, timeout=LIMIT)
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        rest = head.partition(b"\r\n\r\n")[2]
        assert rest + recv_all(sock, timeout=LIMIT) == early
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()
    record = wait_for_records(child, 1)[0]
    assert record.close_reason == ("done" if end is FIN else "upstream")
    assert record.upstream_addr == ("127.0.0.1", parent.port)
    if end is FIN:
        _poll(lambda: parent.closed_by_proxy == {1}, "the proxy closes the parent connection")


# -- nameservers ------------------------------------------------------------------------------


class RogueDNS:
    """A UDP nameserver on loopback that answers every query with the datagrams of
    ``reply(query)``. The same TCP port is bound and not listening: a retry over TCP is
    refused."""

    def __init__(self, reply: Callable[[bytes], list[bytes]]) -> None:
        self.reply = reply
        self.queries = 0
        for _ in range(20):  # a port free for UDP may be taken for TCP: try a few
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            self.tcp = socket.socket()
            try:
                self.tcp.bind(udp.getsockname())
                break
            except OSError:
                udp.close()
                self.tcp.close()
        self.server = gevent.server.DatagramServer(udp, self._on_query)
        self.server.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.server.address[1]}"

    def _on_query(self, data: bytes, address: tuple[str, int]) -> None:
        self.queries += 1
        for out in self.reply(data):
            self.server.sendto(out, address)

    def stop(self) -> None:
        self.server.stop(timeout=1)
        self.tcp.close()


@pytest.fixture
def rogue_dns() -> Iterator[Callable[..., RogueDNS]]:
    started: list[RogueDNS] = []

    def start(reply: Callable[[bytes], list[bytes]]) -> RogueDNS:
        started.append(RogueDNS(reply))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _reply(query: bytes, *, rid: Optional[int] = None, tc: bool = False,
           name: Optional[str] = None, qr: bool = True) -> bytes:
    """The answer to ``query`` (127.0.0.1 to a question for A), changed as asked."""
    from dnslib import QTYPE, RR, DNSQuestion, DNSRecord

    record = DNSRecord.parse(query)
    if name is not None:
        record.questions = [DNSQuestion(name, record.q.qtype)]
    reply = record.reply()
    reply.header.qr = int(qr)
    if rid is not None:
        reply.header.id = rid
    if tc:
        reply.header.tc = 1
    elif record.q.qtype == QTYPE.A:
        reply.add_answer(*RR.fromZone(f"{record.q.qname} 60 IN A 127.0.0.1"))
    return reply.pack()


def _wrong_id(query: bytes) -> bytes:
    return _reply(query, rid=(query[0] << 8 | query[1]) ^ 0x5A5A)


def _closed_udp_port() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


GARBAGE = random.Random(9209).randbytes(48)

#: case: (the nameserver, from the dns_server and rogue_dns fixtures; status, error, rcode).
NAMESERVERS: dict[str, tuple[Callable[[Any, Any], str], int, str, Optional[str]]] = {
    "down": (lambda dns, rogue: _closed_udp_port(), 502, "dns_error", None),
    "slower than the timeout": (lambda dns, rogue: _slow(dns), 504, "dns_timeout", None),
    "mute": (lambda dns, rogue: _mute(dns), 504, "dns_timeout", None),
    "SERVFAIL": (lambda dns, rogue: _rcode(dns, "SERVFAIL"), 502, "dns_error", "SERVFAIL"),
    "REFUSED": (lambda dns, rogue: _rcode(dns, "REFUSED"), 502, "dns_error", "REFUSED"),
    # what does not answer the query is ignored (RFC 5452): the wait goes on to the timeout
    "garbage": (lambda dns, rogue: rogue(lambda q: [GARBAGE]).nameserver,
                504, "dns_timeout", None),
    "garbage after the right id": (lambda dns, rogue: rogue(lambda q: [q[:2] + GARBAGE])
                                   .nameserver, 504, "dns_timeout", None),
    "a wrong id": (lambda dns, rogue: rogue(lambda q: [_wrong_id(q)]).nameserver,
                   504, "dns_timeout", None),
    "the question of another name": (lambda dns, rogue: rogue(lambda q: [_reply(
        q, name="other.test.")]).nameserver, 504, "dns_timeout", None),
    "the query sent back": (lambda dns, rogue: rogue(lambda q: [q]).nameserver,
                            504, "dns_timeout", None),
    "a query instead of an answer": (lambda dns, rogue: rogue(lambda q: [_reply(
        q, qr=False)]).nameserver, 504, "dns_timeout", None),
    "truncated, no TCP server": (lambda dns, rogue: rogue(lambda q: [_reply(
        q, tc=True)]).nameserver, 502, "dns_error", None),
}


def _slow(dns: Any) -> str:
    dns.add("name.test", "A", "127.0.0.1")
    dns.delay = 0.6
    return dns.nameserver


def _mute(dns: Any) -> str:
    dns.add("name.test", "A", "127.0.0.1")
    dns.mute = True
    return dns.nameserver


def _rcode(dns: Any, rcode: str) -> str:
    dns.fail("name.test", rcode)
    return dns.nameserver


@pytest.mark.parametrize("case", list(NAMESERVERS))
def test_a_failing_nameserver(proxy_factory, dns_server, rogue_dns, origin, client, case):
    """502 dns_error or 504 dns_timeout within [resolver] timeout, never a hang or a 500; the
    client connection goes on (nothing of its stream is in doubt)."""
    how, status, error, rcode = NAMESERVERS[case]
    nameserver = how(dns_server, rogue_dns)
    proxy = proxy_factory(INI + f"[resolver]\nnameservers = {nameserver}\ntimeout = 300ms\n",
                          resolver=StaticResolver(fallthrough=True))
    first = client(proxy)
    first.send(_get(origin.port, "/", host="name.test"))
    answer = first.answer()
    _is_error(answer, status, error, rcode)
    assert answer.field("connection") is None
    first.send(_get(origin.port, "/"))  # an IP literal: no question asked
    second = first.answer()
    assert (second.status, second.body) == (200, b"hello\n"), second
    assert wait_for_records(proxy, 2)[0].error == error
    assert len(origin.seen) == 1


@pytest.mark.parametrize("forged", ["a wrong id", "garbage", "another name"])
def test_a_forged_datagram_before_the_answer_is_ignored(proxy_factory, rogue_dns, origin,
                                                        client, forged):
    """A datagram that is not the answer to the query (spoofed, stale, broken) does not end
    the lookup: the answer that follows it is taken (RFC 5452 section 9.1)."""
    make = {"a wrong id": _wrong_id, "garbage": lambda q: GARBAGE,
            "another name": lambda q: _reply(q, name="other.test.")}[forged]
    rogue = rogue_dns(lambda q: [make(q), _reply(q)])
    proxy = proxy_factory(INI + f"[resolver]\nnameservers = {rogue.nameserver}\n"
                          "timeout = 1s\n", resolver=StaticResolver(fallthrough=True))
    first = client(proxy)
    first.send(_get(origin.port, "/", host="name.test"))
    answer = first.answer()
    assert (answer.status, answer.body) == (200, b"hello\n"), answer
    assert rogue.queries == 2  # A and AAAA, once each


# -- parent proxies ---------------------------------------------------------------------------

#: How a parent fails: its script, or None for a port that refuses connections.
PARENTS: dict[str, Optional[tuple[Step, ...]]] = {
    "is down": None,
    "accepts then closes": (FIN,),
    "answers garbage": (b"\x00\xffnot http at all\r\n\r\n",),
    "never answers": (),
}
#: (the parent, the method): what the client gets when that parent is the only one.
PARENT_ALONE: dict[tuple[str, str], tuple[int, str]] = {
    ("is down", "CONNECT"): (502, "connection_refused"),
    ("is down", "GET"): (502, "connection_refused"),
    ("accepts then closes", "CONNECT"): (502, "connection_terminated"),
    ("accepts then closes", "GET"): (502, "connection_terminated"),
    ("answers garbage", "CONNECT"): (502, "http_response_incomplete"),
    ("answers garbage", "GET"): (502, "http_response_incomplete"),
    ("never answers", "CONNECT"): (504, "connection_timeout"),
    ("never answers", "GET"): (504, "http_response_timeout"),
}
#: A parent that answered a plain request (or may be working on it) is not retried.
NO_FAILOVER = {("answers garbage", "GET"), ("never answers", "GET")}


@pytest.mark.parametrize("method", ["CONNECT", "GET"])
@pytest.mark.parametrize("parent", list(PARENTS))
@pytest.mark.parametrize("second", [False, True], ids=["alone", "then a good one"])
def test_a_failing_parent(raw_origin, proxy_factory, origin, client, refusing, parent, method,
                          second):
    """Alone, the failing parent's error reaches the client (no byte went out yet); with a
    second parent, the request goes through it, unless the first one answered or may be
    working on a plain request. A parent that failed without answering is left out."""
    script = PARENTS[parent]
    bad = refusing if script is None else Scripted(raw_origin, *script).port
    # The good parent has a name of its own: a second "geproxy" in Via is a loop.
    parents = [bad] + ([proxy_factory(INI + "via = parent\n").port] if second else [])
    child = proxy_factory(INI + "[parents]\nparents = " + " ".join(
        f"http://127.0.0.1:{port}" for port in parents) + "\n")
    first = client(child)
    target = f"127.0.0.1:{origin.port}"
    if method == "GET":
        first.send(_get(origin.port, "/"))
    else:
        first.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = first.answer(method)
    failover = (parent, method) not in NO_FAILOVER
    if second and failover:
        assert answer.status == 200, answer
        if method == "CONNECT":
            first.send(b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
            answer = first.answer()
        assert answer.body == b"hello\n"
    else:
        _is_error(answer, *PARENT_ALONE[(parent, method)])
        assert origin.seen == []
    plugin = child.server.pm.get_plugin("parent")
    assert [route.port for route in plugin.down] == ([bad] if failover else [])


def test_a_request_with_a_body_does_not_go_to_the_next_parent(raw_origin, proxy_factory,
                                                               origin, client):
    """Its body was read from the client and sent to the first parent: it cannot go again."""
    closing = Scripted(raw_origin, FIN)
    good = proxy_factory(INI + "via = parent\n")
    child = proxy_factory(INI + f"[parents]\nparents = http://127.0.0.1:{closing.port} "
                          f"http://127.0.0.1:{good.port}\n")
    first = client(child)
    first.send(_get(origin.port, "/sha256", "POST", fields="Content-Length: 5\r\n") + b"hello")
    answer = first.answer()
    _is_error(answer, 502, "connection_terminated")
    assert answer.field("connection") == "close" and first.closed()
    assert origin.seen == []
    _poll(lambda: closing.closed_by_proxy == {1}, "the proxy closes the parent connection")
