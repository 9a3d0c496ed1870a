"""TLS between clients and the proxy: the HTTPS proxy listener and client certificates.

A TLS listener (``listen = tls://host:port``) wraps each accepted connection in a
:class:`TLSStream`. The TLS state machine runs on memory buffers (``ssl.MemoryBIO``) and the
stream does the socket I/O itself, so one session serves both the connection's greenlet
(calls that wait, bounded by the socket's timeout, as a socket's do) and the relay of a
tunnel, whose callbacks run in the hub (``nowait``: calls that never wait). Owning the I/O
also makes a half-close possible: the proxy sends its close_notify and still reads what the
client sends after it.

Imported only when a TLS listener is configured: ``ssl`` comes after gevent's patching.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, Mapping, Optional

from gevent import monkey
from gevent.lock import Semaphore

from ..errors import ConfigError
from ..models import TLSInfo
from .sockets import raw_socket, send_all

__all__ = ["HandshakeFailed", "TLSStream", "server_context", "remember_server_names", "identity_of"]

RECV_SIZE = 64 * 1024

#: OpenSSL reasons, as ``ssl.SSLError.reason`` names them, and what a failed handshake is
#: counted as. Anything else is "error".
_REASONS = {
    "CERTIFICATE_VERIFY_FAILED": "client_certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "client_certificate",
    "UNSUPPORTED_PROTOCOL": "protocol",
    "WRONG_VERSION_NUMBER": "protocol",
    "VERSION_TOO_LOW": "protocol",
    "NO_SHARED_CIPHER": "protocol",
    "NO_PROTOCOLS_AVAILABLE": "protocol",
    "UNKNOWN_PROTOCOL": "protocol",
    "NO_APPLICATION_PROTOCOL": "protocol",
    "TLSV1_ALERT_UNKNOWN_CA": "server_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "server_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "server_certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "server_certificate",
    "HTTP_REQUEST": "plain_http",
    "HTTPS_PROXY_REQUEST": "plain_http",
}

#: Short names of the subject's attributes, as in "CN=svc,O=Example".
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "emailAddress": "emailAddress", "domainComponent": "DC"}


class HandshakeFailed(Exception):
    """The handshake did not complete; ``reason`` is what it is counted as (timeout, eof,
    client_certificate, server_certificate (the client refused the proxy's), protocol,
    plain_http, error), ``detail`` says it in words."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def server_context(tls: Mapping[str, Any], path: str, http2: bool) -> ssl.SSLContext:
    """The TLS listeners' context from the ``[tls]`` section; ConfigError names the key at
    fault. Called at start and at each reload, so a renewed certificate is read again."""

    def fault(key: str, message: str) -> ConfigError:
        return ConfigError(message, path=path, section="tls", key=key)

    if not tls["certificate"]:
        raise fault("certificate", "a tls:// listener needs a certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls["min_version"] == "TLSv1.3"
                               else ssl.TLSVersion.TLSv1_2)
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # A client that closes its TCP side without close_notify ends its direction, as a FIN
    # does on a plain listener; OpenSSL would otherwise fail the whole session, and the
    # answer still owed to the client could not be sent.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    # OpenSSL's error does not say which file it could not read: each is tried first.
    for which in ("certificate", "key"):
        if tls[which]:
            try:
                with open(tls[which], "rb"):
                    pass
            except OSError as exc:
                raise fault(which, f"cannot read {tls[which]}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(tls["certificate"], tls["key"] or None)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise fault("key" if tls["key"] else "certificate",
                        f"not a certificate and its key: {exc.reason or exc}") from None
        raise fault("certificate", f"cannot read {tls['certificate']}: {exc.strerror or exc}"
                    ) from None
    if tls["ciphers"]:
        try:
            context.set_ciphers(tls["ciphers"])
        except ssl.SSLError:
            raise fault("ciphers", f"no cipher matches {tls['ciphers']!r}") from None
    if tls["client_cert"] != "off":
        if not tls["client_ca"]:
            raise fault("client_ca", f"client_cert = {tls['client_cert']} needs client_ca")
        try:
            context.load_verify_locations(cafile=tls["client_ca"])
        except OSError as exc:
            detail = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
            raise fault("client_ca", f"cannot load {tls['client_ca']}: {detail or exc}") from None
        context.verify_mode = (ssl.CERT_REQUIRED if tls["client_cert"] == "required"
                               else ssl.CERT_OPTIONAL)
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    remember_server_names(context)
    return context


def remember_server_names(context: ssl.SSLContext) -> None:
    """Have every session of ``context`` keep the server name (SNI) its client asked for,
    as ``geproxy_server_name`` (``TLSStream.info`` reads it).

    Set through the standard library's own ``sni_callback`` (the C attribute, which its
    ``SSLContext`` class inherits as it is), not through the context's: gevent's patched
    ``SSLContext`` wraps every SNI callback to hand it gevent's ``SSLSocket`` in place of
    the session, and a session of ``wrap_bio`` (an ``SSLObject``, the one ``TLSStream``
    uses) has none, so the wrapped callback fails and the handshake with it. Nor can the
    context be the standard library's class: under gevent's patching its setters
    (``options``, ``minimum_version``) recurse through the patched module. If either
    library changes, tests/test_tls.py's test_the_server_name_the_client_asked_for_is_kept
    fails."""
    stdlib_context: Any = monkey.get_original("ssl", "SSLContext")
    stdlib_context.sni_callback.__set__(context, _remember_server_name)


def _remember_server_name(obj: Any, name: Optional[str], context: Any) -> None:
    obj.geproxy_server_name = name


def identity_of(cert: Mapping[str, Any], source: str) -> Optional[str]:
    """The user a verified certificate (``getpeercert()``) names: its subject's common name
    (``cn``), or its first URI or DNS subject alternative name (``san_uri``, ``san_dns``).
    None when it has none that is printable and has no space (a user name goes into logs)."""
    found: Optional[str] = None
    if source == "cn":
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    found = value  # the last one: the most specific
    else:
        kind = "URI" if source == "san_uri" else "DNS"
        found = next((value for key, value in cert.get("subjectAltName", ()) if key == kind),
                     None)
    if not found or not found.isprintable() or any(c.isspace() for c in found):
        return None
    return found


def _subject(cert: Mapping[str, Any]) -> Optional[str]:
    parts = [f"{_SHORT.get(key, key)}={value}" for rdn in cert.get("subject", ())
             for key, value in rdn]
    return ",".join(parts) or None


class TLSStream:
    """A client's TLS connection, used as its socket is: ``recv``, ``send``,
    ``settimeout``, ``shutdown``, ``close``; anything else goes to the socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._raw = raw_socket(sock)  # its calls never wait
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=True)
        #: Ciphertext made by the calls that never wait and not yet taken by the socket.
        self.backlog = b""
        self._sending = Semaphore()
        self._notified = False
        #: The same session for the relay's callbacks, which must never wait.
        self.nowait = _NoWait(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    # -- the handshake ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes already read from the socket (past a PROXY protocol header), first."""
        if data:
            self._in.write(data)

    def handshake(self, timeout: float, identity_from: str) -> TLSInfo:
        """Complete the handshake within ``timeout`` seconds; HandshakeFailed if not."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                self.sock.settimeout(left)
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    raise HandshakeFailed("eof", "closed by the client during the handshake")
                self._in.write(data)
            self._flush()  # the last flight and the session tickets
        except socket.timeout:
            raise HandshakeFailed("timeout", "no handshake within handshake_timeout") from None
        except ssl.SSLError as exc:
            self._send_alert()
            reason = str(exc.reason or "")
            if isinstance(exc, ssl.SSLCertVerificationError):
                detail = f"client certificate refused: {exc.verify_message}"
            elif isinstance(exc, ssl.SSLEOFError):
                raise HandshakeFailed("eof", "closed by the client during the handshake"
                                      ) from None
            else:
                detail = reason.lower().replace("_", " ") or str(exc)
            raise HandshakeFailed(_REASONS.get(reason, "error"), detail) from None
        except OSError as exc:
            raise HandshakeFailed("eof", f"during the handshake: {exc}") from None
        return self.info(identity_from)

    def _send_alert(self) -> None:
        """The alert OpenSSL wrote for a failed handshake goes out if the socket takes it
        at once, so the client learns why (unknown CA, say) instead of seeing a reset."""
        try:
            self._raw.send(self._out.read())
        except OSError:
            pass

    def info(self, identity_from: str) -> TLSInfo:
        cert = self.obj.getpeercert() or {}
        cipher = self.obj.cipher()
        return TLSInfo(
            version=self.obj.version() or "",
            cipher=cipher[0] if cipher else "",
            alpn=self.obj.selected_alpn_protocol(),
            server_name=getattr(self.obj, "geproxy_server_name", None),
            client_subject=_subject(cert) if cert else None,
            identity=identity_of(cert, identity_from) if cert else None,
        )

    # -- what a socket does, for the connection's greenlet --------------------------------

    def recv(self, size: int) -> bytes:
        """Plaintext, b"" at the client's close_notify or its TCP close. Waits as the
        socket's recv does (its timeout raises socket.timeout)."""
        while True:
            data = self.nowait.take(size)
            if data is not None:
                return data
            if self.backlog or self._out.pending:
                self._flush()
            raw = self.sock.recv(RECV_SIZE)
            if raw:
                self._in.write(raw)
            else:
                self._in.write_eof()

    def send(self, data: bytes) -> int:
        """Send all of ``data`` (a TLS record is not taken in part); waits as ``sendall``."""
        if data:
            self.obj.write(data)
        self._flush()
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.send(data)

    def _flush(self) -> None:
        # One writer at a time: the reader may owe the client a reply (a key update) while
        # another greenlet writes (HTTP/2's writer); two send loops would mix their bytes.
        with self._sending:
            data = self.backlog + self._out.read()
            self.backlog = b""
            if data:
                send_all(self.sock, data)

    def pending(self) -> int:
        """Bytes received and not yet read as plaintext (no socket call needed for them)."""
        return self.obj.pending() + self._in.pending

    def shutdown(self, how: int) -> None:
        if how == socket.SHUT_WR:
            self.nowait.close_notify()
        self.sock.shutdown(how)

    def close(self) -> None:
        """Say close_notify if the socket takes it at once, then close."""
        if self.sock.fileno() != -1:
            try:
                self.nowait.close_notify()
            except OSError:
                pass
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, value: Optional[float]) -> None:
        self.sock.settimeout(value)

    def gettimeout(self) -> Optional[float]:
        return self.sock.gettimeout()


class _NoWait:
    """The stream's calls for the relay's hub callbacks: like a non-blocking socket's,
    BlockingIOError instead of a wait. ``send`` takes all plaintext it is given once it
    takes any; ciphertext the socket did not take waits in ``backlog`` (``blocked``)."""

    __slots__ = ("stream",)

    def __init__(self, stream: TLSStream) -> None:
        self.stream = stream

    def take(self, size: int) -> Optional[bytes]:
        """Plaintext already received, up to about ``size`` (never a record in part: a
        close_notify sent later must not find one, it would drop it); b"" at the end;
        None when more must come from the socket."""
        obj = self.stream.obj
        out: list[bytes] = []
        got = 0
        try:
            while got < size:
                piece = obj.read(size - got)
                if not piece:
                    break
                out.append(piece)
                got += len(piece)
            left = obj.pending()
            if left:
                out.append(obj.read(left))
        except ssl.SSLWantReadError:
            if not out:
                return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            pass  # the end: what came before it first, then b""
        return b"".join(out)

    def recv(self, size: int) -> bytes:
        stream = self.stream
        while True:
            data = self.take(size)
            if data is not None:
                if stream._out.pending:  # a reply the session owes (a key update)
                    stream.backlog += stream._out.read()
                    self._push()
                return data
            raw = stream._raw.recv(RECV_SIZE)  # BlockingIOError: nothing yet
            if raw:
                stream._in.write(raw)
            else:
                stream._in.write_eof()

    def buffered(self) -> bool:
        """Whether plaintext can be read without the socket saying it is readable."""
        return self.stream.pending() > 0

    @property
    def blocked(self) -> bool:
        return bool(self.stream.backlog)

    def send(self, data: Any) -> int:
        stream = self.stream
        if stream.backlog and not self._push():
            raise BlockingIOError()
        if data:
            stream.obj.write(data)
            stream.backlog = stream._out.read()
            self._push()
        return len(data)

    def _push(self) -> bool:
        """Send what the backlog holds as far as the socket takes it; True when all went."""
        stream = self.stream
        try:
            sent = stream._raw.send(stream.backlog)
        except BlockingIOError:
            return False
        stream.backlog = stream.backlog[sent:]
        return not stream.backlog

    def close_notify(self) -> None:
        """Send close_notify (once): the client's read side ends, its write side stays."""
        stream = self.stream
        if stream._notified:
            return
        stream._notified = True
        # OpenSSL's second shutdown step reads for the peer's close_notify and would drop
        # records received meanwhile: it must find the input empty. They come back after.
        unread = stream._in.read()
        try:
            stream.obj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: sent; the client's close_notify is still to come
        if unread:
            stream._in.write(unread)
        stream.backlog += stream._out.read()
        self._push()

    def shutdown(self, how: int) -> None:
        if how == socket.SHUT_WR:
            self.close_notify()
        self.stream._raw.shutdown(how)
