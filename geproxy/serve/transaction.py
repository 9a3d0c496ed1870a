"""One request, from its head to its record, whichever protocol carries it.

read the request -> on_request -> the proxy's own answer | CONNECT tunnel | forward -> record.

HTTP/1.1 (http1.py) serves each request of a connection as a Transaction, HTTP/2
(h2stream.py) each stream. What differs between them is the ``Side``: how a request is
read, how its answer is written (its ``Exchange``), how a tunnel's client end relays.
Everything that decides is a hook; everything that moves bytes is in relay/.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from typing import Any, Callable, Mapping, Optional, Protocol

import gevent
from gevent import get_hub

from ..errors import (
    ClientError,
    ClientGone,
    Denied,
    HeaderTimeout,
    HTTP11Required,
    InternalError,
    LoopDetected,
    ProxyError,
)
from ..models import Context, Headers, Record, Request, Response
from ..net.sockets import IdleWait
from ..protocol.semantics import error_response, via_loop
from ..relay.connect import open_upstream
from ..relay.exchange import Exchange
from ..relay.forward import RECV_SIZE, answer, forward, read_small_body
from ..relay.tunnel import Relay
from .client import refused
from .generation import Generation
from .local import call_wsgi
from .static import content_type, docroot_file

__all__ = ["Transaction", "Side", "Client"]


class Client(Exchange, Protocol):
    """The client side of one request as the lifecycle needs it, beyond forwarding."""

    def finish(self, cut: bool) -> None:
        """The request is done; ``cut``: its answer began and could not be completed."""

    def cancel(self) -> None:
        """The request is cut from outside (a stop, the admin listener)."""

    def require_http11(self) -> bool:
        """Tell the client to send the request again over HTTP/1.1 (HTTP/2's
        ``HTTP_1_1_REQUIRED`` reset); False where it came over HTTP/1.1 already."""

    def tunnel(self, upstream: socket.socket, record: Record, early: bytes,
               inspect: Optional[Callable[[bytes], bool]],
               idle_timeout: float) -> tuple[Relay, str]:
        """Answer a CONNECT with 2xx and make its relay, once ``early`` (what a parent sent
        after its own 2xx) went to the client; returns it with "" (or the close reason,
        when the tunnel already ended)."""


class Side(Protocol):
    """The protocol a Transaction's request comes by: an HTTP/1.1 connection or an
    HTTP/2 stream."""

    def read_request(self, record: Record) -> Optional[Request]:
        """The request, or None when none came (the client closed or kept silent)."""

    def client(self, request: Optional[Request], record: Record) -> Client:
        """The client side of this request (``request`` None: a head that failed)."""

    def detached(self, transaction: "Transaction") -> Callable[..., Any]:
        """The transaction's tunnel relays on with no greenlet: returns what spawns its
        end."""

    def detached_ended(self) -> None:
        """The end of a detached tunnel was handled (its record written)."""


class Transaction:
    """One request, on an HTTP/1.1 connection or an HTTP/2 stream: the hooks that decide
    it, the answer, forwarding or a tunnel, errors mapped to answers, and its record. It is
    the request's ``Scope`` for relay/, and what the admin listener lists and closes."""

    def __init__(self, server: Any, side: Side, ctx: Context, conn_gen: Generation,
                 idle_wait: IdleWait, log: Any, refusal: Optional[ProxyError]) -> None:
        #: The ProxyServer: its registries, pool, generation in force, stop.
        self.server = server
        self.side = side
        self.ctx = ctx
        self.log = log
        #: The connection's own generation; ``gen`` is the request's (``_follow``).
        self.conn_gen = conn_gen
        self.gen = conn_gen
        self.core: Mapping[str, Any] = conn_gen.core
        self.hooks = conn_gen.hooks
        self.via = conn_gen.via
        self.pool = server.pool
        self.idle_wait = idle_wait
        #: The refusal on_connect gave: this request is answered with it.
        self.refusal = refusal
        #: The request or tunnel in flight (while it is in ``server.active``).
        self.record: Optional[Record] = None
        self.greenlet: Optional[gevent.Greenlet] = None
        #: The close reason given to a request cut by ``close()``.
        self.cut_reason = "shutdown"
        #: The tunnel relaying with no greenlet (``_tunnel``), until its end.
        self.detached: Optional[Relay] = None

    @property
    def stopping(self) -> bool:
        return bool(self.server.stopping)

    # -- the way of one request -----------------------------------------------------------

    def serve(self) -> bool:
        """Read and serve one request; True if its connection may serve another."""
        record = Record(self.ctx)
        if self.refusal is not None:  # whatever happens next, the refusal is on record
            refused(record, self.refusal)
        keep = False
        request: Optional[Request] = None
        client: Optional[Client] = None
        self.greenlet = gevent.getcurrent()
        try:
            try:
                request = self.side.read_request(record)
                if request is None:
                    return False
                gen = self.server.gen  # decided by the configuration in force now
                if gen is not self.gen:
                    self._follow(gen)
                self.ctx.requests += 1
                record.request = request
                record.method, record.target, record.version = (
                    request.method, request.target, request.version)
                # In flight: listed by the admin listener's /tunnels until its record is done.
                self.record = record
                self.server.track(self)
                client = self.side.client(request, record)
                keep = self._dispatch(request, record, client)
                if self.detached is None:
                    client.finish(cut=False)
            except ProxyError as exc:
                if self.refusal is not None and not isinstance(exc, ClientGone):
                    # Refused already: a head that is late, too large or malformed gets the
                    # refusal too, which is what the client must learn first.
                    exc = self.refusal
                client = client or self.side.client(request, record)
                keep = self._fail(exc, record, request, client)
            except Exception as exc:  # a bug, or a plugin that raised: fail closed
                self.log.exception("internal error")
                client = client or self.side.client(request, record)
                keep = self._fail(InternalError(repr(exc)), record, request, client)
        except gevent.GreenletExit:
            # Cut by a stop past graceful_timeout, or the admin listener: the request or
            # tunnel still gets its record.
            if request is not None:
                record.close_reason = self.cut_reason
                if client is not None:
                    client.cancel()
                self._write_record(record)
            self._let_go()
            raise
        finally:
            # Its greenlet may serve another connection next (serve/handlers.py): a
            # ``close`` from now on must not reach it.
            self.greenlet = None
            if self.record is not None and self.detached is None:
                self.server.untrack(self)
                self.record = None
        if self.detached is not None:
            return False  # the tunnel goes on without this greenlet; its record comes later
        self._write_record(record)
        if self.gen is not self.conn_gen:
            self._let_go()
        return keep and not self.server.stopping

    def _follow(self, gen: Generation) -> None:
        """Serve this request with ``gen``, the generation in force: one use of it is held
        until the request's end (``_let_go``) when it is not the connection's own."""
        gen.users += 1
        self.gen, self.core, self.hooks, self.via = gen, gen.core, gen.hooks, gen.via
        self.ctx.config, self.ctx.identity = gen.config, gen.hooks
        self.idle_wait.set_timeout(self.core["idle_timeout"])

    def _let_go(self) -> None:
        if self.gen is not self.conn_gen:
            self.server.release(self.gen)
            self.gen = self.conn_gen

    def _dispatch(self, request: Request, record: Record, client: Client) -> bool:
        if self.refusal is not None:  # refused at connect: no hook sees the request
            raise self.refusal  # answered by _fail, and the connection closes after it
        self._identify(request)
        decided = self.hooks.on_request(self.ctx, request)
        if decided is not None:
            if isinstance(decided, ProxyError):
                raise decided
            return answer(client, decided, record, request)
        if self.server.is_local(request, self.ctx):
            if request.is_connect:
                raise LoopDetected("CONNECT to the proxy itself")
            return self._serve_local(request, record, client)
        if self.via and via_loop(request.headers, self.via):
            raise LoopDetected(f"Via already names {self.via}")
        if request.is_connect:
            self._tunnel(request, record, client)
            return False
        return forward(self, client, request, record)

    def _identify(self, request: Request) -> None:
        """The user a verified client certificate names is the request's user, as a
        Basic-authenticated name would be; a request that also carries Proxy-Authorization
        names two, and is refused rather than guessed at."""
        tls = self.ctx.tls
        if tls is None or tls.identity is None:
            self.ctx.user = None  # an identity holds for one request, not the connection
            return
        if "proxy-authorization" in request.headers:
            raise ClientError("Proxy-Authorization on a connection with a client certificate")
        self.ctx.user = tls.identity
        self.ctx.auth_scheme, self.ctx.auth_result = "certificate", "ok"

    def _fail(self, exc: ProxyError, record: Record, request: Optional[Request],
              client: Client) -> bool:
        """Answer ``exc`` if nothing was sent yet; True if the connection may go on."""
        if isinstance(exc, ClientGone):
            # The client's own doing, not an error of the proxy's: no error in the record
            # or the metrics, one line at INFO, and the close reason says who ended it.
            self.log.info("client went away: %s", exc.detail)
            record.close_reason = record.close_reason or exc.close_reason
            return False
        record.error = exc.error
        if isinstance(exc, Denied):
            record.rule = exc.rule
        if exc.expected:
            self.log.info("%s %s: %s%s", exc.status, exc.error, exc.detail,
                          f" (rcode {exc.rcode})" if exc.rcode else "")
        if client.answered:
            # Nothing sensible can be sent: the client must see the cut.
            record.close_reason = record.close_reason or "error"
            client.finish(cut=True)
            return False
        if isinstance(exc, HeaderTimeout):
            record.close_reason = "header timeout"
        if isinstance(exc, HTTP11Required) and client.require_http11():
            # Not an error: the client is sent to HTTP/1.1, where the request can be met.
            record.error = None
            record.close_reason = record.close_reason or "http/1.1 required"
            return False
        try:
            keep = answer(client, error_response(exc, self.gen.proxy_name), record, request,
                          close=exc.close or self.refusal is not None)
        except ClientGone:
            return False
        client.finish(cut=False)
        return keep

    def _write_record(self, record: Record) -> None:
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

    # -- from elsewhere: the admin listener, a reload -------------------------------------

    def close(self, reason: str) -> None:
        """End this request or tunnel from another greenlet: it gets its record with
        ``reason``, and the client sees the end."""
        self.cut_reason = reason
        if self.detached is not None:
            self.detached.cancel(reason)
        elif self.greenlet is not None:
            # Thrown from the hub, and only if the greenlet still serves this request: by
            # then it may have ended it and be serving another connection (handlers.py).
            greenlet = self.greenlet
            get_hub().loop.run_callback(self._cut, greenlet)

    def _cut(self, greenlet: gevent.Greenlet) -> None:
        serving = self.greenlet
        if serving is None or serving is not greenlet or serving.dead:
            return  # the request ended: its greenlet is another connection's now, or gone
        try:
            serving.throw(gevent.GreenletExit)
        except BaseException:  # as gevent's own kill: the hub reports it
            get_hub().handle_error(serving, *sys.exc_info())

    def recheck(self, gen: Generation, record: Record) -> Optional[str]:
        """Why ``gen`` would refuse this tunnel now, or None. Its request is decided again
        (``on_request``) with the identity it had (``ctx.decide_only``: no credentials
        asked, nothing counted), and the destination guard judges the address it is
        connected to (``resolve`` of that address alone: no lookup, no new route). A
        plugin that raises refuses (fails closed)."""
        request = record.request
        if request is None:
            return None
        # The new generation's plugins answer the identity hooks (groups, external
        # checks) too, not the ones the tunnel was opened under.
        ctx = dataclasses.replace(self.ctx, decide_only=True, stash=dict(self.ctx.stash),
                                  config=gen.config, identity=gen.hooks)
        try:
            decided = gen.hooks.on_request(ctx, request)
            if isinstance(decided, ProxyError):
                raise decided
            if decided is not None:
                return f"a plugin answers {decided.status}"
            if record.upstream_addr is not None:
                host, port = record.upstream_addr[:2]
                gen.hooks.resolve(ctx, host, port)
        except ProxyError as exc:
            return f"{exc.status} {exc.error}" + (f": {exc.detail}" if exc.detail else "")
        except Exception:
            self.log.exception("rechecking the tunnel failed; closing it")
            return "500 proxy_internal_error"
        return None

    # -- the proxy's own answers ----------------------------------------------------------

    def _serve_local(self, request: Request, record: Record, client: Client) -> bool:
        found = None if client.has_body else docroot_file(
            self.core["docroot"], self.core["local_paths"], request.method, request.path)
        if found is not None:
            return self._serve_file(request, record, client, found)
        body = read_small_body(client, limit=64 * 1024)
        return answer(client, call_wsgi(self.server.local_app, self.ctx, request, body),
                      record, request)

    def _serve_file(self, request: Request, record: Record, client: Client,
                    filename: str) -> bool:
        """A file of ``docroot``, streamed: one buffer at a time, whatever its size."""
        try:
            handle = open(filename, "rb")
        except OSError:
            missing = Response(404, Headers([("Content-Type", "text/plain; charset=utf-8")]),
                               b"not found\n")
            return answer(client, missing, record, request)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            kind = content_type(filename)
            headers = Headers([("Content-Type", kind), ("Content-Length", str(size))])
            record.status, record.content_type = 200, kind
            keep = client.send_head(200, "OK", headers, open_ended=False, keep=True)
            while request.method == "GET":
                piece = handle.read(RECV_SIZE)
                if not piece:
                    break
                client.send_body([piece])
            client.send_body([], end=True)
        return keep

    # -- tunnels --------------------------------------------------------------------------

    def _tunnel(self, request: Request, record: Record, client: Client) -> None:
        routes = self.hooks.route(self.ctx, request)
        upstream, _, early, _ = open_upstream(self, request, record, routes)
        inspect = None
        if self.hooks.inspects_tunnels:
            def inspect(data: bytes) -> bool:
                return self._inspect_tunnel(request, record, data)
        relay: Optional[Relay] = None
        try:
            relay, ended = client.tunnel(upstream, record, early, inspect,
                                         self.core["idle_timeout"])
            reason = ended or relay.run(self.core["max_tunnel_lifetime"],
                                        detach_after=self.server.detach_after)
        except BaseException:
            if relay is not None:
                relay.close()
            upstream.close()
            raise
        if reason:
            record.close_reason = reason
            relay.close()
            upstream.close()
            return
        # Relaying for a while already, with nothing for plugins to look at: the tunnel
        # goes on without this greenlet, which ends, so a long-lived tunnel holds no
        # greenlet (nor its stacks); one is spawned for its end.
        self.detached = relay
        self.greenlet = None
        spawn = self.side.detached(self)
        relay.detach(lambda reason: spawn(self._end_detached, upstream, record, reason))

    def _end_detached(self, upstream: socket.socket, record: Record, reason: str) -> None:
        """The end of a detached tunnel, in a greenlet of its own: what ``serve`` and its
        connection would have done had a greenlet waited for it."""
        relay = self.detached
        try:
            if relay is not None:
                relay.close()
            upstream.close()
            record.close_reason = reason
            self.server.untrack(self)
            self.record = None
            try:
                self._write_record(record)
            finally:
                self._let_go()
        finally:
            self.side.detached_ended()

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
