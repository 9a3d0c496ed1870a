"""``dnscache``: a bounded cache of resolver answers, with negative caching and serve-stale.

It sits around the other ``resolve`` implementations as two hook implementations, because a
pluggy wrapper must yield exactly once and so cannot answer a hit by itself:

- ``resolve`` (``tryfirst``) answers a fresh entry, or a cached failure, without asking the
  resolvers. On a miss it opens a *flight* for the name, owned by the current greenlet, and
  passes (``None``); a lookup that misses while another greenlet's flight for the same name is
  open waits for that flight instead, so concurrent misses for one name make one query.
- ``remember`` (a ``wrapper``, ``trylast`` so that it is the innermost wrapper and sees the
  resolvers' own answer) acts only for the call that opened the flight: it stores the answer,
  falls back to a stale answer when the resolvers fail (RFC 8767), and wakes the waiters. Hits,
  waiters and IP literals open no flight, so a hit is never stored again with a fresh TTL.

Entries are keyed by the host name alone: the resolver's family setting is fixed for the life
of a cache (``configure`` builds a new one). Addresses are stored without their port and paired
with the port each lookup asks for.

An entry lives for its answer's TTL clamped to ``min_ttl .. max_ttl`` (``default_ttl`` when the
resolver cannot tell, as the system resolver cannot); a ``DNSError`` lives ``negative_ttl``.
A positive entry is kept ``stale_ttl`` longer, for serve-stale only: memory stays bounded by
``max_entries`` (a ``cachetools.TLRUCache``: least recently used first, once full).

Only ``DNSError`` and ``DNSTimeout`` are caught; anything else (a ``DestinationProhibited``, a
bug, ``GreenletExit``) passes through untouched, and the waiters then look again.

Each lookup's outcome goes into ``ctx.dns_cache`` (``hit``, ``miss`` or ``stale``), where
observers such as the metrics plugin read it in ``on_close``. Counters, on the plugin object:
``hits`` (lookups answered without asking the resolvers, cached failures and joined flights
included), ``misses`` (lookups that asked the resolvers), ``stale`` (lookups answered with a
stale entry), ``evictions`` (entries pushed out by ``max_entries``), and ``size`` /
``len(plugin)`` (entries held, stale ones included).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Optional, Sequence

import cachetools
import gevent
import gevent.event

from geproxy import Config, ConfigError, Context, OptionRegistry, Resolved, errors, hookimpl

__all__ = ["DNSCache"]

log = logging.getLogger(__name__)

#: Each counter's outcome, as ``ctx.dns_cache`` says it.
OUTCOMES = {"hits": "hit", "misses": "miss", "stale": "stale"}

#: The TTL given to a stale answer (RFC 8767 section 4 recommends 30 seconds).
STALE_ANSWER_TTL = 30.0
#: DNSError rcodes that are the name's own answer: the name or its addresses do not exist.
_ANSWERS = frozenset({"NXDOMAIN", "NOERROR"})
#: How often a lookup may wait for another greenlet's flight that ended with no outcome
#: (its greenlet was killed, or a plugin raised something other than a DNS error).
_JOIN_ROUNDS = 3

Address = tuple[Any, ...]


class _Entry:
    """A cached answer (``addresses``, ports removed) or failure (``addresses`` None)."""

    __slots__ = ("addresses", "fresh_until", "keep_until", "rcode", "detail")

    def __init__(self, addresses: Optional[tuple[Address, ...]], fresh_until: float,
                 keep_until: float, rcode: Optional[str] = None, detail: str = "") -> None:
        self.addresses = addresses
        self.fresh_until = fresh_until
        self.keep_until = keep_until
        self.rcode = rcode
        self.detail = detail


class _Outcome:
    """What a flight ended with, for the lookups that waited on it."""

    __slots__ = ("addresses", "ttl", "error", "stale")

    def __init__(self, addresses: Optional[tuple[Address, ...]] = None,
                 ttl: Optional[float] = None, error: Optional[errors.ProxyError] = None,
                 stale: bool = False) -> None:
        self.addresses = addresses
        self.ttl = ttl
        self.error = error
        self.stale = stale

    def answer(self, port: int) -> Resolved:
        # A new exception for each waiter, equivalent to the one the flight's owner got.
        if isinstance(self.error, errors.DNSTimeout):
            raise errors.DNSTimeout(self.error.detail)
        if self.error is not None:
            raise errors.DNSError(self.error.detail, rcode=self.error.rcode)
        return Resolved(_with_port(self.addresses or (), port), ttl=self.ttl)


class _Flight:
    """One lookup in progress for a name: its owner asks the resolvers, others wait."""

    __slots__ = ("owner", "done", "outcome")

    def __init__(self) -> None:
        self.owner = gevent.getcurrent()
        self.done = gevent.event.Event()
        self.outcome: Optional[_Outcome] = None

    def land(self, outcome: Optional[_Outcome]) -> None:
        if not self.done.is_set():
            self.outcome = outcome
            self.done.set()


class _BoundedCache(cachetools.TLRUCache):  # type: ignore[type-arg]
    """A TLRUCache that reports the entries it pushes out to make room."""

    def __init__(self, maxsize: int, ttu: Callable[[Any, Any, float], float],
                 timer: Callable[[], float], on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize, ttu, timer=timer)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Any, Any]:
        # Cache.__setitem__ calls popitem only when full; TLRUCache.__setitem__ has already
        # dropped the expired entries by then, so each call is one eviction.
        item = super().popitem()
        self._on_evict()
        return item


class DNSCache:
    name = "dnscache"

    def __init__(self) -> None:
        #: The clock of every time decision (tests put a fake clock here).
        self.clock: Callable[[], float] = time.monotonic
        self.hits = 0
        self.misses = 0
        self.stale = 0
        self.evictions = 0
        self.max_entries = 10000
        self.min_ttl = 5.0
        self.max_ttl = 3600.0
        self.negative_ttl = 30.0
        self.default_ttl = 60.0
        self.stale_ttl = 3600.0
        self._flights: dict[str, _Flight] = {}
        self._cache = self._new_cache()

    # -- configuration ------------------------------------------------------------------

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(self.name)
            .add("max_entries", "int", "10000",
                 "Names kept at most, stale ones included; the least recently used goes "
                 "first.", minimum=1)
            .add("min_ttl", "duration", "5s",
                 "Shortest time an answer is cached, whatever its TTL.", minimum=0)
            .add("max_ttl", "duration", "1h",
                 "Longest time an answer is cached, whatever its TTL.", minimum=0)
            .add("negative_ttl", "duration", "30s",
                 "Time a failed lookup (NXDOMAIN, SERVFAIL ...) is cached; 0 caches none. "
                 "Timeouts are never cached.", minimum=0)
            .add("default_ttl", "duration", "60s",
                 "Time an answer is cached when the resolver gives no TTL (the system "
                 "resolver).", minimum=0)
            .add("stale_ttl", "duration", "1h",
                 "How long past its expiry an answer may still be used when the resolvers "
                 "fail or time out (serve-stale, RFC 8767); 0 disables it.", minimum=0)
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(self.name)
        if section["min_ttl"] > section["max_ttl"]:
            raise ConfigError(f"must not be above max_ttl ({section['max_ttl']:g}s)",
                              path=config.path, section=self.name, key="min_ttl")
        self.max_entries = section["max_entries"]
        self.min_ttl = section["min_ttl"]
        self.max_ttl = section["max_ttl"]
        self.negative_ttl = section["negative_ttl"]
        self.default_ttl = section["default_ttl"]
        self.stale_ttl = section["stale_ttl"]
        self._cache = self._new_cache()

    def _new_cache(self) -> _BoundedCache:
        return _BoundedCache(self.max_entries, _keep_until, timer=lambda: self.clock(),
                             on_evict=self._evicted)

    def _evicted(self) -> None:
        self.evictions += 1

    # -- size ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Entries held now, fresh and stale."""
        self._cache.expire()
        return len(self._cache)

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:  # an empty cache is still a plugin
        return True

    # -- the hook -----------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[Sequence[Address]]:
        """Answer a fresh entry; on a miss, ask the resolvers once per name."""
        if _is_literal(host):
            return None
        current = gevent.getcurrent()
        for _ in range(_JOIN_ROUNDS):
            entry = self._cache.get(host)
            if entry is not None and self.clock() < entry.fresh_until:
                self._count(ctx, "hits")
                return self._answer(host, port, entry)
            flight = self._flights.get(host)
            # A flight whose greenlet is gone unlanded (only if this impl was called outside
            # the hook, without the wrapper) is taken over rather than waited for.
            if flight is None or flight.owner.dead:
                self._flights[host] = _Flight()
                self._count(ctx, "misses")
                return None
            if flight.owner is current:  # a lookup nested in our own: do not wait for it
                break
            flight.done.wait()
            if flight.outcome is not None:
                self._count(ctx, "stale" if flight.outcome.stale else "hits")
                return flight.outcome.answer(port)
        self._count(ctx, "misses")
        return None

    def _count(self, ctx: Context, outcome: str) -> None:
        """Count a lookup's outcome (``hits``, ``misses`` or ``stale``) and say it in
        ``ctx.dns_cache``; a lookup of a request only being decided (``ctx.decide_only``:
        geproxy explain) is not counted."""
        if ctx.decide_only:
            return
        setattr(self, outcome, getattr(self, outcome) + 1)
        ctx.dns_cache = OUTCOMES[outcome]

    @hookimpl(wrapper=True, trylast=True, specname="resolve")
    def remember(self, ctx: Context, host: str, port: int) -> Any:
        """Store what the resolvers answered, or serve stale when they failed."""
        try:
            result = yield
        except BaseException as exc:
            flight = self._take_flight(host)
            if flight is None:
                raise
            try:
                if isinstance(exc, (errors.DNSError, errors.DNSTimeout)):
                    stale = self._failed(ctx, host, exc)
                    if stale is not None:
                        flight.land(_Outcome(stale.addresses, STALE_ANSWER_TTL, stale=True))
                        return Resolved(_with_port(stale.addresses or (), port),
                                        ttl=STALE_ANSWER_TTL)
                    flight.land(_Outcome(error=exc))
            finally:
                flight.land(None)  # anything else: the waiters look again
            raise
        flight = self._take_flight(host)
        if flight is None:
            return result
        try:
            if result is not None:
                addresses = tuple(_without_port(a) for a in result)
                ttl = getattr(result, "ttl", None)
                self._store(host, addresses, ttl)
                flight.land(_Outcome(addresses, ttl))
        finally:
            flight.land(None)
        return result

    # -- inside -------------------------------------------------------------------------

    def _take_flight(self, host: str) -> Optional[_Flight]:
        """The flight for ``host`` if this greenlet opened it (it is then closed)."""
        flight = self._flights.get(host)
        if flight is None or flight.owner is not gevent.getcurrent():
            return None
        del self._flights[host]
        return flight

    def _answer(self, host: str, port: int, entry: _Entry) -> Resolved:
        if entry.addresses is None:
            raise errors.DNSError(entry.detail or f"{host}: {entry.rcode} (cached)",
                                  rcode=entry.rcode)
        remaining = max(0.0, entry.fresh_until - self.clock())
        return Resolved(_with_port(entry.addresses, port), ttl=remaining)

    def _store(self, host: str, addresses: tuple[Address, ...], ttl: Optional[float]) -> None:
        now = self.clock()
        if not addresses:  # no address: an answer as negative as an error
            fresh = now + self.negative_ttl
            self._cache[host] = _Entry(addresses, fresh, fresh)
            return
        if ttl is None:
            life = self.default_ttl
        else:
            life = min(max(float(ttl), self.min_ttl), self.max_ttl)
        self._cache[host] = _Entry(addresses, now + life, now + life + self.stale_ttl)

    def _failed(self, ctx: Context, host: str,
                exc: errors.ProxyError) -> Optional[_Entry]:
        """The stale entry to answer with after ``exc``, or None (a DNSError is then
        cached for negative_ttl). NXDOMAIN, and NOERROR with no address, are answers from
        the name's servers, not failures to reach them: never served stale (RFC 8767)."""
        answered = isinstance(exc, errors.DNSError) and exc.rcode in _ANSWERS
        if not answered:
            entry = self._cache.get(host)
            if entry is not None and entry.addresses:
                self._count(ctx, "stale")
                log.warning("[%s] serving stale answer for %s: %s, expired %.0fs ago",
                            ctx.conn_id, host, _reason(host, exc),
                            self.clock() - entry.fresh_until)
                return entry
        if isinstance(exc, errors.DNSError):
            now = self.clock()
            fresh = now + self.negative_ttl
            detail = f"{exc.detail or host} (cached)"
            self._cache[host] = _Entry(None, fresh, fresh, exc.rcode, detail)
        return None


def _reason(host: str, exc: errors.ProxyError) -> str:
    """``exc``'s detail without the host it usually starts with, and its rcode."""
    reason = exc.detail or exc.error
    if reason.startswith(f"{host}: "):
        reason = reason[len(host) + 2:]
    return f"{reason} (rcode {exc.rcode})" if exc.rcode else reason


def _keep_until(key: str, entry: _Entry, now: float) -> float:
    return entry.keep_until


def _without_port(address: Address) -> Address:
    return (address[0], *address[2:])


def _with_port(addresses: Sequence[Address], port: int) -> list[Address]:
    return [(address[0], port, *address[1:]) for address in addresses]


def _is_literal(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False
