"""Hostile clients, in raw bytes: smuggling attempts, broken request lines, oversize heads.

Every case checks four things: the answer (status and Proxy-Status), whether the proxy then
closed the connection, exactly which bytes reached the origin, and that the proxy still serves
a good request afterwards. The origin is a raw recorder, so "exactly" means byte for byte:
a request the proxy refuses must not leave a single byte upstream, and one it accepts must
arrive re-framed by the proxy, never as the client framed it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Optional

import gevent
import gevent.event
import pytest

from geproxy.testing import curl, echo, open_tunnel, wait_for_records

# -- a recording origin ---------------------------------------------------------------------


class Recorder:
    """A RawOrigin handler that keeps every byte it receives and answers each request with
    ``200`` and the body ``#N`` (N counts requests across connections, from 1), so the order
    of pipelined answers shows. It frames requests the way a strict origin would: a head, then
    a Content-Length or chunked body (the only framings a proxy may send it)."""

    def __init__(self) -> None:
        self.received = b""
        self.requests = 0

    def __call__(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        buf = b""
        for _ in range(50):  # requests on one upstream connection, bounded
            while b"\r\n\r\n" not in buf:
                piece = sock.recv(65536)
                if not piece:
                    return
                self.received += piece
                buf += piece
            head, _, buf = buf.partition(b"\r\n\r\n")
            buf = self._skip_body(sock, head, buf)
            if buf is None:
                return
            self.requests += 1
            body = b"#%d" % self.requests
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def _skip_body(self, sock: socket.socket, head: bytes, buf: bytes) -> Optional[bytes]:
        """The bytes after this request's body; None when the proxy closed inside it."""
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if fields.get(b"transfer-encoding") == b"chunked":
            while True:  # the proxy's own chunks: size CRLF data CRLF, then 0 CRLF CRLF
                while b"\r\n" not in buf:
                    buf = self._more(sock, buf)
                    if buf is None:
                        return None
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line, 16)
                need = size + 2
                while len(buf) < need:
                    buf = self._more(sock, buf)
                    if buf is None:
                        return None
                buf = buf[need:]
                if size == 0:
                    return buf
        length = int(fields.get(b"content-length", b"0"))
        while len(buf) < length:
            buf = self._more(sock, buf)
            if buf is None:
                return None
        return buf[length:]

    def _more(self, sock: socket.socket, buf: bytes) -> Optional[bytes]:
        piece = sock.recv(65536)
        if not piece:
            return None
        self.received += piece
        return buf + piece


@pytest.fixture
def recorder(raw_origin):
    handler = Recorder()
    server = raw_origin(handler)
    handler.port = server.port
    return handler


# -- the client side ----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    head: bytes
    body: bytes

    def field(self, name: bytes) -> Optional[bytes]:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


@dataclass
class Conversation:
    answers: list[Answer] = field(default_factory=list)
    closed: bool = False


def converse(address, data: bytes, expect: int, *, close_expected: bool,
             timeout: float = 10) -> Conversation:
    """Send ``data``; read ``expect`` answers. Then, when the proxy should have closed, wait
    for its EOF; when it should not, prove the connection still works by asking the proxy's
    own /healthz on it."""
    out = Conversation()
    sock = socket.create_connection(address, timeout=timeout)
    try:
        try:
            sock.sendall(data)
        except OSError:  # the proxy may close while a long request is still being sent
            pass
        buf = b""
        with gevent.Timeout(timeout, AssertionError("no answer in time")):
            for _ in range(expect):
                answer, buf = _read_answer(sock, buf)
                if answer is None:
                    out.closed = True
                    return out
                out.answers.append(answer)
            if close_expected:
                out.closed = _wait_eof(sock, buf)
            else:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                answer, buf = _read_answer(sock, buf)
                out.closed = answer is None
                assert out.closed or answer.status == 200, answer
    finally:
        sock.close()
    return out


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _read_answer(sock: socket.socket, buf: bytes) -> tuple[Optional[Answer], bytes]:
    while b"\r\n\r\n" not in buf:
        piece = _recv(sock)
        if not piece:
            assert not buf, f"the proxy closed in the middle of an answer: {buf!r}"
            return None, b""
        buf += piece
    head, _, buf = buf.partition(b"\r\n\r\n")
    answer = Answer(int(head.split(b" ", 2)[1]), head, b"")
    length = int(answer.field(b"content-length") or b"0")
    while len(buf) < length:
        piece = _recv(sock)
        assert piece, "the proxy closed in the middle of a body"
        buf += piece
    answer.body, buf = buf[:length], buf[length:]
    return answer, buf


def _wait_eof(sock: socket.socket, buf: bytes) -> bool:
    assert not buf, f"bytes after the last answer: {buf!r}"
    for _ in range(100):  # bounded by the socket timeout too
        piece = _recv(sock)
        if not piece:
            return True
        raise AssertionError(f"bytes after the last answer: {piece!r}")
    return False


def still_serves(proxy, recorder) -> None:
    """A good request from a new client, through the proxy, to the same origin."""
    before = recorder.requests
    out = curl("-x", proxy.url, f"http://127.0.0.1:{recorder.port}/after")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"#%d" % (before + 1)


# -- the cases ----------------------------------------------------------------------------

def fwd(line: bytes, *fields: bytes, framing: bytes = b"", body: bytes = b"",
        via: bytes = b"1.1") -> bytes:
    """What the origin must receive for a request the proxy accepts: origin-form, Host from
    the target first, the client's end-to-end fields in order, the proxy's own framing, Via."""
    out = line + b"\r\nHost: {o}\r\n"
    for one in fields:
        out += one + b"\r\n"
    return out + framing + b"Via: " + via + b" geproxy\r\n\r\n" + body


@dataclass
class Case:
    send: bytes
    #: The statuses of the answers, in order; the last is the one that matters.
    statuses: tuple[int, ...] = (400,)
    closed: bool = True
    #: Exactly what the origin receives ("{o}" stands for its authority).
    upstream: bytes = b""
    #: Proxy-Status error of the last answer, when it is the proxy's own.
    error: Optional[str] = "http_request_error"


def ok(send: bytes, upstream: bytes, statuses: tuple[int, ...] = (200,),
       closed: bool = False) -> Case:
    return Case(send, statuses, closed, upstream, None)


GET = b"GET http://{o}/ HTTP/1.1\r\n"
POST = b"POST http://{o}/ HTTP/1.1\r\nHost: x\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
POST_CHUNKED = POST + CHUNKED
FWD_POST = b"POST / HTTP/1.1"
CL5 = b"Content-Length: 5\r\n"
TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
GOOD_CHUNKS = b"5\r\nhello\r\n0\r\n\r\n"
HEAD_SENT = fwd(FWD_POST, framing=TE_CHUNKED)  # what a chunked POST puts upstream first


SMUGGLING = {
    # Two framings, or one a front end and a back end may read differently: refused whole,
    # before a byte goes upstream.
    "CL.TE": Case(POST + b"Content-Length: 6\r\n" + CHUNKED + b"\r\n0\r\n\r\nG"),
    "TE.CL": Case(POST + CHUNKED + b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"),
    "TE xchunked": Case(POST + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "TE chunked, identity": Case(POST + b"Transfer-Encoding: chunked, identity\r\n\r\n"),
    "TE identity, chunked": Case(POST + b"Transfer-Encoding: identity, chunked\r\n\r\n"
                                 + GOOD_CHUNKS),
    "TE gzip, chunked": Case(POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + GOOD_CHUNKS),
    "TE chunked, chunked": Case(POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n"
                                + GOOD_CHUNKS),
    "TE duplicated field": Case(POST_CHUNKED + CHUNKED + b"\r\n" + GOOD_CHUNKS),
    "TE chunked then cow": Case(POST_CHUNKED + b"Transfer-encoding: cow\r\n\r\n" + GOOD_CHUNKS),
    "TE name after a space": Case(b"POST http://{o}/ HTTP/1.1\r\n Transfer-Encoding: chunked\r\n"
                                  b"Host: x\r\n\r\n" + GOOD_CHUNKS),
    "TE space before colon": Case(POST + b"Transfer-Encoding : chunked\r\n\r\n" + GOOD_CHUNKS),
    "TE tab before colon": Case(POST + b"Transfer-Encoding\t: chunked\r\n\r\n" + GOOD_CHUNKS),
    "TE vertical tab": Case(POST + b"Transfer-Encoding: \x0bchunked\r\n\r\n" + GOOD_CHUNKS),
    "TE in HTTP/1.0": Case(b"POST http://{o}/ HTTP/1.0\r\n" + CHUNKED + b"\r\n" + GOOD_CHUNKS),
    "TE obs-folded": Case(POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + GOOD_CHUNKS),
    "two equal lengths": Case(POST + CL5 + CL5 + b"\r\nhello"),
    "two different lengths": Case(POST + CL5 + b"Content-Length: 6\r\n\r\nhello!"),
    "length list": Case(POST + b"Content-Length: 5, 5\r\n\r\nhello"),
    "negative length": Case(POST + b"Content-Length: -1\r\n\r\n"),
    "length with plus": Case(POST + b"Content-Length: +5\r\n\r\nhello"),
    "hex length": Case(POST + b"Content-Length: 0x5\r\n\r\nhello"),
    "huge length": Case(POST + b"Content-Length: 99999999999999999999999\r\n\r\nhello"),
    "empty length": Case(POST + b"Content-Length: \r\n\r\n"),
    "length with a space inside": Case(POST + b"Content-Length: 5 5\r\n\r\nhello"),
    "length in unicode digits": Case(POST + b"Content-Length: \xd9\xa5\r\n\r\nhello"),
    "CL named in Connection": ok(
        POST + b"Connection: content-length\r\n" + CL5 + b"\r\nhelloGET http://{o}/2 HTTP/1.1"
        b"\r\nHost: x\r\n\r\n",
        fwd(FWD_POST, framing=CL5, body=b"hello") + fwd(b"GET /2 HTTP/1.1"), (200, 200)),
    "TE named in Connection": ok(
        POST_CHUNKED + b"Connection: transfer-encoding\r\n\r\n" + GOOD_CHUNKS,
        HEAD_SENT + GOOD_CHUNKS),
    # Framings that look odd but are one thing only: accepted, and re-framed by the proxy.
    "TE upper case": ok(POST + b"Transfer-Encoding: CHUNKED\r\n\r\n" + GOOD_CHUNKS,
                        HEAD_SENT + GOOD_CHUNKS),
    "TE leading spaces": ok(POST + b"Transfer-Encoding:    chunked\r\n\r\n" + GOOD_CHUNKS,
                            HEAD_SENT + GOOD_CHUNKS),
    "TE tabs around": ok(POST + b"Transfer-Encoding:\tchunked\t\r\n\r\n" + GOOD_CHUNKS,
                         HEAD_SENT + GOOD_CHUNKS),
    "length with leading zeros": ok(POST + b"Content-Length: 005\r\n\r\nhello",
                                    fwd(FWD_POST, framing=CL5, body=b"hello")),
    "length with trailing space": ok(POST + b"Content-Length: 5 \r\n\r\nhello",
                                     fwd(FWD_POST, framing=CL5, body=b"hello")),
    "GET with a body": ok(GET + b"Host: x\r\n" + CL5 + b"\r\nhello",
                          fwd(b"GET / HTTP/1.1", framing=CL5, body=b"hello")),
    "zero length": ok(POST + b"Content-Length: 0\r\n\r\n",
                      fwd(FWD_POST, framing=b"Content-Length: 0\r\n")),
    "underscored framing names are plain fields": ok(
        POST + b"Transfer_Encoding: chunked\r\n" + CL5 + b"\r\nhello",
        fwd(FWD_POST, b"Transfer_Encoding: chunked", framing=CL5, body=b"hello")),
}

CHUNKS = {
    # The head is already upstream when a bad chunk arrives; nothing after it is.
    "chunk size overflow": Case(POST_CHUNKED + b"\r\nffffffffffffffffffff\r\nhello\r\n",
                                upstream=HEAD_SENT),
    "chunk size garbage": Case(POST_CHUNKED + b"\r\nzz\r\n\r\n", upstream=HEAD_SENT),
    "chunk size 0x": Case(POST_CHUNKED + b"\r\n0x5\r\nhello\r\n0\r\n\r\n", upstream=HEAD_SENT),
    "chunk size negative": Case(POST_CHUNKED + b"\r\n-5\r\nhello\r\n0\r\n\r\n",
                                upstream=HEAD_SENT),
    "chunk size leading space": Case(POST_CHUNKED + b"\r\n 5\r\nhello\r\n0\r\n\r\n",
                                     upstream=HEAD_SENT),
    "chunk size empty": Case(POST_CHUNKED + b"\r\n\r\nhello\r\n0\r\n\r\n", upstream=HEAD_SENT),
    "chunk data longer than its size": Case(POST_CHUNKED + b"\r\n3\r\nhello\r\n0\r\n\r\n",
                                            upstream=HEAD_SENT),
    "chunk data without CRLF": Case(POST_CHUNKED + b"\r\n5\r\nhello0\r\n\r\n",
                                    upstream=HEAD_SENT),
    "chunk line with bare LF": Case(POST_CHUNKED + b"\r\n5\nhello\r\n0\r\n\r\n",
                                    upstream=HEAD_SENT),
    "chunk extension with NUL": Case(POST_CHUNKED + b"\r\n5;a\x00=b\r\nhello\r\n0\r\n\r\n",
                                     upstream=HEAD_SENT),
    "chunk extension with bare LF": Case(POST_CHUNKED + b"\r\n5;a\nhello\r\n0\r\n\r\n",
                                         upstream=HEAD_SENT),
    "chunk line over 4 KiB": Case(POST_CHUNKED + b"\r\n5;" + b"a" * 5000 + b"\r\nhello\r\n",
                                  upstream=HEAD_SENT),
    "bad trailer line": Case(POST_CHUNKED + b"\r\n5\r\nhello\r\n0\r\nno colon\r\n\r\n",
                             upstream=HEAD_SENT),
    "chunk extensions dropped": ok(POST_CHUNKED + b"\r\n5;a=b;c=\"d e\"\r\nhello\r\n0;z\r\n\r\n",
                                   HEAD_SENT + GOOD_CHUNKS),
    "trailers dropped": ok(POST_CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
                           HEAD_SENT + GOOD_CHUNKS),
    "many small chunks re-framed": ok(POST_CHUNKED + b"\r\n" + b"1\r\na\r\n" * 3 + b"0\r\n\r\n",
                                      HEAD_SENT + b"1\r\na\r\n" * 3 + b"0\r\n\r\n"),
}

BYTES = {
    "request line ends in bare LF": Case(b"GET http://{o}/ HTTP/1.1\nHost: x\r\n\r\n"),
    "fields end in bare LF": Case(GET + b"Host: x\nX: y\n\n"),
    "bare CR line ending": Case(GET + b"Host: x\rX: y\r\n\r\n"),
    "bare CR in a value": Case(GET + b"Host: x\r\nX: a\rb\r\n\r\n"),
    "obs-fold with a space": Case(GET + b"Host: x\r\nX: a\r\n b\r\n\r\n"),
    "obs-fold with a tab": Case(GET + b"Host: x\r\nX: a\r\n\tb\r\n\r\n"),
    "space before a colon": Case(GET + b"Host : x\r\n\r\n"),
    "NUL in a value": Case(GET + b"Host: x\r\nX: a\x00b\r\n\r\n"),
    "NUL in a name": Case(GET + b"Host: x\r\nX\x00Y: a\r\n\r\n"),
    "NUL in the target": Case(b"GET http://{o}/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n"),
    "control byte in a value": Case(GET + b"Host: x\r\nX: a\x01b\r\n\r\n"),
    "DEL in a value": Case(GET + b"Host: x\r\nX: a\x7fb\r\n\r\n"),
    "escape in a value": Case(GET + b"Host: x\r\nX: \x1b[31m\r\n\r\n"),
    "line without a colon": Case(GET + b"Host: x\r\nnot a field\r\n\r\n"),
    "empty field name": Case(GET + b"Host: x\r\n: value\r\n\r\n"),
    "separator in a name": Case(GET + b"Host: x\r\nX@Y: 1\r\n\r\n"),
    "space inside a name": Case(GET + b"Host: x\r\nX Y: 1\r\n\r\n"),
    "non-ASCII name": Case(GET + b"Host: x\r\nX\xc3\xa9: 1\r\n\r\n"),
    "obs-text value passes byte for byte": ok(
        GET + b"Host: x\r\nX-Name: caf\xe9 \xff\r\n\r\n", fwd(b"GET / HTTP/1.1",
                                                               b"X-Name: caf\xe9 \xff")),
    "value whitespace trimmed": ok(GET + b"Host: x\r\nX-A:  \t v \t \r\n\r\n",
                                   fwd(b"GET / HTTP/1.1", b"X-A: v")),
}

REQUEST_LINES = {
    "TLS handshake": Case(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    "lowercase method": Case(b"get http://{o}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "missing version": Case(b"GET http://{o}/\r\nHost: x\r\n\r\n"),
    "HTTP/0.9": Case(b"GET /\r\n\r\n"),
    "HTTP/2.0": Case(b"GET http://{o}/ HTTP/2.0\r\nHost: x\r\n\r\n"),
    "HTTP/1.10": Case(b"GET http://{o}/ HTTP/1.10\r\nHost: x\r\n\r\n"),
    "lowercase version": Case(b"GET http://{o}/ http/1.1\r\nHost: x\r\n\r\n"),
    "extra token": Case(b"GET http://{o}/ HTTP/1.1 extra\r\nHost: x\r\n\r\n"),
    "space in the target": Case(b"GET http://{o}/a b HTTP/1.1\r\nHost: x\r\n\r\n"),
    "tab separator": Case(b"GET\thttp://{o}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "non-ASCII target": Case(b"GET http://{o}/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n"),
    "userinfo": Case(b"GET http://user:pw@{o}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "bare userinfo": Case(b"GET http://@{o}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "https absolute-form": Case(b"GET https://{o}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "ftp absolute-form": Case(b"GET ftp://{o}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "target port 0": Case(b"GET http://127.0.0.1:0/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "target port over 65535": Case(b"GET http://127.0.0.1:65536/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "target empty host": Case(b"GET http:///path HTTP/1.1\r\nHost: x\r\n\r\n"),
    "target bad host": Case(b"GET http://exa_mple..com/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    "two Host fields": Case(GET + b"Host: x\r\nHost: y\r\n\r\n"),
    "bad Max-Forwards": Case(b"TRACE http://{o}/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: x\r\n\r\n"),
    "Host differing from the target": ok(GET + b"Host: elsewhere.example\r\n\r\n",
                                         fwd(b"GET / HTTP/1.1")),
    "HTTP/1.0 without Host": ok(b"GET http://{o}/a HTTP/1.0\r\n\r\n",
                                fwd(b"GET /a HTTP/1.1", via=b"1.0"), closed=True),
    "unknown method": Case(b"BREW http://{o}/pot HTTP/1.1\r\nHost: x\r\n\r\n"),
    "WebDAV method": ok(b"PROPFIND http://{o}/dav HTTP/1.1\r\nHost: x\r\nDepth: 1\r\n\r\n",
                        fwd(b"PROPFIND /dav HTTP/1.1", b"Depth: 1")),
    # Lenient where the proxy writes the line anew, so no one downstream reads it otherwise.
    "two spaces": ok(b"GET  http://{o}/ HTTP/1.1\r\nHost: x\r\n\r\n", fwd(b"GET / HTTP/1.1")),
    "absolute-form without Host": ok(b"GET http://{o}/ HTTP/1.1\r\n\r\n",
                                     fwd(b"GET / HTTP/1.1")),
    "an empty line before the request": ok(b"\r\n" + GET + b"Host: x\r\n\r\n",
                                           fwd(b"GET / HTTP/1.1")),
    "query kept": ok(b"GET http://{o}/a?b=c&d HTTP/1.1\r\nHost: x\r\n\r\n",
                     fwd(b"GET /a?b=c&d HTTP/1.1")),
    "Max-Forwards 0 is answered here": ok(
        b"OPTIONS http://{o}/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n\r\n", b""),
}

CONNECTS = {
    "CONNECT without port": Case(b"CONNECT 127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n"),
    "CONNECT port 0": Case(b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n"),
    "CONNECT port 65536": Case(b"CONNECT 127.0.0.1:65536 HTTP/1.1\r\n\r\n"),
    "CONNECT huge port": Case(b"CONNECT 127.0.0.1:99999999999999999999 HTTP/1.1\r\n\r\n"),
    "CONNECT negative port": Case(b"CONNECT 127.0.0.1:-443 HTTP/1.1\r\n\r\n"),
    "CONNECT with a path": Case(b"CONNECT {o}/path HTTP/1.1\r\n\r\n"),
    "CONNECT with userinfo": Case(b"CONNECT user@{o} HTTP/1.1\r\n\r\n"),
    "CONNECT absolute-form": Case(b"CONNECT http://{o}/ HTTP/1.1\r\n\r\n"),
    "CONNECT origin-form": Case(b"CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "CONNECT IPv6 without brackets": Case(b"CONNECT ::1:443 HTTP/1.1\r\n\r\n"),
    "CONNECT bad host": Case(b"CONNECT exa_mple..com:443 HTTP/1.1\r\n\r\n"),
    "CONNECT with a body": Case(b"CONNECT {o} HTTP/1.1\r\n" + CL5 + b"\r\nhello"),
    "CONNECT with chunked body": Case(b"CONNECT {o} HTTP/1.1\r\n" + CHUNKED + b"\r\n"
                                      + GOOD_CHUNKS),
    "CONNECT to the proxy itself": Case(b"CONNECT {p} HTTP/1.1\r\n\r\n",
                                        (502,), False, error="proxy_loop_detected"),
}

HEADERS = {
    "proxy credentials never go upstream": ok(
        GET + b"Host: x\r\nProxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive"
        b"\r\nX-A: 1\r\n\r\n", fwd(b"GET / HTTP/1.1", b"X-A: 1")),
    "fields named in Connection dropped": ok(
        GET + b"Host: x\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\nX-A: 2\r\n\r\n",
        fwd(b"GET / HTTP/1.1", b"X-A: 2")),
    "hop-by-hop fields dropped": ok(
        GET + b"Host: x\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X\r\n"
        b"Upgrade: websocket\r\nX-A: 3\r\n\r\n", fwd(b"GET / HTTP/1.1", b"X-A: 3")),
    "Host named in Connection": ok(GET + b"Host: x\r\nConnection: host\r\n\r\n",
                                   fwd(b"GET / HTTP/1.1")),
    "a Via naming this proxy is a loop": Case(
        GET + b"Host: x\r\nVia: 1.1 other, 1.1 geproxy\r\n\r\n", (502,), False,
        error="proxy_loop_detected"),
}

PIPELINES = {
    "three GETs in one write": ok(
        b"".join(b"GET http://{o}/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in (1, 2, 3)),
        b"".join(fwd(b"GET /%d HTTP/1.1" % n) for n in (1, 2, 3)), (200, 200, 200)),
    "a good request, then a bad one": Case(
        GET + b"Host: x\r\n\r\n" + b"GET http://{o}/ HTTP/1.1\r\nHost: x\r\nX: a\x00\r\n\r\n",
        (200, 400), True, fwd(b"GET / HTTP/1.1")),
    "a body, then a request": ok(
        POST + CL5 + b"\r\nhello" + GET + b"Host: x\r\n\r\n",
        fwd(FWD_POST, framing=CL5, body=b"hello") + fwd(b"GET / HTTP/1.1"), (200, 200)),
    "chunks, then a request": ok(
        POST_CHUNKED + b"\r\n" + GOOD_CHUNKS + GET + b"Host: x\r\n\r\n",
        HEAD_SENT + GOOD_CHUNKS + fwd(b"GET / HTTP/1.1"), (200, 200)),
    "Connection: close ends the pipeline": ok(
        GET + b"Host: x\r\nConnection: close\r\n\r\n" + GET + b"Host: x\r\n\r\n",
        fwd(b"GET / HTTP/1.1"), closed=True),
    "a smuggled request in a body stays a body": ok(
        POST + b"Content-Length: 46\r\n\r\nGET http://evil.test/ HTTP/1.1\r\nHost: evil\r\n\r\n",
        fwd(FWD_POST, framing=b"Content-Length: 46\r\n",
            body=b"GET http://evil.test/ HTTP/1.1\r\nHost: evil\r\n\r\n")),
}

OVERSIZE = {
    "request line over 8 KiB": Case(b"GET http://{o}/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
                                    (414,)),
    "one field over the limit": Case(GET + b"Host: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                                     (431,)),
    "many fields": Case(GET + b"Host: x\r\n" + b"X-F: 1\r\n" * 10000 + b"\r\n", (431,)),
    "a head of 200 KiB": Case(GET + b"Host: x\r\n" + (b"X-Long: " + b"b" * 1000 + b"\r\n") * 200
                              + b"\r\n", (431,)),
    "a method of 10 KiB": Case(b"A" * 10240 + b" http://{o}/ HTTP/1.1\r\n\r\n"),
}

CASES = {**SMUGGLING, **CHUNKS, **BYTES, **REQUEST_LINES, **CONNECTS, **HEADERS, **PIPELINES,
         **OVERSIZE}


def test_there_are_enough_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request(proxy, recorder, name):
    case = CASES[name]
    authority = b"127.0.0.1:%d" % recorder.port
    data = case.send.replace(b"{o}", authority).replace(b"{p}", b"127.0.0.1:%d" % proxy.port)
    talk = converse(proxy.address, data, len(case.statuses), close_expected=case.closed)
    assert [a.status for a in talk.answers] == list(case.statuses), talk.answers
    last = talk.answers[-1]
    if case.error is not None:
        assert last.field(b"proxy-status") == f"geproxy; error={case.error}".encode()
        assert last.field(b"content-type") == b"text/plain; charset=utf-8"
    if case.closed:
        assert last.field(b"connection") == b"close"
    assert talk.closed == case.closed
    # Byte for byte what reached the origin, once the proxy is done with it.
    expected = case.upstream.replace(b"{o}", authority)
    with gevent.Timeout(5, False):
        while len(recorder.received) < len(expected):
            gevent.sleep(0.01)
    assert recorder.received == expected
    still_serves(proxy, recorder)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        assert piece, f"the tunnel closed after {data!r}"
        data += piece
    return data


def test_every_case_at_once_leaves_an_open_tunnel_alone(proxy, recorder, raw_origin):
    """All the hostile requests on their own connections at the same time, while a tunnel
    is open: each gets its own answer, and the tunnel never notices."""
    echoer = raw_origin(echo)
    tunnel, head = open_tunnel(proxy, f"127.0.0.1:{echoer.port}")
    authority = b"127.0.0.1:%d" % recorder.port

    def one(name: str) -> list[int]:
        case = CASES[name]
        data = case.send.replace(b"{o}", authority).replace(
            b"{p}", b"127.0.0.1:%d" % proxy.port)
        talk = converse(proxy.address, data, len(case.statuses), close_expected=case.closed)
        return [a.status for a in talk.answers]

    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        tunnel.sendall(b"before")
        assert _read_exactly(tunnel, 6) == b"before"
        crowd = {name: gevent.spawn(one, name) for name in CASES}
        gevent.joinall(list(crowd.values()), timeout=60)
        for name, greenlet in crowd.items():
            assert greenlet.get(block=False) == list(CASES[name].statuses), name
        tunnel.sendall(b"after")
        assert _read_exactly(tunnel, 5) == b"after"
    finally:
        tunnel.close()
    still_serves(proxy, recorder)


# -- slow clients ---------------------------------------------------------------------------


def _trickle(proxy, data: bytes, every: float, limit: int) -> bytes:
    """Send ``data`` one byte per ``every`` seconds (at most ``limit`` bytes); what came back."""
    sock = proxy.connect()
    answer = b""
    try:
        for byte in data[:limit]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            gevent.sleep(every)
        for _ in range(100):
            piece = _recv(sock)
            if not piece:
                break
            answer += piece
    finally:
        sock.close()
    return answer


def test_slowloris_is_cut_at_header_timeout_and_others_go_on(proxy_factory, recorder):
    proxy = proxy_factory("header_timeout = 1500ms\n")
    head = b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n\r\n" % recorder.port
    slow = [gevent.spawn(_trickle, proxy, head, 0.5, 10) for _ in range(20)]
    try:
        # While twenty clients trickle their heads, a good request is served.
        still_serves(proxy, recorder)
        answers = [g.get(timeout=15) for g in slow]
    finally:
        gevent.killall(slow)
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"\r\nConnection: close\r\n" in answer
    assert recorder.received.count(b"X-Slow") == 0  # no trickled head went upstream
    still_serves(proxy, recorder)


# -- clients that do not read, and clients that send too fast -------------------------------

#: More than any chain of socket buffers holds: a proxy that buffers it would show.
FLOOD = 256 * 1024 * 1024
#: What the socket buffers between client and origin may hold at most on loopback
#: (four sockets, a few MiB each with autotuning), plus the proxy's own read buffer.
BUFFERED = 48 * 1024 * 1024


class Flooder:
    """An origin that answers with a huge body as fast as it is taken; ``sent`` counts what
    the proxy took, ``done`` is set when the proxy closed on it."""

    def __init__(self, raw_origin, tunnel: bool = False) -> None:
        self.sent = 0
        self.done = gevent.event.Event()
        self.tunnel = tunnel
        self.server = raw_origin(self)

    def __call__(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        try:
            if not self.tunnel:
                self.server.read_head(sock)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FLOOD)
            piece = b"x" * 65536
            while self.sent < FLOOD:
                sock.sendall(piece)
                self.sent += len(piece)
        finally:
            self.done.set()


class Sink:
    """An origin that reads a request head (or nothing, in a tunnel) and then nothing more
    until ``release`` is set; then it drains what the proxy sent and sets ``done`` at the
    proxy's EOF (``drained`` counts the body bytes)."""

    def __init__(self, raw_origin, tunnel: bool = False) -> None:
        self.release = gevent.event.Event()
        self.done = gevent.event.Event()
        self.drained = 0
        self.tunnel = tunnel
        self.server = raw_origin(self)

    def __call__(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        if not self.tunnel:
            self.server.read_head(sock)
        self.release.wait(timeout=30)
        for _ in range(100000):  # bounded by the socket timeout and the bytes buffered
            piece = _recv(sock)
            if not piece:
                self.done.set()
                return
            self.drained += len(piece)


def _push(sock: socket.socket, total: int, stall: float = 1.0) -> int:
    """Send up to ``total`` bytes without blocking; stop once the peer took nothing for
    ``stall`` seconds (backpressure) or closed. Returns how much went out."""
    import select

    sock.setblocking(False)
    piece = b"y" * 65536
    sent = 0
    while sent < total:
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            break
        try:
            sent += sock.send(piece)
        except BlockingIOError:
            continue
        except OSError:
            break
    return sent


def _ask(sock: socket.socket, port: int, tunnel: bool, body: int = 0) -> None:
    if tunnel:
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % port)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    elif body:
        sock.sendall(b"POST http://127.0.0.1:%d/up HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % (port, body))
    else:
        sock.sendall(b"GET http://127.0.0.1:%d/big HTTP/1.1\r\nHost: x\r\n\r\n" % port)


@pytest.mark.parametrize("tunnel", [False, True], ids=["plain", "tunnel"])
def test_a_client_that_never_reads_is_cut_and_bounded(proxy_factory, raw_origin, tunnel):
    proxy = proxy_factory("idle_timeout = 1s\n")
    flooder = Flooder(raw_origin, tunnel)
    with proxy.connect() as sock:
        sock.settimeout(10)
        _ask(sock, flooder.server.port, tunnel)
        # The client reads nothing more: the proxy's writes stall, then time out, and it
        # lets go of the origin; what it took from the origin is what socket buffers hold.
        assert flooder.done.wait(timeout=20)
        assert 0 < flooder.sent < BUFFERED
        record, = wait_for_records(proxy, 1, limit=20)
        assert record.status == 200 and record.bytes_out < BUFFERED
        assert record.close_reason == ("idle timeout" if tunnel else "client")
        assert record.error is None


@pytest.mark.parametrize("tunnel", [False, True], ids=["plain", "tunnel"])
def test_bytes_faster_than_the_origin_reads_are_held_back(proxy_factory, raw_origin, tunnel):
    proxy = proxy_factory("idle_timeout = 1s\n")
    sink = Sink(raw_origin, tunnel)
    with proxy.connect() as sock:
        sock.settimeout(10)
        _ask(sock, sink.server.port, tunnel, body=FLOOD)
        pushed = _push(sock, FLOOD)
        assert 0 < pushed < BUFFERED  # backpressure: the proxy stopped reading
        record, = wait_for_records(proxy, 1, limit=20)  # and gave up at idle_timeout
        sink.release.set()
        assert sink.done.wait(timeout=20)  # the origin sees the proxy's close
        assert sink.drained <= pushed
        if tunnel:
            assert record.close_reason == "idle timeout"
            return
        assert record.error == "http_response_timeout"
        sock.setblocking(True)
        sock.settimeout(10)
        answer = b""
        for _ in range(100):
            piece = _recv(sock)
            if not piece:
                break
            answer += piece
        # Nothing of a response was sent yet: the client hears why, then the close.
        assert answer.startswith(b"HTTP/1.1 504 "), answer[:200]
