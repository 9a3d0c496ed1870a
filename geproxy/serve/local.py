"""Answers for requests addressed to the proxy itself: a small WSGI app.

Origin-form requests (``GET /healthz``), and absolute-form ones whose target is one of the
proxy's own listen addresses, are never forwarded: they are answered here.

The admin listener (``admin_listen``) serves a second, separate app through gevent.pywsgi:
``/healthz``, ``/readyz``, ``/metrics``, ``/tunnels``, ``POST /tunnels/ID/close`` and
``/debug/stats``. Those are for operators only, so the proxy port never serves them.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import sys
from typing import Any, Callable, Iterable, Optional, Protocol

from ..errors import ConfigError
from ..models import Context, Headers, Request, Response

__all__ = ["local_app", "admin_app", "AdminTarget", "call_wsgi", "addressed_to_proxy",
           "names_proxy"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


#: The admin paths the proxy port may also serve (``local_paths``); never /tunnels nor
#: /debug/stats, which tell what is in flight and what the process holds.
PROXY_PORT_PATHS = ("/healthz", "/readyz", "/metrics")


def addressed_to_proxy(request: Request, listeners: Iterable[tuple[str, int]],
                       local_host: str) -> bool:
    """Whether ``request`` is addressed to the proxy itself rather than through it.

    True for an origin-form request (no host), and for an absolute-form or CONNECT target on
    the port of one of ``listeners`` (``(host, port)`` each) whose host is that listener's
    host, ``local_host`` (the address the client reached), ``localhost``, or a loopback
    address when the listener is a wildcard or on loopback. The server and ``geproxy
    explain`` both ask this, so a dry run calls local what the proxy would answer itself.
    """
    return not request.host or names_proxy(request.host, request.port, listeners, local_host)


def names_proxy(target_host: str, target_port: int, listeners: Iterable[tuple[str, int]],
                local_host: str) -> bool:
    """Whether ``target_host:target_port`` names the proxy itself (``addressed_to_proxy``)."""
    for host, port in listeners:
        if target_port != port:
            continue
        if target_host in (host, local_host, "localhost"):
            return True
        try:
            target = ipaddress.ip_address(target_host)
        except ValueError:
            continue
        if target.is_loopback and (host in ("0.0.0.0", "::") or
                                   ipaddress.ip_address(host).is_loopback):
            return True
    return False


def check_local_options(config: Any) -> None:
    """ConfigError for a ``local_paths`` page the proxy port cannot serve, or a ``docroot``
    that is no directory."""
    core = config.core
    for path in core["local_paths"]:
        if path not in PROXY_PORT_PATHS:
            raise ConfigError(f"not a page the proxy port can serve: {path!r} (use "
                              f"{' '.join(PROXY_PORT_PATHS)})", path=config.path,
                              section="geproxy", key="local_paths")
    if core["docroot"] and not os.path.isdir(core["docroot"]):
        raise ConfigError(f"not a directory: {core['docroot']}", path=config.path,
                          section="geproxy", key="docroot")


def local_app(target: "AdminTarget", paths: Iterable[str] = ("/healthz",)) -> WSGIApp:
    """The proxy port's app: the admin paths in ``paths`` (``local_paths``), 404 else."""
    admin = admin_app(target)
    exposed = frozenset(paths)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in exposed:
            return admin(environ, start_response)
        return _text(start_response, "404 Not Found", b"not found\n")

    return app


class AdminTarget(Protocol):
    """What the admin app needs of the server (server.py's ProxyServer, or a master's
    view of its workers)."""

    @property
    def stopping(self) -> bool:
        """The proxy is stopping: /readyz answers 503."""

    def tunnels(self) -> list[dict[str, Any]]:
        """The requests and tunnels being served, as JSON-ready dicts."""

    def close_connection(self, conn_id: str) -> bool:
        """Close the connection ``conn_id``; False when no request of it is in flight."""

    def metrics_exposition(self) -> Optional[tuple[bytes, str]]:
        """The metrics text and its content type; None without the metrics plugin."""

    def stats(self) -> dict[str, Any]:
        """The process's descriptors, RSS, greenlets, connections and pool, JSON-ready."""


_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


def _text(start_response: Callable[..., Any], status: str, body: bytes,
          extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    start_response(status, [*_TEXT, *extra])
    return [body]


def admin_app(target: AdminTarget) -> WSGIApp:
    """The admin listener's app for ``target``; separate from ``local_app`` on purpose."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "tunnels" and parts[2] == "close":
            if method != "POST":
                return _text(start_response, "405 Method Not Allowed",
                             b"method not allowed\n", [("Allow", "POST")])
            if not target.close_connection(parts[1]):
                return _text(start_response, "404 Not Found", b"no such connection\n")
            return _text(start_response, "200 OK", b"closed\n")
        if path not in ("/healthz", "/readyz", "/metrics", "/tunnels", "/debug/stats"):
            return _text(start_response, "404 Not Found", b"not found\n")
        if method not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", b"method not allowed\n",
                         [("Allow", "GET, HEAD")])
        if path == "/healthz":
            return _text(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            if target.stopping:
                return _text(start_response, "503 Service Unavailable", b"draining\n")
            return _text(start_response, "200 OK", b"ready\n")
        if path == "/metrics":
            found = target.metrics_exposition()
            if found is None:
                return _text(start_response, "404 Not Found",
                             b"the metrics plugin is not loaded\n")
            body, content_type = found
            start_response("200 OK", [("Content-Type", content_type),
                                      ("Cache-Control", "no-store")])
            return [body]
        document: Any = target.stats() if path == "/debug/stats" else target.tunnels()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Cache-Control", "no-store")])
        return [json.dumps(document).encode()]

    return app


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
