"""The byte relay behind CONNECT (and Upgrade): both directions until both are done.

A FIN from one side is passed on as a half-close of the other, and the opposite direction
keeps flowing. The relay ends when both directions ended, or when nothing moved in either
direction for ``idle_timeout`` (counted from the first moment), or when a side resets.
Memory per tunnel is one receive buffer per direction while bytes are in flight, nothing while
idle.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Optional

import gevent
from gevent import get_hub

from .models import Record
from .sockets import send_all

__all__ = ["relay"]

BUFFER = 64 * 1024


class _Tunnel:
    __slots__ = ("client", "upstream", "record", "idle_timeout", "last", "reason", "_timer",
                 "_ended", "inspect", "_lifetime")

    def __init__(self, client: socket.socket, upstream: socket.socket, record: Record,
                 idle_timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.record = record
        self.idle_timeout = idle_timeout
        self.last = time.monotonic()
        self.reason = ""
        self._timer: Any = None  # a gevent timer watcher while armed
        self._ended = 0  # directions that saw their EOF
        #: Called once with the client's first bytes; False closes the tunnel.
        self.inspect: Optional[Callable[[bytes], bool]] = None
        self._lifetime: Any = None  # a timer when max_tunnel_lifetime is set

    def pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        record = self.record
        try:
            while True:
                data = src.recv(BUFFER)
                if not data:
                    break
                if upward and self.inspect is not None and not self.first(data):
                    return
                send_all(dst, data)
                self.last = time.monotonic()
                if upward:
                    record.bytes_in += len(data)
                else:
                    record.bytes_out += len(data)
        except OSError:
            # A reset (or the idle watchdog shutting both sides): end the whole tunnel.
            self.abort("client" if (src is self.client) else "upstream")
            return
        self._ended += 1
        if self._ended == 2:
            return  # both directions are done: closing the sockets sends the last FIN
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def first(self, data: bytes) -> bool:
        """Hand the client's first bytes to ``inspect`` once; False when it closed all."""
        inspect, self.inspect = self.inspect, None
        if inspect is not None and not inspect(data):
            self.abort("denied")
            return False
        return True

    def abort(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def arm(self, delay: float) -> None:
        timer = get_hub().loop.timer(delay)
        timer.start(self._check)
        self._timer = timer

    def _check(self) -> None:
        # Runs in the hub: must not block. Shutting the sockets wakes both pumps.
        idle_for = time.monotonic() - self.last
        if idle_for >= self.idle_timeout:
            self.abort("idle timeout")
        else:
            self._timer.close()
            self.arm(self.idle_timeout - idle_for)

    def limit(self, lifetime: float) -> None:
        """Close the tunnel ``lifetime`` seconds from now, whatever moves through it."""
        timer = get_hub().loop.timer(lifetime)
        timer.start(self.abort, "max lifetime")
        self._lifetime = timer

    def disarm(self) -> None:
        for timer in (self._timer, self._lifetime):
            if timer is not None:
                timer.close()
        self._timer = self._lifetime = None


def relay(client: socket.socket, upstream: socket.socket, record: Record,
          idle_timeout: float, to_upstream: bytes = b"", to_client: bytes = b"",
          inspect: Optional[Callable[[bytes], bool]] = None, lifetime: float = 0) -> str:
    """Relay until both directions are done; returns the close reason for the record.

    ``to_upstream`` and ``to_client`` are bytes already read past a head on either side
    (a client's TLS ClientHello sent right after CONNECT, say); they go first.
    ``inspect``, if given, sees the client's first bytes before they go upstream and may
    close the tunnel by returning False. ``lifetime`` (seconds, 0 for none) bounds how long
    the tunnel may stay open at all.
    """
    tunnel = _Tunnel(client, upstream, record, idle_timeout)
    tunnel.inspect = inspect
    client.settimeout(None)
    upstream.settimeout(None)
    tunnel.arm(idle_timeout)
    if lifetime:
        tunnel.limit(lifetime)
    down: Optional[gevent.Greenlet] = None
    try:
        if to_upstream and not tunnel.first(to_upstream):
            return tunnel.reason
        # The client gets what the upstream said first, even if the upstream is gone already.
        if to_client:
            send_all(client, to_client)
            record.bytes_out += len(to_client)
        if to_upstream:
            try:
                send_all(upstream, to_upstream)
            except OSError:  # reset, say, right after a parent's 200
                tunnel.abort("upstream")
                return tunnel.reason
            record.bytes_in += len(to_upstream)
        down = gevent.spawn(tunnel.pump, upstream, client, False)
        tunnel.pump(client, upstream, True)
        down.join()
    except OSError:
        tunnel.abort("client")
    finally:
        tunnel.disarm()
        if down is not None and not down.dead:
            tunnel.abort("shutdown")
            down.kill()
    return tunnel.reason or "done"
