"""The way of one accepted connection: on_connect, the TLS handshake, then the protocol its
client chose by ALPN (HTTP/2, or HTTP/1.1), then on_disconnect."""

from __future__ import annotations

from ..errors import ClientError
from ..models import Record
from .client import ClientConnection
from .http1 import answer_unasked, serve_http1
from .http2 import serve_h2

__all__ = ["serve_connection"]


def serve_connection(conn: ClientConnection) -> None:
    """Serve ``conn`` (its PROXY header read) until it ends, or its tunnel relays detached."""
    try:
        if not conn.open():
            if conn.plain_http:  # as nginx does: a client that forgot https:// learns why
                answer_unasked(conn, ClientError("plain HTTP request sent to a TLS listener"))
            return
        if conn.ctx.tls is not None and conn.ctx.tls.alpn == "h2":
            serve_h2(conn)
            if conn.refusal is not None and conn.ctx.requests == 0:  # no stream to answer
                conn.refused_unasked(Record(conn.ctx))
        else:
            serve_http1(conn)
    finally:
        conn.idle_wait.close()
        if conn.detached is None:
            conn.gen.hooks.on_disconnect(conn.ctx)
