"""``system_resolver``: the last resort of the ``resolve`` hook, through the system resolver.

It asks gevent's resolver (getaddrinfo, so /etc/hosts and nsswitch apply) and runs last
(``trylast``), so any other resolver plugin answers first. IP literals are answered without a
lookup.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Optional

import gevent.socket

from geproxy import Context, errors, hookimpl


class SystemResolver:
    name = "system_resolver"

    @hookimpl(trylast=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if literal.version == 6:
                return [(str(literal), port, 0, 0)]
            return [(str(literal), port)]
        try:
            infos = gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM,
                                              socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise errors.DNSError(f"{host}: {exc.strerror}", rcode=_rcode(exc)) from None
        return [info[4] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


def _rcode(exc: socket.gaierror) -> str:
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
        return "NXDOMAIN"
    return "SERVFAIL"
