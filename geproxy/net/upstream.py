"""Reaching upstreams: Happy Eyeballs connects and the pool of idle upstream connections."""

from __future__ import annotations

import base64
import errno
import logging
import os
import socket
import time
from collections import deque
from typing import Any, Optional, Sequence

import gevent
import gevent.event
from gevent import getcurrent

from ..errors import (
    ConnectionTerminated,
    ConnectRefused,
    ConnectTimeout,
    DestinationUnreachable,
    ParentRefused,
    ProxyError,
)
from ..models import Route
from ..protocol.http11 import ResponseHeadParser, serialize_head
from .sockets import raw_socket, send_all, still_idle, watchers

__all__ = ["connect", "interleave", "parent_connect", "UpstreamPool", "HAPPY_EYEBALLS_DELAY"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.upstream")

#: RFC 8305's recommended "Connection Attempt Delay".
HAPPY_EYEBALLS_DELAY = 0.25

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN}


def _family(address: Sequence[Any]) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def interleave(addresses: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Alternate address families, starting with the first one given (RFC 8305 4)."""
    first = [a for a in addresses if _family(a) == _family(addresses[0])]
    other = [a for a in addresses if _family(a) != _family(addresses[0])]
    out: list[tuple[Any, ...]] = []
    for i in range(max(len(first), len(other))):
        out.extend(group[i] for group in (first, other) if i < len(group))
    return out


def _error_for(exc: OSError, address: Sequence[Any]) -> ProxyError:
    where = f"{address[0]}:{address[1]}"
    if exc.errno in _UNREACHABLE:
        return DestinationUnreachable(f"{where}: {exc.strerror}")
    return ConnectRefused(f"{where}: {exc.strerror or exc}")


def _open(address: tuple[Any, ...], timeout: Optional[float] = None) -> socket.socket:
    """A connected socket to ``address`` (an IP literal's socket address), within
    ``timeout`` seconds (ConnectTimeout), or unbounded here when None (the caller bounds
    the wait). Done by hand rather than by gevent's ``connect``, which checks and resolves
    the address again and arms a timer on every call: a non-blocking connect, one wait for
    writability on the socket's own watcher (a new one would cost a watcher and a system
    call), a timer only when that wait is needed, and the kernel's verdict."""
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = raw_socket(sock)  # its calls never wait
        error = raw.connect_ex(address)
        if error == errno.EINPROGRESS:
            _writable(sock, timeout, address)
            error = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


def _writable(sock: Any, timeout: Optional[float], address: tuple[Any, ...]) -> None:
    """Wait until ``sock`` (gevent's) is writable, at most ``timeout`` seconds."""
    own = watchers(sock)
    # Only a non-blocking socket answers EINPROGRESS: gevent's, in a patched process.
    assert own is not None, "connecting with a socket gevent did not make"
    hub, watcher = sock.hub, own[1]
    if timeout is None:
        hub.wait(watcher)
        return
    timer = hub.loop.timer(max(timeout, 0.0))
    timer.start(_expired, getcurrent(), address)
    try:
        hub.wait(watcher)
    finally:
        timer.close()


def _expired(waiting: Any, address: tuple[Any, ...]) -> None:
    waiting.throw(ConnectTimeout(f"{address[0]}: no answer"))


def connect(addresses: Sequence[tuple[Any, ...]], timeout: float,
            delay: float = HAPPY_EYEBALLS_DELAY) -> tuple[socket.socket, tuple[Any, ...]]:
    """Connect to the first of ``addresses`` that answers; returns the socket and address.

    One address is tried in this greenlet. Several race as RFC 8305 describes: a new attempt
    starts every ``delay`` seconds, or as soon as the previous one failed; the first to
    connect wins and the others are cancelled and closed. ``timeout`` bounds the whole race.
    """
    if not addresses:
        raise ConnectRefused("no address to connect to")
    if len(addresses) == 1:
        try:
            return _open(addresses[0], timeout), addresses[0]
        except OSError as exc:
            raise _error_for(exc, addresses[0]) from None
    return _race(interleave(addresses), timeout, delay)


def _race(order: list[tuple[Any, ...]], timeout: float,
          delay: float) -> tuple[socket.socket, tuple[Any, ...]]:
    winner: list[tuple[socket.socket, tuple[Any, ...]]] = []
    errors: list[ProxyError] = []
    changed = gevent.event.Event()

    def attempt(address: tuple[Any, ...]) -> None:
        try:
            sock = _open(address)
        except OSError as exc:
            errors.append(_error_for(exc, address))
        else:
            if winner:
                sock.close()
            else:
                winner.append((sock, address))
        changed.set()

    attempts: list[gevent.Greenlet] = []
    deadline = time.monotonic() + timeout
    try:
        for address in order:
            attempts.append(gevent.spawn(attempt, address))
            failed_before = len(errors)
            changed.clear()
            # Wait for a winner, a failure (start the next at once) or the stagger delay.
            while not winner and len(errors) == failed_before:
                if not changed.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                    break
                changed.clear()
            if winner or time.monotonic() >= deadline:
                break
        while not winner and len(errors) < len(attempts):
            left = deadline - time.monotonic()
            if left <= 0 or not changed.wait(left):
                break
            changed.clear()
    finally:
        gevent.killall([g for g in attempts if not g.dead])
    if winner:
        return winner[0]
    if len(errors) == len(order):
        raise errors[0]
    raise ConnectTimeout(f"{order[0][0]} and {len(order) - 1} more: no answer")


class UpstreamPool:
    """Idle upstream connections kept for reuse, per key (host, port), bounded and expiring.

    A connection is only put back after a response whose framing ended cleanly, and is
    checked on the way out: one that became readable while idle (the upstream closed it, or
    sent bytes nobody asked for) is closed instead of reused.
    """

    def __init__(self, per_key: int, idle_timeout: float, max_total: int = 4096) -> None:
        self.per_key = per_key
        self.idle_timeout = idle_timeout
        self.max_total = max_total
        self._idle: dict[Any, deque[tuple[float, socket.socket, tuple[Any, ...]]]] = {}
        self._total = 0
        self._sweeper: Optional[gevent.Greenlet] = None

    def __len__(self) -> int:
        return self._total

    def get(self, key: Any) -> Optional[tuple[socket.socket, tuple[Any, ...]]]:
        """The most recently used idle connection for ``key`` and its peer address.

        Every one is checked, however briefly it was idle: bytes that came after a response
        ended (past its Content-Length, a body on a HEAD answer or a 204) would otherwise be
        read as the answer to the next request, whichever client sent it.
        """
        entries = self._idle.get(key)
        now = time.monotonic()
        while entries:
            expires, sock, address = entries.pop()
            self._total -= 1
            if expires > now and still_idle(sock):
                return sock, address
            sock.close()
        return None

    def put(self, key: Any, sock: socket.socket, address: tuple[Any, ...]) -> None:
        entries = self._idle.setdefault(key, deque())
        if len(entries) >= self.per_key or self._total >= self.max_total:
            sock.close()
            return
        entries.append((time.monotonic() + self.idle_timeout, sock, address))
        self._total += 1
        if self._sweeper is None or self._sweeper.dead:
            self._sweeper = gevent.spawn(self._sweep)

    def _sweep(self) -> None:
        # Runs while anything is pooled; closes expired entries so descriptors go back.
        while self._total:
            gevent.sleep(min(1.0, self.idle_timeout))
            now = time.monotonic()
            for key in list(self._idle):
                entries = self._idle[key]
                while entries and entries[0][0] <= now:
                    entries.popleft()[1].close()  # (expires, sock, address)
                    self._total -= 1
                if not entries:
                    del self._idle[key]

    def idle(self) -> list[tuple[Any, socket.socket]]:
        """The pooled connections, as (key, socket): for audits and tests, never for use."""
        return [(key, sock) for key, entries in self._idle.items() for _, sock, _ in entries]

    def clear(self) -> None:
        for entries in self._idle.values():
            for _, sock, _ in entries:
                sock.close()
        self._idle.clear()
        self._total = 0
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None


def parent_connect(sock: socket.socket, route: Route, authority: str, timeout: float,
                   max_head: int, via: str = "") -> bytes:
    """Ask a parent proxy for a tunnel to ``authority``; returns bytes that followed its 200.

    Anything but a 2xx from the parent fails the attempt with 502 (or 504 on no answer).
    """
    headers = [("Host", authority)]
    if via:  # lets a chain of proxies see a loop
        headers.append(("Via", f"1.1 {via}"))
    if route.username or route.password:
        headers.append(("Proxy-Authorization", basic_credentials(route)))
    parser = ResponseHeadParser(max_head)
    with gevent.Timeout(timeout, ConnectTimeout(f"parent {route.host}: no answer to CONNECT")):
        try:
            send_all(sock, serialize_head(f"CONNECT {authority} HTTP/1.1", headers))
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionTerminated(f"parent {route.host} closed during CONNECT")
                response = parser.feed(data)
                if response is not None:
                    break
        except OSError as exc:
            raise ConnectionTerminated(f"parent {route.host}: {exc}") from None
    if not 200 <= response.status < 300:
        raise ParentRefused(f"parent {route.host} answered CONNECT with {response.status}",
                            parent_status=response.status)
    return parser.rest


def basic_credentials(route: Route) -> str:
    token = f"{route.username}:{route.password}".encode("utf-8")
    return "Basic " + base64.b64encode(token).decode("ascii")
