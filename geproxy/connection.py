"""The per-connection handler: the way of one client connection, and nothing else.

accept -> on_connect -> [read head -> on_request -> local | CONNECT | forward]* -> close.
Everything that decides is a hook; everything that moves bytes is in tunnel.py or forward.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any, Optional

import gevent

from . import forward, http11, proxyproto
from . import tunnel as relaying
from .errors import (
    ClientError,
    ClientGone,
    Denied,
    DestinationProhibited,
    HeaderTimeout,
    InternalError,
    LoopDetected,
    ParentProhibited,
    ProxyError,
)
from .local import call_wsgi
from .log import ConnLogger
from .models import Context, Headers, Record, Request, Response, Route
from .sockets import IdleWait, send_all, still_idle
from .static import content_type, docroot_file
from .upstream import connect, parent_connect

if TYPE_CHECKING:
    from .server import Generation, ProxyServer

__all__ = ["Connection"]

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024


class Connection:
    """One accepted client connection, served by one greenlet."""

    def __init__(self, server: "ProxyServer", gen: "Generation", sock: socket.socket,
                 address: tuple[str, int], local: tuple[str, int], tls: bool = False,
                 ctx: Optional[Context] = None) -> None:
        self.server = server
        #: Accepted on a TLS listener: ``sock`` becomes a TLSStream after the handshake.
        self.tls = tls
        #: The configuration and plugins the connection was accepted with, to its end: its
        #: own hooks (on_connect, on_disconnect, on_tls_handshake), its TLS and PROXY
        #: protocol settings. The server holds one use of it for the connection.
        self.conn_gen = gen
        #: Those of the request being served: the generation in force when it arrived, so
        #: a reload applies to the next request of a kept-alive connection (``follow``).
        self.gen = gen
        self.sock = sock
        self.settings = gen.config.core
        self.hooks = gen.hooks
        #: ``ctx`` is given for an HTTP/2 stream (h2stream.py): its connection's, copied.
        self.ctx = ctx or Context(client_addr=(address[0], address[1]), server_addr=local,
                                  config=gen.config, conn_id=server.next_conn_id())
        self.log = ConnLogger(log, self.ctx)
        #: Bytes read from the client and not yet consumed (pipelined requests, bodies).
        self.buf = b""
        #: Whether any byte of the current answer went to the client.
        self.answered = False
        #: The request or tunnel in flight (while it is in ``server.active``).
        self.record: Optional[Record] = None
        self.greenlet: Optional[gevent.Greenlet] = None
        #: The close reason given to a request cut by ``close()``.
        self.cut_reason = "shutdown"
        #: A tunnel relaying on its own, with no greenlet (see ``_tunnel``); the connection
        #: then ends in ``_end_detached``, not in ``handle``.
        self.detached: Optional[Any] = None
        #: Bounds the waits of this connection's keep-alive path by idle_timeout with one
        #: reused timer (sockets.IdleWait): the next request's, the upstream's answer's.
        self.idle_wait = IdleWait(gen.config.core["idle_timeout"])
        #: The refusal ``on_connect`` gave (not silent): the first request is answered with
        #: it, whatever it asks, and the connection closes (``_serve_one``).
        self.refusal: Optional[ProxyError] = None

    # -- the way of one connection ------------------------------------------------------

    def handle(self) -> None:
        ctx = self.ctx
        if self.conn_gen.proxy_protocol != "off" and not self._read_proxy_header():
            return
        try:
            self._serve()
        finally:
            self.idle_wait.close()
            if self.detached is None:
                self.conn_gen.hooks.on_disconnect(ctx)

    def follow(self, gen: "Generation") -> None:
        """Serve what comes next with ``gen``, the generation in force. The connection holds
        one use of its request's generation, when it is not its own (``let_go``)."""
        old = self.gen
        if gen is old:
            return
        gen.users += 1
        self.gen, self.settings, self.hooks = gen, gen.config.core, gen.hooks
        self.ctx.config = gen.config
        self.idle_wait.set_timeout(self.settings["idle_timeout"])
        if old is not self.conn_gen:
            self.server.release(old)

    def let_go(self) -> None:
        """The connection (or stream) ended: the use of its request's generation goes."""
        if self.gen is not self.conn_gen:
            self.server.release(self.gen)
            self.gen = self.conn_gen

    def _serve(self) -> None:
        ctx = self.ctx
        try:
            denied = self.conn_gen.hooks.on_connect(ctx)
            if denied is not None:
                raise denied if isinstance(denied, ProxyError) else Denied("on_connect")
        except ProxyError as exc:
            if getattr(exc, "silent", False):
                # A firewall's drop, on request: no handshake, no byte read or sent.
                self.log.info("refused at connect, closed: %s", exc.detail or exc.error)
                self._close_record(_refused(Record(ctx), exc))
                return
            # Told, not dropped: the client learns that policy refused it (a 403 rather
            # than curl's "Empty reply from server"), once its first head is read.
            self.refusal = exc
        except Exception:
            self.log.exception("on_connect failed; closing")
            self._close_record(Record(ctx, error="proxy_internal_error", close_reason="error"))
            return
        if self.tls and not self._handshake():
            if self.refusal is not None:
                self._refused_unasked(Record(ctx))
            return
        if ctx.tls is not None and ctx.tls.alpn == "h2":
            from .http2 import serve_h2  # the h2 package: only for connections that chose it

            serve_h2(self)
            if self.refusal is not None and ctx.requests == 0:  # no stream to answer on
                self._refused_unasked(Record(ctx))
            return
        while self._serve_one():
            pass

    def _refused_unasked(self, record: Record) -> None:
        """A client refused at connect that sent no request to answer (it closed, kept
        silent for header_timeout, or failed its TLS handshake): the refusal is on record
        all the same, with status 0."""
        assert self.refusal is not None
        self.log.info("refused at connect: %s (no request came to answer)",
                      self.refusal.detail or self.refusal.error)
        self._close_record(_refused(record, self.refusal))

    def _handshake(self) -> bool:
        """The TLS handshake of a TLS listener's connection; False (logged, counted, and
        the connection closed) when it failed."""
        from . import tls

        settings = self.conn_gen.config["tls"]
        stream = tls.TLSStream(self.sock, self.conn_gen.tls_context)
        # Bytes read past a PROXY protocol header are the start of the handshake.
        stream.feed(self.buf)
        self.buf = b""
        try:
            self.ctx.tls = stream.handshake(settings["handshake_timeout"],
                                            settings["identity_from"])
        except tls.HandshakeFailed as exc:
            self.log.info("TLS handshake failed (%s): %s", exc.reason, exc.detail)
            self.conn_gen.hooks.on_tls_handshake(self.ctx, exc.reason)
            if exc.reason == "plain_http":
                # As nginx does: a client that forgot https:// learns why, in clear text.
                self.sock.settimeout(1.0)
                error = ClientError("plain HTTP request sent to a TLS listener")
                try:
                    self.answer(self.error_response(error), Record(self.ctx), close=True)
                except ClientGone:
                    pass
            return False
        self.sock = stream  # type: ignore[assignment]
        info = self.ctx.tls
        if info.client_subject is not None and info.identity is None:
            self.log.info("client certificate %s names no user (identity_from = %s)",
                          info.client_subject, settings["identity_from"])
        self.conn_gen.hooks.on_tls_handshake(self.ctx, None)
        return True

    def _identify(self, request: Request) -> None:
        """The user a verified client certificate names is the request's user, as a
        Basic-authenticated name would be; a request that also carries Proxy-Authorization
        names two, and is refused rather than guessed at."""
        tls = self.ctx.tls
        if tls is None or tls.identity is None:
            return
        if "proxy-authorization" in request.headers:
            raise ClientError("Proxy-Authorization on a connection with a client certificate")
        self.ctx.user = tls.identity

    def _serve_one(self) -> bool:
        """Read and serve one request; True to read another on this connection."""
        record = Record(self.ctx)
        if self.refusal is not None:  # whatever happens next, the refusal is on record
            _refused(record, self.refusal)
        self.answered = False
        keep_alive = False
        request: Optional[Request] = None
        try:
            request = self._read_request(record)
            if request is None:
                if self.refusal is not None:
                    self._refused_unasked(record)
                return False
            self.follow(self.server.gen)  # decided by the configuration in force now
            self.ctx.requests += 1
            record.request = request
            record.method, record.target, record.version = (
                request.method, request.target, request.version)
            # In flight: listed by the admin listener's /tunnels until its record is done.
            self.record, self.greenlet = record, gevent.getcurrent()
            self.server.active[self.ctx.conn_id] = self
            keep_alive = self._dispatch(request, record)
        except ProxyError as exc:
            if self.refusal is not None and not isinstance(exc, ClientGone):
                # Refused already: a head that is late, too large or malformed gets the
                # refusal too, which is what the client must learn first.
                exc = self.refusal
            keep_alive = self._fail(exc, record, request)
        except Exception as exc:  # a bug, or a plugin that raised: fail closed
            self.log.exception("internal error")
            keep_alive = self._fail(InternalError(repr(exc)), record, request)
        except gevent.GreenletExit:
            # Cut by a stop past graceful_timeout: the request or tunnel still gets its record.
            if request is not None:
                record.close_reason = self.cut_reason
                self._close_record(record)
            raise
        finally:
            if self.record is not None and self.detached is None:
                self.server.active.pop(self.ctx.conn_id, None)
                self.record = None
        if self.detached is not None:
            return False  # the tunnel goes on without this greenlet; its record comes later
        self._close_record(record)
        return keep_alive and not self.server.stopping

    def recheck(self, gen: "Generation", record: Record) -> Optional[str]:
        """Why ``gen`` would refuse this connection's tunnel now, or None. Its request is
        decided again (``on_request``) with the identity it had (``ctx.decide_only``: no
        credentials asked, nothing counted), and the destination guard judges the address
        it is connected to (``resolve`` of that address alone: no lookup, no new route).
        A plugin that raises refuses (fails closed)."""
        request = record.request
        if request is None:
            return None
        ctx = dataclasses.replace(self.ctx, decide_only=True, stash=dict(self.ctx.stash),
                                  config=gen.config)
        try:
            answer = gen.hooks.on_request(ctx, request)
            if isinstance(answer, ProxyError):
                raise answer
            if answer is not None:
                return f"a plugin answers {answer.status}"
            if record.upstream_addr is not None:
                host, port = record.upstream_addr[:2]
                gen.hooks.resolve(ctx, host, port)
        except ProxyError as exc:
            return f"{exc.status} {exc.error}" + (f": {exc.detail}" if exc.detail else "")
        except Exception:
            self.log.exception("rechecking the tunnel failed; closing it")
            return "500 proxy_internal_error"
        return None

    def close(self, reason: str) -> None:
        """End this connection from another greenlet (the admin listener): the request or
        tunnel in flight gets its record with ``reason``, and the client sees the close."""
        self.cut_reason = reason
        if self.detached is not None:
            self.detached.cancel(reason)
        elif self.greenlet is not None:
            self.greenlet.kill(block=False)

    def _dispatch(self, request: Request, record: Record) -> bool:
        if self.refusal is not None:  # refused at connect: no hook sees the request
            _refused(record, self.refusal)
            raise self.refusal  # answered by _fail; answer() closes after it
        self._identify(request)
        answer = self.hooks.on_request(self.ctx, request)
        if answer is not None:
            if isinstance(answer, ProxyError):
                raise answer
            return self.answer(answer, record, request)
        if self.server.is_local(request, self.ctx):
            if request.is_connect:
                raise LoopDetected("CONNECT to the proxy itself")
            return self._serve_local(request, record)
        if self.gen.via and forward.via_loop(request.headers, self.gen.via):
            raise LoopDetected(f"Via already names {self.gen.via}")
        if request.is_connect:
            self._tunnel(request, record)
            return False
        return forward.forward(self, request, record)

    # -- reading ------------------------------------------------------------------------

    def _read_proxy_header(self) -> bool:
        """Take the client's address from the load balancer's PROXY header; False (close,
        say nothing) when the sender may not send one or the header is bad or late."""
        peer: Any = ipaddress.ip_address(self.ctx.client_addr[0])
        peer = getattr(peer, "ipv4_mapped", None) or peer
        if not any(peer in network for network in self.conn_gen.proxy_protocol_from):
            self.log.warning("refused: not in proxy_protocol_from")
            return False
        deadline = self.ctx.started + self.conn_gen.config.core["header_timeout"]
        data = b""
        try:
            while True:
                self.sock.settimeout(max(deadline - time.time(), 0.001))
                piece = self.sock.recv(RECV_SIZE)
                if not piece:
                    return False
                data += piece
                found = proxyproto.parse(data, self.conn_gen.proxy_protocol)
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

    def _read_request(self, record: Record) -> Optional[Request]:
        parser = http11.RequestHeadParser(self.settings["max_header_size"])
        header_timeout = self.settings["header_timeout"]
        sock = self.sock
        # A new connection's first head is due header_timeout after accept; a later one
        # may wait idle_timeout for its first byte, then has header_timeout for the rest.
        # Socket timeouts cost nothing when the bytes are already there, unlike a timer.
        if self.ctx.requests == 0:
            deadline = self.ctx.started + header_timeout
        else:
            deadline = 0.0
        if not self.buf:
            # Between requests the connection is idle: graceful stop may end it here.
            idle = self.server.idle
            idle.add(gevent.getcurrent())
            try:
                if deadline:
                    sock.settimeout(max(deadline - time.time(), 0.001))
                    self.buf = sock.recv(RECV_SIZE)
                else:  # bounded by the connection's reused timer, not a new one
                    self.buf = self.idle_wait.recv(sock, RECV_SIZE)
            except OSError:  # a timeout, a reset: nothing was asked, nothing to answer
                self.buf = b""
            finally:
                idle.discard(gevent.getcurrent())
            if not self.buf:
                return None
        record.started = time.time()
        if not deadline:
            deadline = record.started + header_timeout
        try:
            while True:
                data, self.buf = (self.buf, b"") if self.buf else (sock.recv(RECV_SIZE), b"")
                if not data:
                    if parser.started:
                        raise ClientGone("client closed in the middle of a head")
                    return None
                request = parser.feed(data)
                if request is not None:
                    self.buf = parser.rest
                    record.bytes_in += parser.size
                    sock.settimeout(self.settings["idle_timeout"])
                    return request
                left = deadline - time.time()
                if left <= 0:
                    raise HeaderTimeout("request head not received in time")
                sock.settimeout(left)
        except socket.timeout:
            raise HeaderTimeout("request head not received in time") from None
        except OSError as exc:
            raise ClientGone(f"reading the head: {exc}") from None

    # -- answers --------------------------------------------------------------------------

    def send(self, data: bytes, record: Record) -> None:
        try:
            send_all(self.sock, data)
        except OSError as exc:
            raise ClientGone(f"writing to the client: {exc}") from None
        if not self.answered:
            self.answered = True
            record.first_byte_time = time.time() - record.started
        record.bytes_out += len(data)

    def answer(self, response: Response, record: Record, request: Optional[Request] = None,
               close: bool = False) -> bool:
        """Send a complete answer made here (or by a plugin); True if the connection may
        serve another request.

        It closes whenever what follows on the connection cannot be framed with certainty:
        a request body left unread, a CONNECT answered 2xx without a tunnel (the client
        takes it for one), a refused switch of protocols with bytes behind its head; and
        after the answer to a client refused at connect."""
        close = close or self.server.stopping or self.refusal is not None or (
            request is not None and not forward.client_keeps_alive(request))
        if request is not None and not close:
            if forward.request_has_body(request):
                close = True  # its body was not read: the stream's framing is in doubt
            elif request.is_connect and 200 <= response.status < 300:
                close = True  # "established" for the client: what it sends next is no HTTP
            elif self.switch_refused(request, response.status):
                close = True
        headers = response.headers.copy()
        for name in ("content-length", "transfer-encoding", "connection"):
            headers.remove(name)
        if response.status >= 200 and response.status not in (204, 304):
            headers.add("Content-Length", str(len(response.body)))
        if close:
            headers.add("Connection", "close")
        elif request is not None and request.version == "HTTP/1.0":
            headers.add("Connection", "keep-alive")
        reason = response.reason or http11.reason_phrase(response.status)
        head = http11.serialize_head(f"HTTP/1.1 {response.status} {reason}", headers)
        if record.error is None:  # a plugin's answer names its cause in Proxy-Status
            record.error = _proxy_status_error(headers.get("proxy-status"))
        body = b"" if request is not None and request.method == "HEAD" else response.body
        record.status, record.content_type = response.status, headers.get("content-type")
        self.send(head + body, record)
        return not close

    def switch_refused(self, request: Request, status: int) -> bool:
        """Whether the client may have begun another protocol after ``request``, which was
        answered ``status`` instead: it asked to switch (CONNECT, or Upgrade), the answer
        did not switch (not 2xx, not 101), and bytes followed its head, read already or
        waiting. A client may send its first tunnel or WebSocket bytes before the answer
        (RFC 9110 9.3.6, 7.8); after a refusal they are no request, so the connection must
        close after the answer, and nothing of them is read. With nothing behind the head
        the client waited, and the connection may go on (a 407's retry, say)."""
        if request.is_connect:
            if 200 <= status < 300:
                return False
        elif status == 101 or not forward.wants_upgrade(request):
            return False
        return self.sent_more()

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

    def error_response(self, exc: ProxyError) -> Response:
        reason = http11.reason_phrase(exc.status)
        headers = Headers([
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Proxy-Status", f"{self.gen.proxy_name}; {exc.proxy_status_params()}"),
            ("Cache-Control", "no-store"),
        ])
        return Response(exc.status, headers, f"{exc.status} {reason}\n".encode(), reason)

    def _fail(self, exc: ProxyError, record: Record, request: Optional[Request]) -> bool:
        """Answer ``exc`` if nothing was sent yet; True if the connection may go on (never
        when ``request`` had a body: unread, or partly read, it leaves the framing in
        doubt)."""
        if isinstance(exc, ClientGone):
            # The client's own doing, not an error of the proxy's: no error in the record
            # or the metrics, one line at INFO, and the close reason says who ended it.
            self.log.info("client went away: %s", exc.detail)
            record.close_reason = record.close_reason or "client"
            return False
        record.error = exc.error
        if isinstance(exc, Denied):
            record.rule = exc.rule
        if exc.client_fault:
            self.log.info("%s %s: %s%s", exc.status, exc.error, exc.detail,
                          f" (rcode {exc.rcode})" if exc.rcode else "")
        if self.answered:
            # Nothing sensible can be sent: close, so the client sees the cut.
            record.close_reason = record.close_reason or "error"
            return False
        if isinstance(exc, HeaderTimeout):
            record.close_reason = "header timeout"
        try:
            return self.answer(self.error_response(exc), record, request, close=exc.close)
        except ClientGone:
            return False

    def _close_record(self, record: Record) -> None:
        record.finish()
        self.progress(record)
        self.hooks.on_close(self.ctx, record)

    def progress(self, record: Record) -> None:
        """Tell on_progress the bytes ``record`` moved since it was last told."""
        bytes_in = record.bytes_in - record.progress_in
        bytes_out = record.bytes_out - record.progress_out
        if bytes_in or bytes_out:
            record.progress_in, record.progress_out = record.bytes_in, record.bytes_out
            self.hooks.on_progress(self.ctx, record, bytes_in, bytes_out)

    # -- local answers and tunnels --------------------------------------------------------

    def _serve_local(self, request: Request, record: Record) -> bool:
        found = None if forward.request_has_body(request) else docroot_file(
            self.settings["docroot"], self.settings["local_paths"], request.method,
            request.path)
        if found is not None:
            return self._serve_file(request, record, found)
        body = forward.read_small_body(self, request, limit=64 * 1024)
        response = call_wsgi(self.server.local_app, self.ctx, request, body)
        return self.answer(response, record, request)

    def _serve_file(self, request: Request, record: Record, filename: str) -> bool:
        """A file of ``docroot``, streamed: one buffer at a time, whatever its size."""
        try:
            handle = open(filename, "rb")
        except OSError:
            missing = Headers([("Content-Type", "text/plain; charset=utf-8")])
            return self.answer(Response(404, missing, b"not found\n"), record, request)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            kind = content_type(filename)
            headers = [("Content-Type", kind), ("Content-Length", str(size))]
            keep = forward.client_keeps_alive(request) and not self.server.stopping and (
                not self.switch_refused(request, 200))
            headers.append(("Connection", "keep-alive" if keep else "close"))
            record.status, record.content_type = 200, kind
            self.send(http11.serialize_head("HTTP/1.1 200 OK", headers), record)
            if request.method == "GET":
                while True:
                    piece = handle.read(RECV_SIZE)
                    if not piece:
                        break
                    self.send(piece, record)
        return keep

    def _tunnel(self, request: Request, record: Record) -> None:
        routes = self.hooks.route(self.ctx, request)
        upstream, _, early, _ = self.open_upstream(request, record, routes)
        try:
            head = http11.serialize_head("HTTP/1.1 200 Connection Established", [])
            self.send(head, record)
            record.status = 200
            inspect = None
            if self.hooks.inspects_tunnels:
                def inspect(data: bytes) -> bool:
                    return self._inspect_tunnel(request, record, data)
            tunnel, ended = relaying.open_relay(self.sock, upstream, record,
                                                self.settings["idle_timeout"],
                                                to_upstream=self.buf, to_client=early,
                                                inspect=inspect)
            self.buf = b""
        except BaseException:
            upstream.close()
            raise
        try:
            reason = ended or tunnel.run(self.settings["max_tunnel_lifetime"],
                                         detach_after=relaying.DETACH_AFTER)
        except BaseException:
            tunnel.close()
            upstream.close()
            raise
        if reason:
            record.close_reason = reason
            tunnel.close()
            upstream.close()
            return
        # Relaying for a while already, with nothing for plugins to look at: the tunnel
        # goes on without this greenlet, which ends, so a long-lived tunnel holds no
        # greenlet (nor its stacks); one is spawned for its end.
        self.detached = tunnel
        self.server.detach(self)
        tunnel.detach(lambda reason: self.server.connections.spawn(
            self._end_detached, upstream, record, reason))

    def _end_detached(self, upstream: socket.socket, record: Record, reason: str) -> None:
        """The end of a detached tunnel, in a greenlet of its own: what ``_serve_one``,
        ``handle`` and the server would have done had a greenlet waited for it."""
        tunnel = self.detached
        try:
            if tunnel is not None:
                tunnel.close()
            upstream.close()
            record.close_reason = reason
            self.server.active.pop(self.ctx.conn_id, None)
            self.record = None
            self._close_record(record)
            self.conn_gen.hooks.on_disconnect(self.ctx)
        finally:
            self.server.attach(self)

    def _inspect_tunnel(self, request: Request, record: Record, data: bytes) -> bool:
        """on_tunnel_data for the client's first bytes; False closes the tunnel."""
        verdict: Optional[ProxyError]
        try:
            verdict = self.hooks.on_tunnel_data(self.ctx, request, record, data)
        except ProxyError as exc:
            verdict = exc
        except Exception:
            self.log.exception("on_tunnel_data failed; closing the tunnel")
            record.error = InternalError.error
            return False
        if verdict is None:
            return True
        record.error = verdict.error
        record.rule = getattr(verdict, "rule", None)
        self.log.info("tunnel closed: %s", verdict.detail or verdict.error)
        return False

    def open_upstream(self, request: Request, record: Record, routes: list[Optional[Route]]
                      ) -> tuple[socket.socket, tuple, bytes, Optional[Route]]:
        """Connect for ``request`` by the first of ``routes`` that works (None: direct; a
        Route: through that parent, ``route_failed`` telling of each one that did not).

        Returns the socket, its peer address, any bytes a parent sent after its CONNECT
        answer, and the route taken; raises the last failure when none worked."""
        failure: Optional[ProxyError] = None
        for route in routes:
            try:
                sock, address, early = self._connect_by(request, record, route)
            except ProxyError as exc:
                if route is None:
                    raise
                # A prohibited parent is the operator's to fix, not a passing failure.
                level = logging.WARNING if isinstance(exc, ParentProhibited) else logging.INFO
                self.log.log(level, "parent %s failed: %s", route.authority, exc.detail)
                self.hooks.route_failed(self.ctx, request, route, exc)
                failure = exc
                continue
            return sock, address, early, route
        assert failure is not None  # routes is never empty
        raise failure

    def _connect_by(self, request: Request, record: Record,
                    route: Optional[Route]) -> tuple[socket.socket, tuple, bytes]:
        host, port = (route.host, route.port) if route is not None else (request.host,
                                                                           request.port)
        # The record tells of the last attempt: its route, and its address once connected.
        record.route, record.upstream_addr = route, None
        record.routes_tried += 1
        started = time.time()
        try:
            addresses = self.hooks.resolve(self.ctx, host, port)
        except DestinationProhibited as exc:
            if route is None:
                raise  # the client's destination: a policy refusal (403)
            raise ParentProhibited(f"{exc.detail} (a configuration fault: the parent "
                                   "proxy must be exempt there)") from None
        record.dns_time = time.time() - started
        started = time.time()
        sock, address = connect(addresses, self.settings["connect_timeout"])
        record.connect_time = time.time() - started
        record.upstream_addr = address[:2]
        early = b""
        if route is not None and request.is_connect:
            try:
                early = parent_connect(sock, route, request.authority,
                                       self.settings["connect_timeout"],
                                       self.settings["max_header_size"], self.gen.via)
            except BaseException:
                sock.close()
                raise
        return sock, address, early


def _refused(record: Record, refusal: ProxyError) -> Record:
    """``record`` marked with a refusal at connect: its error, its rule, close reason
    ``denied``. Its status stays 0 unless an answer is sent."""
    record.error = refusal.error
    record.rule = getattr(refusal, "rule", None)
    record.close_reason = "denied"
    return record


#: One parameter of a Proxy-Status member: its key and its value, a quoted string (which
#: may hold ``;``: a plugin's ``details``) or a token.
_STATUS_PARAM = re.compile(r';\s*([a-z*][a-z0-9_.*-]*)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;]*))?')


def _proxy_status_error(value: Optional[str]) -> Optional[str]:
    """The ``error`` parameter of a Proxy-Status field value, if any."""
    _, sep, params = (value or "").partition(";")  # after the proxy's name
    for match in _STATUS_PARAM.finditer(sep + params):
        if match.group(1) == "error":
            return (match.group(2) or "").strip().strip('"') or None
    return None
