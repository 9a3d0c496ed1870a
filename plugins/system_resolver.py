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
from geproxy.net.dns import gai_rcode, literal_address


class SystemResolver:
    name = "system_resolver"

    @hookimpl(trylast=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        literal = literal_address(host, port)
        if literal is not None:
            return Resolved([literal])
        try:
            infos = gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM,
                                              socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise errors.DNSError(f"{host}: {exc.strerror}", rcode=gai_rcode(exc)) from None
        return Resolved(info[4] for info in infos
                        if info[0] in (socket.AF_INET, socket.AF_INET6))
