"""Greenlets for client connections, kept for the next connection when one ends.

Spawning a greenlet costs more than a connection's other set-up (a new Greenlet, its start
scheduled, its first switch growing a stack, its links run at its death): with one wait in
the hub, a stand-in connection takes 15.6 µs on a new greenlet and 3.8 µs on a parked one
(``bench/greenlets.py``; docs/performance.md). A greenlet that served a connection to its
end parks instead, waiting in the hub; the listener hands the next accepted connection to a
parked one, which costs one switch.

What a parked greenlet is not:

- a connection: it is out of the server's ``connections`` group (which a stop waits for and
  kills, and ``max_connections`` counts) from the moment its connection ended;
- a leak: it carries ``parked = True``, which /debug/stats and the test kit's leak checks
  read (``is_parked``), and it is let go when unused: once a second (``trim``) the
  greenlets that stayed parked the whole second end, so an idle proxy holds none two
  seconds after its last connection, and never more than ``MAX_PARKED``;
- a keeper of the last connection's state: its frames are gone, the work it was handed is
  dropped before it parks, and each connection starts with empty context variables, as a
  new greenlet would.

A connection that ends by an exception (a kill: a stop past ``graceful_timeout``, the
admin's close) ends its greenlet too; only one that returned parks. A kill meant for one
connection must never reach the greenlet's next one: ``Transaction.close`` checks, in the
hub, that the greenlet still serves the request it was meant for.
"""

from __future__ import annotations

from typing import Any, Callable

import gevent
import gevent.pool
from gevent import get_hub, getcurrent

__all__ = ["ConnectionGreenlet", "Handlers", "MAX_PARKED", "is_parked"]

#: The most greenlets kept parked: above the connections a worker starts in a second or two
#: at its busiest, and 128 parked stacks are a few hundred KiB.
MAX_PARKED = 128


class ConnectionGreenlet(gevent.Greenlet):
    """A greenlet that serves client connections one after another."""

    #: Waiting for a connection to serve (out of ``connections``, not counted as busy).
    parked = False
    #: The connection to serve next, as (function, arguments); None once taken.
    work: Any = None


def is_parked(greenlet: Any) -> bool:
    """Whether ``greenlet`` is a connection's greenlet waiting for the next connection."""
    return getattr(greenlet, "parked", False) is True


class Handlers:
    """The ``spawn`` given to the listeners: a parked greenlet when there is one, else a
    new one, either way added to ``group`` (the server's ``connections``) while it serves."""

    def __init__(self, group: gevent.pool.Group, limit: int = MAX_PARKED) -> None:
        self.group = group
        self.limit = limit
        self._parked: list[ConnectionGreenlet] = []
        #: The fewest parked since the last ``trim``: that many were not needed all along.
        self._low = 0
        self.closed = False

    def __len__(self) -> int:
        """Greenlets parked now."""
        return len(self._parked)

    def spawn(self, func: Callable[..., Any], *args: Any) -> ConnectionGreenlet:
        """Serve ``func(*args)`` (one accepted connection) in a greenlet of the group."""
        parked = self._parked
        if parked:
            greenlet = parked.pop()
            if len(parked) < self._low:
                self._low = len(parked)
            greenlet.parked = False
            self.group.add(greenlet)
            # Started from the hub's next callbacks, as a spawn's greenlet would be.
            get_hub().loop.run_callback(greenlet.switch, (func, args))
            return greenlet
        greenlet = ConnectionGreenlet(self._serve)
        greenlet.work = (func, args)
        self.group.add(greenlet)
        greenlet.start()
        return greenlet

    def _serve(self) -> None:
        me: ConnectionGreenlet = getcurrent()  # type: ignore[assignment]
        work, me.work = me.work, None
        hub = get_hub()
        while work is not None:
            func, args = work
            work = None
            func(*args)  # an exception (a kill) ends the greenlet: it never parks
            func = args = None  # nothing of the connection is held while parked
            self.group.discard(me)
            if self.closed or len(self._parked) >= self.limit:
                return
            me.gr_context = None  # the next connection's context variables start empty
            me.parked = True
            self._parked.append(me)
            try:
                work = hub.switch()  # (func, args) from ``spawn``, or None from ``trim``
            except BaseException:  # killed while parked (gevent.killall of everything)
                if me in self._parked:
                    self._parked.remove(me)
                raise
            finally:
                me.parked = False

    def trim(self) -> None:
        """Let go the greenlets that stayed parked since the last call (every second, from
        the server's tick): they were not needed, the busiest moment needed the rest."""
        idle = min(self._low, len(self._parked))
        if idle:
            self._release(self._parked[:idle])  # the longest parked: the bottom of the stack
            del self._parked[:idle]
        self._low = len(self._parked)

    def close(self) -> None:
        """A stop: every parked greenlet ends, and none parks from now on."""
        self.closed = True
        self._release(self._parked)
        self._parked = []
        self._low = 0

    @staticmethod
    def _release(greenlets: list[ConnectionGreenlet]) -> None:
        loop = get_hub().loop
        for greenlet in greenlets:
            greenlet.parked = False
            loop.run_callback(greenlet.switch, None)
