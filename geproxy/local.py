"""Answers for requests addressed to the proxy itself: a small WSGI app.

Origin-form requests (``GET /healthz``), and absolute-form ones whose target is one of the
proxy's own listen addresses, are never forwarded: they are answered here. The app is plain
WSGI, so the admin listener of a later release can serve the same app through gevent.pywsgi.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Callable, Iterable

from .models import Context, Headers, Request, Response

__all__ = ["local_app", "call_wsgi"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def local_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/healthz`` answers 200 while the process serves; anything else is 404."""
    path = environ.get("PATH_INFO", "")
    method = environ.get("REQUEST_METHOD", "GET")
    if path == "/healthz":
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed",
                           [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"method not allowed\n"]
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
        return [b"ok\n"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


def call_wsgi(app: WSGIApp, ctx: Context, request: Request, body: bytes = b"") -> Response:
    """Run ``app`` for ``request`` and collect its (small) answer into a Response."""
    path, _, query = request.path.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": ctx.server_addr[0],
        "SERVER_PORT": str(ctx.server_addr[1]),
        "SERVER_PROTOCOL": request.version,
        "REMOTE_ADDR": ctx.client_addr[0],
        "REMOTE_PORT": str(ctx.client_addr[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "geproxy.ctx": ctx,
    }
    for name, value in request.headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            continue
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if "content-type" in request.headers:
        environ["CONTENT_TYPE"] = request.headers.get("content-type")
    head: list[Any] = []

    def start_response(status: str, response_headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        head[:] = [status, response_headers]  # a second call (with exc_info) replaces it
        return chunks.append

    chunks: list[bytes] = []
    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    code, _, reason = head[0].partition(" ")
    return Response(int(code), Headers(head[1]), b"".join(chunks), reason)
