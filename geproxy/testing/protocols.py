"""One client for plain requests through the proxy over each protocol a client may speak to
it, so that a test of forwarding runs over all of them:

- ``http1``: HTTP/1.1 on a plain listener;
- ``http1-tls``: HTTP/1.1 over TLS to a ``tls://`` listener (an HTTPS proxy), ALPN http/1.1;
- ``h2``: HTTP/2 to a ``tls://`` listener with ``[tls] http2 = on``, ALPN h2, through the
  kit's :class:`~geproxy.testing.h2client.H2Client` (the ``h2`` package, not geproxy's code).

::

    proxy = proxy_factory(protocol_ini("h2", tls_files))
    client = open_client(proxy, "h2", tls_files.ca_file)
    reply = client.request("POST", f"http://origin.test:{port}/sha256", body=data)
    reply.status, reply.field("via"), reply.body, reply.complete

The HTTP/1.1 client writes and parses the bytes itself, with no library between the test and
the wire: the reply shows what the proxy sent, field for field. A reply tells how it ended:
``complete`` when the body ended where its framing said (a Content-Length reached, the last
chunk, END_STREAM), ``closed`` when the connection ended with it, and for HTTP/2 ``reset``,
the error code of the RST_STREAM that ended the stream.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import gevent
import h2.exceptions

from .h2client import H2Client, H2ClientStream

if TYPE_CHECKING:
    from .certs import TLSFiles
    from .servers import Proxy

__all__ = ["PROTOCOLS", "Reply", "ProxyClient", "Pending", "HTTP1Client", "H2RequestClient",
           "open_client", "protocol_ini"]

#: The client protocols, as ``open_client`` and ``protocol_ini`` name them.
PROTOCOLS = ("http1", "http1-tls", "h2")
#: The bound on each wait of a client, in seconds, unless a call gives its own.
LIMIT = 10.0
#: Body bytes written at once.
PIECE = 64 * 1024
#: How long a client that sent ``Expect: 100-continue`` waits for an answer before it sends
#: its body anyway (curl's default).
EXPECT_WAIT = 1.0

Fields = list[tuple[str, str]]


@dataclass
class Reply:
    """One answer as the client saw it."""

    #: The final status; 0 when none came (HTTP/1.1: the connection closed first; HTTP/2:
    #: the stream was reset first).
    status: int
    #: The final head's fields in order, names in lower case, no pseudo-fields.
    headers: Fields = field(default_factory=list)
    body: bytes = b""
    #: The body ended where its framing said: its Content-Length, its last chunk, or
    #: END_STREAM. A body that ends at the close (an HTTP/1.0 client's) is complete when
    #: the close was a FIN, not a reset.
    complete: bool = False
    #: Interim (1xx) answers before the final one: (status, fields).
    interim: list[tuple[int, Fields]] = field(default_factory=list)
    #: The connection ended with this answer: the proxy closed it (HTTP/1.1), or sent
    #: GOAWAY or went away (HTTP/2).
    closed: bool = False
    #: HTTP/2: the error code of the RST_STREAM the stream got (NO_ERROR after a whole answer
    #: asks the client to stop sending its body), -1 when the connection ended under it;
    #: None when no reset came.
    reset: Optional[int] = None
    #: HTTP/1.1: the final head's bytes as they came (status line and fields, no blank line).
    head: bytes = b""
    #: HTTP/2: the trailer fields, if any.
    trailers: Optional[Fields] = None

    def field(self, name: str) -> Optional[str]:
        """The first value of field ``name``, or None."""
        values = self.fields(name)
        return values[0] if values else None

    def fields(self, name: str) -> list[str]:
        """Every value of field ``name``, in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    @property
    def names(self) -> set[str]:
        return {key for key, _ in self.headers}


def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme, authority, path) of an absolute URL; ("", "", url) for an origin-form one."""
    if url.startswith("/"):
        return "", "", url
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return scheme, authority, slash + path


def _expects_continue(headers: Sequence[tuple[str, str]]) -> bool:
    return any(k.lower() == "expect" and "100-continue" in v.lower() for k, v in headers)


def _pieces(body: bytes) -> list[bytes]:
    return [body[i:i + PIECE] for i in range(0, len(body), PIECE)]


class ProxyClient:
    """A client connection to the proxy over ``protocol`` (one of PROTOCOLS)."""

    protocol: str
    #: The address of the listener it is connected to (for a request to the proxy itself).
    address: tuple[str, int]

    def request(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
                body: Optional[bytes] = None, chunked: bool = False,
                timeout: float = LIMIT, expect_wait: float = EXPECT_WAIT) -> Reply:
        """Send one request and read its answer: ``begin(...).reply()``."""
        return self.begin(method, url, headers, body, chunked, timeout,
                          expect_wait).reply(timeout)

    def begin(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
              body: Optional[bytes] = None, chunked: bool = False,
              timeout: float = LIMIT, expect_wait: float = EXPECT_WAIT) -> "Pending":
        """Send one request; its answer is read by the Pending's ``reply()``, and
        ``wait_for(marker)`` waits until the answer's bytes so far hold ``marker`` (to
        act at a point in the middle of an answer).

        ``url`` is absolute (``http://host:port/path``), or a path alone for origin-form (a
        request to the proxy itself). ``body`` goes with a Content-Length (HTTP/2: a
        content-length field), or with ``chunked`` as HTTP/1.1 chunks (HTTP/2: DATA frames
        and no length). With ``Expect: 100-continue`` among ``headers``, the client waits
        as curl does: it sends the body at a 100, or after ``expect_wait`` seconds with no
        answer, and never after a final answer. The body is sent while the answer is read,
        so an answer that comes before the whole body (a 413) is read as such.
        """
        raise NotImplementedError

    def closed_by_proxy(self, timeout: float = LIMIT) -> bool:
        """Whether the proxy ends the connection with nothing more said (HTTP/2: a GOAWAY
        at most): bounded, a connection still open after ``timeout`` fails the test."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Pending:
    """A request sent, its answer not read yet."""

    def __init__(self, sender: Optional[gevent.Greenlet] = None) -> None:
        #: Sends the request body while the answer is read.
        self.sender = sender

    def wait_for(self, marker: bytes, timeout: float = LIMIT) -> None:
        """Wait until the bytes of the answer that came so far (HTTP/1.1: as sent, head
        included; HTTP/2: the DATA) contain ``marker``; AssertionError if the answer
        ended, or ``timeout`` passed, first."""
        raise NotImplementedError

    def reply(self, timeout: float = LIMIT) -> Reply:
        try:
            return self._read(timeout)
        finally:
            if self.sender is not None:
                # The answer came: the body went up before it, or it never will (a 413).
                self.sender.join(timeout=0 if self.sender.dead else 1)
                self.sender.kill()

    def _read(self, timeout: float) -> Reply:
        raise NotImplementedError


class HTTP1Client(ProxyClient):
    """HTTP/1.1 on one connection (plain, or TLS when ``sock`` is an SSLSocket); requests
    one after the other on it, as a keep-alive client sends them."""

    def __init__(self, sock: socket.socket, protocol: str, address: tuple[str, int]) -> None:
        self.sock = sock
        self.protocol = protocol
        self.address = address
        #: Bytes received and not read as an answer yet.
        self.buf = b""
        self.eof = False
        #: The connection was reset rather than closed.
        self.was_reset = False

    # -- sending ----------------------------------------------------------------------------

    def head_bytes(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
                   body: Optional[bytes] = None, chunked: bool = False,
                   version: str = "HTTP/1.1") -> bytes:
        """The request head ``request`` sends: Host from the URL unless ``headers`` has one,
        then ``headers``, then the framing of ``body``."""
        _, authority, _ = _split_url(url)
        lines = [f"{method} {url} {version}"]
        if not any(k.lower() == "host" for k, _ in headers):
            lines.append(f"Host: {authority or '%s:%d' % self.address}")
        lines += [f"{k}: {v}" for k, v in headers]
        if body is not None:
            lines.append("Transfer-Encoding: chunked" if chunked
                         else f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _send_body(self, body: bytes, chunked: bool) -> None:
        try:
            for piece in _pieces(body):
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                self.sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the proxy answered and closed before the whole body: the answer tells

    def begin(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
              body: Optional[bytes] = None, chunked: bool = False,
              timeout: float = LIMIT, expect_wait: float = EXPECT_WAIT,
              version: str = "HTTP/1.1") -> Pending:
        """As ProxyClient.begin; ``version`` is the request line's (HTTP/1.0, say)."""
        self.sock.settimeout(timeout)
        self.sock.sendall(self.head_bytes(method, url, headers, body, chunked, version))
        pending = _HTTP1Pending(self, method)
        if body is not None and _expects_continue(headers) and self._head_within(expect_wait):
            first = self.read(method, timeout, interim_alone=True)
            if first.status >= 200 or first.status == 0:
                pending.early = first  # a final answer: the body is never sent
                return pending
            pending.interim = first.interim
        if body is not None:
            pending.sender = gevent.spawn(self._send_body, body, chunked)
        return pending

    def request(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
                body: Optional[bytes] = None, chunked: bool = False,
                timeout: float = LIMIT, expect_wait: float = EXPECT_WAIT,
                version: str = "HTTP/1.1") -> Reply:
        """As ProxyClient.request; ``version`` is the request line's (HTTP/1.0, say)."""
        return self.begin(method, url, headers, body, chunked, timeout, expect_wait,
                          version).reply(timeout)

    # -- reading ----------------------------------------------------------------------------

    def _head_within(self, seconds: float) -> bool:
        """Whether a whole answer head came within ``seconds``."""
        with gevent.Timeout(seconds, False):
            return self._until(lambda: b"\r\n\r\n" in self.buf, seconds + 1)
        return False

    def _fill(self, timeout: float) -> bool:
        """Read more; False at the end of the connection (a FIN, or a reset)."""
        if self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            piece = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            self.was_reset = True
            piece = b""
        if not piece:
            self.eof = True
            return False
        self.buf += piece
        return True

    def read(self, method: str = "GET", timeout: float = LIMIT,
             interim_alone: bool = False) -> Reply:
        """The next answer on the connection: interim ones, then the final one and its body
        (not the bytes of a 101's other protocol). ``interim_alone``: return after the first
        interim answer, as its own Reply (with that status)."""
        interim: list[tuple[int, Fields]] = []
        with gevent.Timeout(timeout, AssertionError("no whole answer in time")):
            while True:
                while b"\r\n\r\n" not in self.buf:
                    if not self._fill(timeout):
                        return Reply(0, head=self.buf, interim=interim, closed=True)
                head, _, self.buf = self.buf.partition(b"\r\n\r\n")
                status, fields = _parse_head(head)
                if 100 <= status < 200 and status != 101:
                    interim.append((status, fields))
                    if interim_alone:
                        return Reply(status, fields, head=head, interim=interim)
                    continue
                reply = Reply(status, fields, head=head, interim=interim)
                self._read_body(reply, method, timeout)
                if not reply.closed and "close" in (reply.field("connection") or "").lower():
                    reply.closed = self.closed_by_proxy(timeout)
                return reply

    def _read_body(self, reply: Reply, method: str, timeout: float) -> None:
        status = reply.status
        if method == "HEAD" or status in (101, 204, 304) or (
                method == "CONNECT" and 200 <= status < 300):
            reply.complete = True
            return
        if "chunked" in (reply.field("transfer-encoding") or "").lower():
            reply.body, reply.complete = self._chunked(timeout)
        elif reply.field("content-length") is not None:
            length = int(reply.field("content-length") or "")
            while len(self.buf) < length and self._fill(timeout):
                pass
            reply.body, self.buf = self.buf[:length], self.buf[length:]
            reply.complete = len(reply.body) == length
        else:  # the body ends at the close: whole if that was a FIN
            while self._fill(timeout):
                pass
            reply.body, self.buf = self.buf, b""
            reply.complete = not self.was_reset
        reply.closed = self.eof

    def _until(self, ready: Any, timeout: float) -> bool:
        """Read until ``ready()``; False if the connection ended first."""
        while not ready():
            if not self._fill(timeout):
                return False
        return True

    def _chunked(self, timeout: float) -> tuple[bytes, bool]:
        body = b""
        while True:
            if not self._until(lambda: b"\r\n" in self.buf, timeout):
                return body, False
            line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:  # the trailer section, up to its empty line
                if not self._until(lambda: self.buf.startswith(b"\r\n")
                                   or b"\r\n\r\n" in self.buf, timeout):
                    return body, False
                self.buf = (self.buf[2:] if self.buf.startswith(b"\r\n")
                            else self.buf.partition(b"\r\n\r\n")[2])
                return body, True
            if not self._until(lambda end=size + 2: len(self.buf) >= end, timeout):
                body, self.buf = body + self.buf[:size], b""
                return body, False
            assert self.buf[size:size + 2] == b"\r\n", f"bad chunk: {self.buf[:size + 2]!r}"
            body, self.buf = body + self.buf[:size], self.buf[size + 2:]

    def wait_for(self, marker: bytes, timeout: float = LIMIT) -> None:
        """Read until the bytes received and not read as an answer yet (after a 101: the
        other protocol's) contain ``marker``; AssertionError if the connection ended, or
        ``timeout`` passed, first."""
        with gevent.Timeout(timeout, AssertionError(f"{marker!r} did not come in time")):
            came = self._until(lambda: marker in self.buf, timeout)
        assert came, f"the connection ended before {marker!r} came: {self.buf[-200:]!r}"

    def closed_by_proxy(self, timeout: float = LIMIT) -> bool:
        with gevent.Timeout(timeout, AssertionError("the proxy kept the connection open")):
            while self._fill(timeout):
                pass
        return self.buf == b""

    def close(self) -> None:
        self.sock.close()


class _HTTP1Pending(Pending):
    def __init__(self, client: HTTP1Client, method: str) -> None:
        super().__init__()
        self.client = client
        self.method = method
        self.interim: list[tuple[int, Fields]] = []
        #: A final answer read already (to a request that expected 100-continue).
        self.early: Optional[Reply] = None

    def wait_for(self, marker: bytes, timeout: float = LIMIT) -> None:
        self.client.wait_for(marker, timeout)

    def _read(self, timeout: float) -> Reply:
        if self.early is not None:
            return self.early
        reply = self.client.read(self.method, timeout)
        reply.interim = self.interim + reply.interim
        return reply


def _parse_head(head: bytes) -> tuple[int, Fields]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/"), f"not an answer: {head!r}"
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    return int(parts[1]), fields


class H2RequestClient(ProxyClient):
    """Requests as streams of one HTTP/2 connection (an H2Client, ``.h2``)."""

    protocol = "h2"

    def __init__(self, client: H2Client, address: tuple[str, int]) -> None:
        self.h2 = client
        self.address = address

    def fields(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
               body: Optional[bytes] = None, chunked: bool = False) -> Fields:
        """The header block ``request`` sends: the pseudo-fields from ``url`` (origin-form:
        https and the proxy's own authority), ``headers`` with names in lower case, and a
        content-length for ``body`` unless ``chunked``."""
        scheme, authority, path = _split_url(url)
        if not authority:
            scheme, authority = "https", "%s:%d" % self.address
        fields = [(":method", method), (":scheme", scheme), (":authority", authority),
                  (":path", path or "/")]
        fields += [(k.lower(), v) for k, v in headers]
        if body is not None and not chunked:
            fields.append(("content-length", str(len(body))))
        return fields

    def begin(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (),
              body: Optional[bytes] = None, chunked: bool = False,
              timeout: float = LIMIT, expect_wait: float = EXPECT_WAIT) -> Pending:
        stream = self.h2.open(self.fields(method, url, headers, body, chunked),
                              end=body is None)
        pending = _H2Pending(self, stream)
        if body is not None:
            if _expects_continue(headers):
                try:
                    status = stream.wait_interim_or_head(expect_wait)
                except ConnectionResetError:
                    return pending
                if status is not None and status >= 200:
                    return pending  # a final answer: the body is never sent
            pending.sender = gevent.spawn(self._send_body, stream, body, timeout)
        return pending

    @staticmethod
    def _send_body(stream: H2ClientStream, body: bytes, timeout: float) -> None:
        try:
            pieces = _pieces(body) or [b""]
            for number, piece in enumerate(pieces):
                stream.send(piece, end=number == len(pieces) - 1, timeout=timeout)
        except (h2.exceptions.ProtocolError, OSError, AssertionError):
            pass  # reset, or answered without reading it all: the reply tells

    def reply(self, stream: H2ClientStream, timeout: float = LIMIT) -> Reply:
        """The answer on ``stream``, read to its end or its reset."""
        reply = Reply(0)
        try:
            reply.status = stream.wait_head(timeout)
        except ConnectionResetError:
            pass
        else:
            pieces = []
            with gevent.Timeout(timeout, AssertionError("stream not ended in time")):
                while True:
                    try:
                        piece = stream.recv(timeout)
                    except ConnectionResetError:
                        break
                    if not piece:
                        reply.complete = True
                        break
                    pieces.append(piece)
            reply.body = b"".join(pieces)
            reply.headers = _plain(stream.headers or [])
        reply.interim = [(int(dict(f)[":status"]), _plain(f)) for f in stream.interim]
        reply.trailers = stream.trailers
        reply.reset = stream.reset
        reply.closed = self.h2.goaway is not None or self.h2.error is not None
        return reply

    def closed_by_proxy(self, timeout: float = LIMIT) -> bool:
        self.h2.reader.join(timeout)
        assert self.h2.reader.dead, "the proxy kept the connection open"
        return all(s.ended or s.reset is not None for s in self.h2.streams.values())

    def close(self) -> None:
        self.h2.close()


class _H2Pending(Pending):
    def __init__(self, client: H2RequestClient, stream: H2ClientStream) -> None:
        super().__init__()
        self.client = client
        self.stream = stream

    def wait_for(self, marker: bytes, timeout: float = LIMIT) -> None:
        self.stream.wait_for(marker, timeout)

    def _read(self, timeout: float) -> Reply:
        return self.client.reply(self.stream, timeout)


def _plain(fields: Fields) -> Fields:
    return [(k, v) for k, v in fields if not k.startswith(":")]


def open_client(proxy: Union["Proxy", Any], protocol: str, ca_file: str = "",
                timeout: float = LIMIT, **h2_options: Any) -> ProxyClient:
    """A client connection to ``proxy`` (a kit Proxy, started from ``protocol_ini``) over
    ``protocol``; ``ca_file`` trusts the TLS listener's certificate. ``h2_options`` go to
    H2Client (``validate=False``, ``window=``)."""
    if protocol == "http1":
        sock = socket.create_connection(proxy.address, timeout=timeout)
        return HTTP1Client(sock, protocol, proxy.address)
    address = proxy.tls_address
    if protocol == "h2":
        return H2RequestClient(H2Client(address, ca_file, timeout=timeout, **h2_options),
                               address)
    if protocol != "http1-tls":
        raise ValueError(f"unknown client protocol {protocol!r}; one of {PROTOCOLS}")
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(address, timeout=timeout)
    try:
        sock = context.wrap_socket(raw, server_hostname=address[0])
    except BaseException:
        raw.close()
        raise
    if sock.selected_alpn_protocol() not in (None, "http/1.1"):
        sock.close()
        raise AssertionError(f"ALPN chose {sock.selected_alpn_protocol()}, not http/1.1")
    return HTTP1Client(sock, protocol, address)


def protocol_ini(protocol: str, tls_files: Optional["TLSFiles"] = None, core: str = "",
                 extra: str = "", **tls: str) -> str:
    """A proxy configuration with the listener ``protocol`` needs: a plain one for http1; a
    ``tls://`` one (``tls_files``' certificate, ``tls`` options) for http1-tls, with
    ``http2 = on`` for h2. ``core`` lines go in ``[geproxy]``, ``extra`` sections after."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown client protocol {protocol!r}; one of {PROTOCOLS}")
    if protocol == "http1":
        return "[geproxy]\nlisten = 127.0.0.1:0\n" + core + extra
    assert tls_files is not None, "a TLS listener needs tls_files"
    if protocol == "h2":
        tls = {"http2": "on", **tls}
    return ("[geproxy]\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n" + core
            + tls_files.ini(**tls) + extra)
