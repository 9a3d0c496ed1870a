"""The upstream connection of one request, by its routes: direct, or through parents.

Shared by forwarding (forward.py) and tunnels (serve/transaction.py), whichever protocol
the client speaks: each attempt resolves through the ``resolve`` hook, connects, and (for a
tunnel through a parent) asks the parent for its own tunnel; a route that fails is told to
``route_failed`` and the next one is tried.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Optional

from ..errors import DestinationProhibited, ParentProhibited, ProxyError
from ..models import Record, Request, Route
from ..net.upstream import connect, parent_connect
from .exchange import Scope

__all__ = ["open_upstream"]


def open_upstream(scope: Scope, request: Request, record: Record,
                  routes: list[Optional[Route]]
                  ) -> tuple[socket.socket, tuple, bytes, Optional[Route]]:
    """Connect for ``request`` by the first of ``routes`` that works (None: direct; a
    Route: through that parent, ``route_failed`` telling of each one that did not).

    Returns the socket, its peer address, any bytes a parent sent after its CONNECT
    answer, and the route taken; raises the last failure when none worked."""
    failure: Optional[ProxyError] = None
    for route in routes:
        try:
            sock, address, early = _connect_by(scope, request, record, route)
        except ProxyError as exc:
            if route is None:
                raise
            # A prohibited parent is the operator's to fix, not a passing failure.
            level = logging.WARNING if isinstance(exc, ParentProhibited) else logging.INFO
            scope.log.log(level, "parent %s failed: %s", route.authority, exc.detail)
            scope.hooks.route_failed(scope.ctx, request, route, exc)
            failure = exc
            continue
        return sock, address, early, route
    assert failure is not None  # routes is never empty
    raise failure


def _connect_by(scope: Scope, request: Request, record: Record,
                route: Optional[Route]) -> tuple[socket.socket, tuple, bytes]:
    host, port = (route.host, route.port) if route is not None else (request.host,
                                                                       request.port)
    core = scope.core
    # The record tells of the last attempt: its route, and its address once connected.
    record.route, record.upstream_addr = route, None
    record.routes_tried += 1
    started = time.time()
    try:
        addresses = scope.hooks.resolve(scope.ctx, host, port)
    except DestinationProhibited as exc:
        if route is None:
            raise  # the client's destination: a policy refusal (403)
        raise ParentProhibited(f"{exc.detail} (a configuration fault: the parent "
                               "proxy must be exempt there)") from None
    record.dns_time = time.time() - started
    started = time.time()
    sock, address = connect(addresses, core["connect_timeout"])
    record.connect_time = time.time() - started
    record.upstream_addr = address[:2]
    early = b""
    if route is not None and request.is_connect:
        try:
            early = parent_connect(sock, route, request.authority, core["connect_timeout"],
                                   core["max_header_size"], scope.via)
        except BaseException:
            sock.close()
            raise
    return sock, address, early
