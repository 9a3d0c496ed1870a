"""What the system's resolver calls need around them: socket addresses of IP literals, and
the rcode a getaddrinfo failure stands for."""

from __future__ import annotations

import socket
from typing import Any, Optional

__all__ = ["literal_address", "gai_rcode"]


def literal_address(host: str, port: int) -> Optional[tuple[Any, ...]]:
    """The socket address of an IP literal host, None for a name (inet_pton: strict, and
    cheap per request): what a resolver answers for a literal without any lookup."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return (host, port)
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return (host, port, 0, 0)
    except OSError:
        return None


def gai_rcode(exc: socket.gaierror) -> str:
    """The DNS rcode a getaddrinfo failure stands for, for Proxy-Status."""
    if exc.errno == socket.EAI_NONAME:
        return "NXDOMAIN"
    if exc.errno in (getattr(socket, "EAI_NODATA", None), getattr(socket, "EAI_ADDRFAMILY", None)):
        return "NOERROR"  # the name exists, without an address of the family asked for
    return "SERVFAIL"
