"""``system_resolver``: the last resort of the ``resolve`` hook, through the system resolver.

It asks gevent's resolver (getaddrinfo, so /etc/hosts and nsswitch apply) and runs last
(``trylast``), so any other resolver plugin answers first. IP literals are answered without a
lookup.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import gevent.socket

from geproxy import Context, Resolved, errors, hookimpl


class SystemResolver:
    name = "system_resolver"

    @hookimpl(trylast=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        literal = _literal(host, port)
        if literal is not None:
            return Resolved([literal])
        try:
            infos = gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM,
                                              socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise errors.DNSError(f"{host}: {exc.strerror}", rcode=_rcode(exc)) from None
        return Resolved(info[4] for info in infos
                        if info[0] in (socket.AF_INET, socket.AF_INET6))


def _literal(host: str, port: int) -> Optional[tuple[Any, ...]]:
    """The socket address of an IP literal (inet_pton: strict, and cheap per request)."""
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


def _rcode(exc: socket.gaierror) -> str:
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
        return "NXDOMAIN"
    return "SERVFAIL"
