"""The proxy's listening sockets, and how the log writes an address."""

from __future__ import annotations

import socket
from typing import Any, Sequence

from gevent.server import StreamServer

from ..hosts import authority

__all__ = ["Listener", "listening_socket", "describe_address", "is_wildcard", "BACKLOG"]

BACKLOG = 1024


class Listener(StreamServer):
    """A StreamServer that leaves closing the client socket to ``ProxyServer._handle``:
    a connection whose tunnel relays on its own outlives its handler."""

    #: Whether its connections speak TLS (``tls://`` in ``listen``).
    tls = False

    def do_close(self, *args: Any) -> None:
        """Nothing: the socket is not gevent's to close.

        gevent calls this with the client's socket as soon as the handler's greenlet
        returns (StreamServer's own closes the socket there). A tunnel past the server's
        ``detach_after`` goes on relaying in the hub after that greenlet returned, on this
        very socket, so the socket is closed by whoever ends the connection:
        ``ProxyServer._handle`` when the handler returns with nothing detached,
        ``ProxyServer.release_detached`` when a detached tunnel ends. Without this override
        every detached tunnel is cut at once (the ``detached`` runs of
        tests/test_connect.py fail). gevent also calls it when spawning the handler raises,
        which the spawn given here (``connections.spawn``: an unbounded Group's;
        ``max_connections`` is enforced by ``_handle``) does not do."""


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def listening_socket(host: str, port: int, reuse_port: bool = False,
              listen: bool = True) -> socket.socket:
    """A listening socket. TCP_NODELAY is set here once: accepted sockets inherit it.
    ``reuse_port``: workers each bind the same port (SO_REUSEPORT), the kernel spreads the
    connections; ``listen=False`` only reserves the port (a master's, accepting nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            # [::]:3128 beside 0.0.0.0:3128: each family on its own listener.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{exc.strerror}: {describe_address((host, port))}") from None
    return sock


def describe_address(address: Sequence[Any]) -> str:
    """A listen or client address as the log writes it: ``tls://`` before a TLS one."""
    text = authority(address[0], address[1])
    return "tls://" + text if getattr(address, "tls", False) else text
