"""Checked passwords remembered: the one cache every Basic source of ``[auth]`` shares.

A source (the htpasswd file, the LDAP directory) says whether a password is a user's; the
cache stands in front of it, so that:

- a good password is checked once per ``cache_ttl`` (per user: one entry each);
- a wrong one is remembered for ``negative_ttl``: a client that repeats a stale password
  costs one check per ``negative_ttl``, not one per request (a directory counts each failed
  bind towards the account's lockout);
- a user with ``max_failures`` different wrong passwords within ``negative_ttl`` is refused
  without asking the source until the window has passed: a password guesser cannot hammer
  the directory, whatever it tries;
- when the source cannot answer (every directory server down), a good password checked
  within ``cache_ttl + stale_ttl`` is still taken ("stale"); past that, the caller answers
  503;
- concurrent checks of the same credentials share one check.

Entries hold an HMAC of the credentials under a key made at start, never a password, and
are compared with ``hmac.compare_digest``. A good entry holds only while the source's
``stamp`` for the user is the one it was checked against (the user's hash in the file): an
edited file drops it without a flush.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Callable, Hashable, NamedTuple, Optional, Protocol, TypeVar, cast

import gevent
import gevent.event
from cachetools import TTLCache

#: Wrong credentials remembered at most (never more than the cache's size).
NEGATIVE_CACHE_SIZE = 4096


class Unavailable(Exception):
    """The source could not answer: every server down, refused or timed out. The message
    is for the log."""


class PasswordSource(Protocol):
    """Where Basic credentials are checked: the htpasswd file, the LDAP directory."""

    #: For logs and metrics: "htpasswd", "ldap".
    name: str

    def canonical(self, user: str) -> Optional[str]:
        """The user's name as the source writes it (``ALICE`` -> ``alice`` under
        ``user_case = insensitive``), or None when the source knows it has no such user.
        No I/O: a directory answers the name as it will check it."""

    def stamp(self, user: str) -> Hashable:
        """What a remembered good password of ``user`` holds only while unchanged (the
        user's hash in the file); a constant where the source cannot tell without asking."""

    def verify(self, user: str, password: bytes) -> bool:
        """Whether ``password`` is the password of ``user`` (the canonical name); raises
        ``Unavailable`` when the source cannot tell. Runs in the request's greenlet: it may
        wait on gevent sockets or gevent's thread pool, never block the loop."""


class Verdict(NamedTuple):
    """A check's outcome: the user proven (None: not proven) and how (``ctx.auth_result``:
    "ok", "cached", "stale", "failed", "throttled")."""

    user: Optional[str]
    result: str


@dataclass(frozen=True)
class _Good:
    digest: bytes
    stamp: Hashable
    #: When the source said yes (the cache's clock).
    at: float


class CredentialCache:
    """Verdicts on credentials, per source and user; see the module's docstring."""

    def __init__(self, *, size: int, ttl: float, negative_ttl: float, stale_ttl: float,
                 max_failures: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_ttl = stale_ttl
        self.max_failures = max_failures
        self._key = secrets.token_bytes(32)
        keep = ttl + stale_ttl
        self._good: Optional[TTLCache[tuple[str, str], _Good]] = (
            TTLCache(maxsize=size, ttl=keep, timer=clock) if size and keep else None)
        bad_size = min(size, NEGATIVE_CACHE_SIZE) if size else NEGATIVE_CACHE_SIZE
        self._bad: Optional[TTLCache[bytes, Hashable]] = (
            TTLCache(maxsize=bad_size, ttl=negative_ttl, timer=clock)
            if negative_ttl else None)
        #: Wrong passwords per (source, user) within negative_ttl.
        self._failures: Optional[TTLCache[tuple[str, str], int]] = (
            TTLCache(maxsize=bad_size, ttl=negative_ttl, timer=clock)
            if negative_ttl and max_failures else None)
        self._clock = clock
        self._flights = SingleFlight()

    def digest(self, source: str, user: str, password: bytes) -> bytes:
        message = b"\0".join((source.encode(), user.encode("utf-8", "surrogatepass"),
                              password))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def check(self, source: PasswordSource, user: str, password: bytes) -> Verdict:
        """The verdict on ``password`` for ``user`` (canonical), from the cache when it
        knows; raises ``Unavailable`` when the source cannot answer and no remembered good
        password of the user's may stand in."""
        key = (source.name, user)
        digest = self.digest(source.name, user, password)
        stamp = source.stamp(user)
        now = self._clock()
        good = self._good.get(key) if self._good is not None else None
        matches = (good is not None and good.stamp == stamp
                   and hmac.compare_digest(good.digest, digest))
        if matches and good is not None and now - good.at < self.ttl:
            return Verdict(user, "cached")
        if self._bad is not None and self._bad.get(digest, _NONE) == stamp:
            return Verdict(None, "failed")
        if (self._failures is not None and not matches
                and self._failures.get(key, 0) >= self.max_failures):
            return Verdict(None, "throttled")
        try:
            ok = self._flights.run(digest, lambda: bool(source.verify(user, password)))
        except Unavailable:
            if matches:
                return Verdict(user, "stale")
            raise
        if ok:
            if self._good is not None:
                self._good[key] = _Good(digest, stamp, self._clock())
            return Verdict(user, "ok")
        if self._bad is not None:
            self._bad[digest] = stamp
        if self._failures is not None:
            self._failures[key] = self._failures.get(key, 0) + 1
        if matches and self._good is not None:
            self._good.pop(key, None)  # the password was changed at the source
        return Verdict(None, "failed")

    def forget_failures(self) -> None:
        """Wrong passwords forgotten (the source changed: one may now be right)."""
        if self._bad is not None:
            self._bad.clear()
        if self._failures is not None:
            self._failures.clear()


class SingleFlight:
    """Concurrent calls with the same key share one: the first caller makes it, the others
    wait for its outcome, ``Unavailable`` included. A caller killed or failing otherwise
    leaves its waiters to make the call themselves."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, gevent.event.AsyncResult] = {}

    def run(self, key: Hashable, call: Callable[[], _T]) -> _T:
        joined = self._flights.get(key)
        if joined is not None:
            shared = joined.get()
            if isinstance(shared, Unavailable):
                raise shared
            if shared is not _FAILED:
                return cast(_T, shared)
        flight = gevent.event.AsyncResult()
        self._flights[key] = flight
        outcome: object = _FAILED
        try:
            outcome = call()
        except Unavailable as exc:
            outcome = exc
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.set(outcome)
        return cast(_T, outcome)


#: A stamp no source gives: a remembered failure of no one.
_NONE = object()
#: The outcome of a call that ended otherwise than by returning or ``Unavailable``.
_FAILED = object()
_T = TypeVar("_T")
