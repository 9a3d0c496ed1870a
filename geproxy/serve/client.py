"""One accepted client connection, before and around the protocol it speaks.

accept -> [PROXY header] -> on_connect -> [TLS handshake] -> HTTP/1.1 (http1.py) or HTTP/2
(http2.py), chosen by ALPN in the server -> on_disconnect. This module does the part
before the protocol, and the client's bytes in and out for HTTP/1.1.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any, Optional

from ..errors import ClientGone, Denied, ProxyError
from ..models import Context, Record
from ..net.sockets import IdleWait, send_all, still_idle
from ..protocol import proxyproto
from .generation import Generation
from .log import ConnLogger

__all__ = ["ClientConnection", "refused"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.connection")

RECV_SIZE = 64 * 1024


class ClientConnection:
    """One accepted client connection: its socket (a TLSStream after a handshake), its
    context, the generation that accepted it, and what on_connect said of it."""

    def __init__(self, server: Any, gen: Generation, sock: socket.socket,
                 address: tuple[str, int], local: tuple[str, int], tls: bool = False) -> None:
        #: The ProxyServer: its registries, its generation in force, its stop.
        self.server = server
        #: Accepted on a TLS listener: ``sock`` becomes a TLSStream after the handshake.
        self.tls = tls
        #: The configuration and plugins the connection was accepted with, to its end: its
        #: own hooks (on_connect, on_disconnect, on_tls_handshake), its TLS and PROXY
        #: protocol settings. The server holds one use of it for the connection. Each
        #: request is served by the generation in force when it came (transaction.py).
        self.gen = gen
        self.sock = sock
        self.ctx = Context(client_addr=(address[0], address[1]), server_addr=local,
                           config=gen.config, conn_id=server.next_conn_id(),
                           identity=gen.hooks)
        self.log = ConnLogger(log, self.ctx)
        #: Bytes read from the client and not yet consumed (pipelined requests, bodies).
        self.buf = b""
        #: The refusal ``on_connect`` gave (not silent): the first request is answered with
        #: it, whatever it asks, and the connection closes.
        self.refusal: Optional[ProxyError] = None
        #: The TLS handshake found plain HTTP: the caller answers it in clear text.
        self.plain_http = False
        #: The transaction whose tunnel relays on with no greenlet: the connection then
        #: ends with that tunnel (``Transaction._end_detached``), not with its greenlet.
        self.detached: Optional[Any] = None
        #: Bounds the waits of this connection's keep-alive path by idle_timeout with one
        #: reused timer (sockets.IdleWait): the next request's, the upstream's answer's.
        self.idle_wait = IdleWait(gen.config.core["idle_timeout"])

    # -- before the protocol ------------------------------------------------------------

    def open(self) -> bool:
        """on_connect and the TLS handshake; False when the connection ends there (logged,
        and on record where a policy refused it)."""
        ctx = self.ctx
        try:
            denied = self.gen.hooks.on_connect(ctx)
            if denied is not None:
                raise denied if isinstance(denied, ProxyError) else Denied("on_connect")
        except ProxyError as exc:
            if getattr(exc, "silent", False):
                # A firewall's drop, on request: no handshake, no byte read or sent.
                self.log.info("refused at connect, closed: %s", exc.detail or exc.error)
                self.write_record(refused(Record(ctx), exc))
                return False
            # Told, not dropped: the client learns that policy refused it (a 403 rather
            # than curl's "Empty reply from server"), once its first head is read.
            self.refusal = exc
        except Exception:
            self.log.exception("on_connect failed; closing")
            self.write_record(Record(ctx, error="proxy_internal_error", close_reason="error"))
            return False
        if self.tls and not self._handshake():
            if self.refusal is not None:
                self.refused_unasked(Record(ctx))
            return False
        return True

    def refused_unasked(self, record: Record) -> None:
        """A client refused at connect that sent no request to answer (it closed, kept
        silent for header_timeout, or failed its TLS handshake): the refusal is on record
        all the same, with status 0."""
        assert self.refusal is not None
        self.log.info("refused at connect: %s (no request came to answer)",
                      self.refusal.detail or self.refusal.error)
        self.write_record(refused(record, self.refusal))

    def write_record(self, record: Record) -> None:
        """The record of what ended before any request was served: on_close."""
        record.finish()
        self.gen.hooks.on_close(self.ctx, record)

    def _handshake(self) -> bool:
        """The TLS handshake of a TLS listener's connection; False (logged, counted, and
        the connection closed) when it failed."""
        from ..net import tls  # imports ssl: only for a TLS listener's connections

        options = self.gen.config["tls"]
        stream = tls.TLSStream(self.sock, self.gen.tls_context)
        # Bytes read past a PROXY protocol header are the start of the handshake.
        stream.feed(self.buf)
        self.buf = b""
        try:
            self.ctx.tls = stream.handshake(options["handshake_timeout"],
                                            options["identity_from"])
        except tls.HandshakeFailed as exc:
            self.log.info("TLS handshake failed (%s): %s", exc.reason, exc.detail)
            self.gen.hooks.on_tls_handshake(self.ctx, exc.reason)
            self.plain_http = exc.reason == "plain_http"
            return False
        self.sock = stream  # type: ignore[assignment]
        info = self.ctx.tls
        if info.client_subject is not None and info.identity is None:
            self.log.info("client certificate %s names no user (identity_from = %s)",
                          info.client_subject, options["identity_from"])
        self.gen.hooks.on_tls_handshake(self.ctx, None)
        return True

    def read_proxy_header(self) -> bool:
        """Take the client's address from the load balancer's PROXY header; False (close,
        say nothing) when the sender may not send one or the header is bad or late."""
        peer: Any = ipaddress.ip_address(self.ctx.client_addr[0])
        peer = getattr(peer, "ipv4_mapped", None) or peer
        if not any(peer in network for network in self.gen.proxy_protocol_from):
            self.log.warning("refused: not in proxy_protocol_from")
            return False
        deadline = self.ctx.started + self.gen.config.core["header_timeout"]
        data = b""
        try:
            while True:
                self.sock.settimeout(max(deadline - time.time(), 0.001))
                piece = self.sock.recv(RECV_SIZE)
                if not piece:
                    return False
                data += piece
                found = proxyproto.parse(data, self.gen.proxy_protocol)
                if found is not None:
                    break
        except proxyproto.ProxyHeaderError as exc:
            self.log.warning("bad PROXY header: %s", exc)
            return False
        except OSError as exc:  # a timeout or a reset before the header was whole
            self.log.info("no PROXY header: %s", exc)
            return False
        length, client = found
        if client is not None:
            self.ctx.client_addr = client
        self.buf = data[length:]
        return True

    # -- the client's bytes, for HTTP/1.1 -------------------------------------------------

    def recv(self) -> bytes:
        """The next bytes from the client (buffered ones first); b"" when it closed.

        A client that sends nothing for idle_timeout, or resets, ends the connection.
        """
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        try:
            return self.sock.recv(RECV_SIZE)
        except socket.timeout:
            raise ClientGone("client sent nothing for idle_timeout") from None
        except OSError as exc:
            raise ClientGone(f"reading from the client: {exc}") from None

    def send(self, data: bytes) -> None:
        try:
            send_all(self.sock, data)
        except OSError as exc:
            raise ClientGone(f"writing to the client: {exc}") from None

    def sent_more(self) -> bool:
        """Whether the client sent anything past what was parsed: bytes in ``buf``, or
        bytes (or its close) waiting to be read. Asked as late as possible, just before an
        answer goes out; bytes still on their way then cannot be told from a next request
        sent after the answer."""
        if self.buf:
            return True
        pending = getattr(self.sock, "pending", None)  # a TLSStream's decrypted bytes
        if pending is not None and pending():
            return True
        return not still_idle(self.sock)


def refused(record: Record, refusal: ProxyError) -> Record:
    """``record`` marked with a refusal at connect: its error, its rule, close reason
    ``denied``. Its status stays 0 unless an answer is sent."""
    record.error = refusal.error
    record.rule = getattr(refusal, "rule", None)
    record.close_reason = "denied"
    return record
